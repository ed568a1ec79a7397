"""Data: corpora, tokenizers, token shards on disk, the grain loader, bits per byte.

Typical use from the trainer::

    prep = data.prepare(spec.data, workdir)
    it = data.train_iterator(prep.splits["train"], seq_len=T, global_batch=B, seed=s)
    for batch in data.eval_batches(prep.splits["validation"], seq_len=T, batch_size=B,
                                   token_bytes=prep.tokenizer.token_bytes): ...
    bpb = data.bits_per_byte(total_nll_nats, total_bytes)
"""

from ffn_jax.data.corpora import SPLITS, Corpus
from ffn_jax.data.evaluation import bits_per_byte, eval_batches
from ffn_jax.data.loader import batch_block, to_global, train_iterator
from ffn_jax.data.pipeline import CORPORA, Prepared, prepare, tokenizer_vocab_size, validate
from ffn_jax.data.shakespeare import HELDOUT_WORKS
from ffn_jax.data.shards import TokenShard
from ffn_jax.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, train_bpe

__all__ = [
    "CORPORA",
    "HELDOUT_WORKS",
    "SPLITS",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "Prepared",
    "TokenShard",
    "Tokenizer",
    "batch_block",
    "bits_per_byte",
    "eval_batches",
    "prepare",
    "to_global",
    "tokenizer_vocab_size",
    "train_bpe",
    "train_iterator",
    "validate",
]
