"""Reading `pkt eval`'s per-item records back: the values two runs are paired on, and how each metric reads.

The report and the benches pair models item by item from `EVAL_DIR/NAME/items/TASK.jsonl`; this is the one
reader they share, so a bench needs no stage code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pkt_pipeline.jsonl import jsonl_records


@dataclass(frozen=True)
class Metric:
    name: str  # as shown
    key: str  # in item records
    percent: bool  # shown ×100
    higher_is_better: bool
    unit: str = ""  # of a value not shown in %


ACCURACY = Metric("accuracy", "correct", True, True)
P_CORRECT, NLL = Metric("p_correct", "p_correct", True, True), Metric("nll", "nll", False, False, "nats/token")
METRICS: dict[str, Metric] = {metric.key: metric for metric in (ACCURACY, P_CORRECT, NLL)}
"""How each record key reads. A task plug-in with a continuous value of its own adds its `Metric` here
(its direction and unit); a key missing from it is shown as a plain number, higher taken as better."""


def metric_for(key: str) -> Metric:
    return METRICS.get(key) or Metric(key, key, False, True)


def item_values(eval_dir: Path, name: str, task: str, key: str = "correct") -> dict[str, float]:
    """Item id -> value of `key` (booleans as 0/1), from `pkt eval`'s `EVAL_DIR/NAME/items/TASK.jsonl`;
    items without the value (e.g. scored by NLL but not generated) are left out; empty when absent."""
    path = eval_dir / name / "items" / f"{task}.jsonl"
    if not path.is_file():
        return {}
    return {str(r["id"]): float(r[key]) for _, r in jsonl_records(path) if r.get(key) is not None}


def item_verdicts(eval_dir: Path, name: str, task: str) -> dict[str, bool]:
    """Item id -> correct (see `item_values`)."""
    return {i: bool(v) for i, v in item_values(eval_dir, name, task).items()}
