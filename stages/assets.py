"""Stage `assets`: fetch, verify and convert the pinned models; locate the data sets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from pkt_pipeline.assets import fetch_dataset, fetch_model, load_pins
from pkt_pipeline.config import PktConfig
from pkt_pipeline.datasets import DATASETS, DatasetNotFound, find_dataset, find_transfer_split
from pkt_pipeline.mmlu_transfer import SPLIT_SIZES, carve_mmlu_transfer


def run(config: PktConfig, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Fetch every selected model and pinned data file, then report where each data set is.

    Writes `<models_dir>/assets.json` with what was done, for DVC and for people.
    """
    cfg = config.assets
    pins = load_pins(cfg.pins)
    models_dir, data_dir = Path(cfg.models_dir), Path(cfg.data_dir)
    started = time.perf_counter()
    summary: dict = {"models": [], "datasets": []}
    if cfg.tiny:
        from pkt_pipeline.tiny_models import save_tiny_pair

        paths = save_tiny_pair(models_dir / "tiny")
        echo(f"tiny random pair: {paths['teacher']}, {paths['student']}")
        summary["models"] = [{"model": f"tiny-{role}", "action": "built", "path": str(path)} for role, path in paths.items()]
    for pin in [] if cfg.tiny else pins.select_models(cfg.models):
        echo(f"model {pin.name}: {pin.description}")
        result = fetch_model(pin, models_dir, dtype=cfg.dtype, progress=progress)
        echo(f"  {result['action']}: {result['path']} (GGUF sha256 {pin.gguf_sha256})")
        summary["models"].append(result)
    for pin in [] if cfg.tiny else pins.datasets.values():
        result = fetch_dataset(pin, data_dir)
        echo(f"data set {pin.name}: {result['action']}: {result['path']}")
        summary["datasets"].append(result)
    for name in DATASETS:
        if name in pins.datasets and not cfg.tiny:
            continue
        try:
            location = str(find_dataset(name, data_dir))
        except DatasetNotFound as exc:
            location = None
            echo(f"data set {name}: not available. {exc}")
        else:
            echo(f"data set {name}: {location}")
        summary["datasets"].append({"dataset": name, "action": "located" if location else "missing", "path": location})
    if not cfg.tiny:
        summary["datasets"].append(_mmlu_transfer_splits(data_dir, echo))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    models_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when every data set lives elsewhere
    (models_dir / "assets.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _mmlu_transfer_splits(data_dir: Path, echo: Callable[[str], None]) -> dict:
    """Locate the published MMLU transfer splits, or carve them from the MMLU test set (see
    `pkt_pipeline.mmlu_transfer`) so the default experiment runs on a machine without them."""
    try:
        located = {split: find_transfer_split("mmlu", split, data_dir) for split in SPLIT_SIZES}
    except DatasetNotFound:
        pass
    else:
        return {"dataset": "transfer-splits/mmlu", "action": "located", "path": str(located["train"].parent)}
    test = find_dataset("mmlu", data_dir, allow_hub=False)
    written = carve_mmlu_transfer(test, data_dir / "transfer-splits" / "mmlu")
    echo(f"data set transfer-splits/mmlu: not found; carved {sum(SPLIT_SIZES.values())} rows from {test} into "
         f"{written['train'].parent} (those questions are dropped from MMLU evaluation)")
    return {"dataset": "transfer-splits/mmlu", "action": "carved", "path": str(written["train"].parent)}
