"""Figures written next to the numbers they show (a PNG per run; DVC plots read the JSONL too)."""

from __future__ import annotations

from pathlib import Path

LOG_META = {"step", "phase", "phase_step", "lr", "tokens", "seconds", "grad_norm"}


def plot_training_log(entries: list[dict], path: str | Path, title: str = "") -> Path:
    """Every logged loss part against the global step, phases shaded and named (frontier stages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [key for key in entries[0] if key not in LOG_META] if entries else []
    figure, axes = plt.subplots(len(parts) or 1, 1, figsize=(9, 2.2 * max(len(parts), 1)), sharex=True, squeeze=False)
    steps = [entry["step"] for entry in entries]
    boundaries = [(entry["phase"], entry["step"]) for i, entry in enumerate(entries)
                  if i == 0 or entry["phase"] != entries[i - 1]["phase"]]
    for axis, part in zip(axes[:, 0], parts):
        axis.plot(steps, [entry.get(part, float("nan")) for entry in entries], marker=".", linewidth=1)
        axis.set_ylabel(part)
        for phase, start in boundaries:
            axis.axvline(start - 0.5, color="grey", linewidth=0.5)
            if axis is axes[0, 0] and len(boundaries) > 1:
                axis.text(start - 0.4, 1.0, phase, transform=axis.get_xaxis_transform(), fontsize=7, va="bottom")
    axes[-1, 0].set_xlabel("step")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)
