"""95% intervals of evaluation scores: of an accuracy, of a mean, and of a paired difference over the
items two runs both scored (normal approximation throughout; `pkt report` states every value with one)."""

from __future__ import annotations

import math
import statistics

Z95 = 1.959964


def score_half_width(score: float, n: int) -> float | None:
    """Half-width of the 95% normal-approximation interval of an accuracy over n items."""
    return Z95 * math.sqrt(score * (1 - score) / n) if n else None


def mean_half_width(values: list[float]) -> float | None:
    """Half-width of the 95% normal-approximation interval of a mean."""
    return Z95 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else None


def paired_difference(model: dict[str, float], reference: dict[str, float]) -> dict | None:
    """mean(model − reference) over the item ids both scored, with its 95% interval; None when they
    share fewer than two items. {"mean", "interval_95": [low, high], "half_width_95", "n"}."""
    shared = sorted(model.keys() & reference.keys())
    if len(shared) < 2:
        return None
    differences = [float(model[i]) - float(reference[i]) for i in shared]
    mean = sum(differences) / len(differences)
    half = mean_half_width(differences)
    return {"mean": mean, "interval_95": [mean - half, mean + half], "half_width_95": half, "n": len(shared)}


def paired_change_interval(model: dict[str, float], reference: dict[str, float]) -> tuple[float, float] | None:
    """The 95% interval of `paired_difference`, or None."""
    difference = paired_difference(model, reference)
    return tuple(difference["interval_95"]) if difference else None
