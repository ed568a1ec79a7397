"""Tokenizers with exact round trips: raw bytes, and byte-level BPE (HF ``tokenizers``).

Both map any text to ids and back exactly (``decode(encode(s)) == s``) and know each
token's UTF-8 byte length (``token_bytes``), which is what makes bits per byte exact.
Documents are separated by an end-of-text token (``eot_id``, zero bytes); text that
merely *spells* ``<|endoftext|>`` is encoded as ordinary text, never as the EOT id.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT_TEXT = "<|endoftext|>"
# End-of-text spellings looked up (in order) in a user-given tokenizer.json.
EOT_CANDIDATES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>")
_PROBE = "Round trip: Zürich, naïve café, 日本語, emoji 🙂\n\ttabs  and  spaces \r\n"
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


class Tokenizer(abc.ABC):
    """Text <-> token ids.

    vocab_size: number of ids (all ids are < vocab_size).
    eot_id: the end-of-text id placed before every document.
    hash: short hex id of the exact vocabulary (keys the token caches).
    token_bytes: int64 (vocab_size,), UTF-8 bytes each token stands for (0 for EOT/special).
    """

    vocab_size: int
    eot_id: int
    hash: str
    token_bytes: np.ndarray

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode several texts (in parallel where possible): int32 (n_i,) ids each."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Ids back to text; the EOT id is rendered as ``<|endoftext|>``."""

    def encode(self, text: str) -> np.ndarray:
        """One text to int32 ids (n,), without any EOT."""
        return self.encode_batch([text])[0]

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id (uint16 or uint32)."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus EOT = 256 (vocab 257); needs no training."""

    VOCAB_SIZE = 257  # 256 bytes + end-of-text

    def __init__(self) -> None:
        self.vocab_size = self.VOCAB_SIZE
        self.eot_id = 256
        self.hash = hashlib.sha256(b"ffn_jax byte tokenizer v1").hexdigest()[:16]
        self.token_bytes = np.ones(self.vocab_size, np.int64)
        self.token_bytes[self.eot_id] = 0

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte tokenizer: ids must be in [0, {self.vocab_size})")
        pieces = np.split(ids, np.flatnonzero(ids == self.eot_id))
        out = [pieces[0].astype(np.uint8).tobytes()]
        out += [EOT_TEXT.encode() + p[1:].astype(np.uint8).tobytes() for p in pieces[1:]]
        return b"".join(out).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A byte-level BPE ``tokenizers`` model, from its JSON (``tokenizer.json``) text.

    ``source`` names where the JSON came from, for error messages. Raises ValueError
    unless the tokenizer is byte-level (every token a byte string), has an end-of-text
    token and round-trips text exactly.
    """

    @classmethod
    def from_file(cls, path: str | os.PathLike, source: str | None = None) -> BPETokenizer:
        """The tokenizer in the JSON file ``path`` (ValueError naming the file if it is not
        UTF-8 text or not a tokenizer)."""
        source = source or str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{source}: not a tokenizers JSON file (not UTF-8 text); give "
                "the tokenizer.json that tokenizers saved"
            ) from None
        return cls(text, source=source)

    def __init__(self, json_text: str, source: str = "data.tokenizer") -> None:
        try:
            self._tok = HFTokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{source}: not a tokenizers JSON file ({e})") from None
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in text stays text
        self.json = json_text
        self.hash = hashlib.sha256(json_text.encode("utf-8")).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eot = [i for t in EOT_CANDIDATES if (i := self._tok.token_to_id(t)) is not None]
        if not eot:
            raise ValueError(f"{source}: no end-of-text token (one of {EOT_CANDIDATES}); add one")
        self.eot_id = eot[0]
        self.token_bytes = self._byte_lengths(source)
        if self.decode(self.encode(_PROBE)) != _PROBE:
            raise ValueError(f"{source}: does not round-trip text exactly; use a byte-level BPE")

    def _byte_lengths(self, source: str) -> np.ndarray:
        special = set(self._tok.get_added_tokens_decoder())
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if i in special:
                continue
            token = self._tok.id_to_token(i)
            if token is None or not set(token) <= _BYTE_ALPHABET:
                raise ValueError(
                    f"{source}: token {i} ({token!r}) is not byte-level; bits per byte needs a "
                    "byte-level BPE tokenizer (GPT-2 style)"
                )
            lengths[i] = len(token)
        return lengths

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (256 bytes, merges, EOT) on ``texts``.

    Raises ValueError naming ``data.vocab_size`` if the text cannot support that many
    tokens (the trainer would silently stop short).
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=sorted(_BYTE_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise ValueError(
            f"data.vocab_size={vocab_size}: the training text supports only {got} BPE tokens; "
            f"set data.vocab_size <= {got} or use a bigger corpus"
        )
    return BPETokenizer(tok.to_str(), source="trained BPE")
