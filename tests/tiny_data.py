"""Synthetic transfer data and stage-one settings small enough for the tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pkt_pipeline.config import PktConfig, load_config

WORDS = ("the teacher knows how many clips Natalia sold in April and May def add return print range "
         "answer question function number even prime").split()
SMALL_LAYOUT = ["extract.chunk_tokens=32", "extract.shard_tokens=128", "extract.max_length=96", "extract.batch_size=4"]


def write_dataset(path: Path, n: int, seed: int = 0, with_ids: bool = True) -> Path:
    """`n` chat examples in the transfer-splits `messages` format, random words of varied length."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(n):
            row = {"messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 15)))},
            ]}
            if with_ids:
                row["id"] = f"ex{i:03d}"
            handle.write(json.dumps(row) + "\n")
    return path


def extract_config(teacher, data, out, *extra: str) -> PktConfig:
    return load_config(overrides=[f"teacher={teacher}", f"extract.data={data}", f"extract.out={out}",
                                  "runtime.dtype=float32", *SMALL_LAYOUT, *extra])
