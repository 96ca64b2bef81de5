"""Encode stored vectors into one codec in this process, so the caller can stop a slow training.

    python -m benchmarks.perf.codec_child --codec pq --vectors V.npy --keys K.npy --train-rows N --out F.faiss

Prints one JSON line with the seconds that training, encoding and writing took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from trimdb.codecs import build_codec


def encode_file(codec: str, vectors: np.ndarray, keys: np.ndarray, train_rows: int, out: Path) -> float:
    """Encode ``vectors`` as Store.write_segment does (codec trained on the first ``train_rows``); return seconds."""
    started = time.perf_counter()
    template, _ = build_codec(codec, vectors[:train_rows])
    encoded = faiss.IndexIDMap2(template)
    encoded.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64))
    faiss.write_index(encoded, str(out))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.codec_child", description=__doc__.splitlines()[0])
    parser.add_argument("--codec", required=True)
    parser.add_argument("--vectors", type=Path, required=True, help=".npy file of float32 vectors (N, D)")
    parser.add_argument("--keys", type=Path, required=True, help=".npy file of int64 token keys (N,)")
    parser.add_argument("--train-rows", type=int, required=True, help="leading rows the codec trains on")
    parser.add_argument("--out", type=Path, required=True, help="FAISS file to write")
    args = parser.parse_args(argv)
    vectors = np.load(args.vectors, mmap_mode="r")
    keys = np.load(args.keys)
    seconds = encode_file(args.codec, vectors, keys, args.train_rows, args.out)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
