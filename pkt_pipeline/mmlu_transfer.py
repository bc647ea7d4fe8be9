"""MMLU transfer splits carved from the pinned MMLU test set, for machines without the shared splits.

The published splits (`transfer-splits/mmlu`, see data/SOURCES.md) have no public copy, so a fresh
machine carves its own from the MMLU package data: a seeded random choice of test questions,
in the published row format (user: the 0-shot question ending "Answer:", assistant: "The answer
is: X") and the published sizes. Every carved row names its source item (`test_item_id`), and
`pkt eval` drops those items, so the evaluation set is disjoint from the transfer data by
construction. The cost is that those questions leave the test set (1,100 of 14,042).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .evaluation.mmlu import LETTERS, load_mmlu, mmlu_prompt

SPLIT_SIZES = {"train": 1000, "align": 80, "extract": 20}
"""The published MMLU split sizes."""


def carve_mmlu_transfer(test_path: str | Path, out_dir: str | Path, seed: int = 0,
                        sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `out_dir/{train,align,extract}.jsonl` from disjoint seeded samples of the MMLU test file."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    items = load_mmlu(test_path)
    if sum(sizes.values()) > len(items) // 2:
        raise ValueError(f"carving {sum(sizes.values())} transfer rows from {len(items)} MMLU items would leave "
                         "too little to evaluate on")
    order = random.Random(seed).sample(range(len(items)), sum(sizes.values()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, start = {}, 0
    for split, size in sizes.items():
        path = out_dir / f"{split}.jsonl"
        partial = path.with_suffix(".jsonl.partial")
        with partial.open("w", encoding="utf-8") as sink:
            for index in order[start:start + size]:
                item = items[index]
                sink.write(json.dumps({
                    "dataset": "mmlu", "category": item.subject.replace(" ", "_"), "id": f"carved-{item.id}",
                    "test_task": "mmlu", "test_item_id": item.id, "carved_from": str(test_path), "seed": seed,
                    "messages": [{"role": "user", "content": mmlu_prompt(item)},
                                 {"role": "assistant", "content": f"The answer is: {LETTERS[item.answer]}"}],
                }) + "\n")
        os.replace(partial, path)
        written[split], start = path, start + size
    return written
