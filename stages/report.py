"""`pkt report`: one table and one chart that compare every method with the teacher and the student.

Reads `EVAL_DIR/<name>/metrics.json` as written by `pkt eval` (`teacher` and `student` are the
reference rows; every other folder is a method) and, when present, `RUNS_DIR/<name>/metrics.json`
of `pkt align` and `METRICS_DIR/*.json` of the other stages for wall time and peak memory. Writes
`OUT/report.md`, `OUT/scores.png` and `OUT/report.json`.

Gap closed = (method − student) / (teacher − student): the share of the teacher's lead that the
transfer recovered (METHOD.md §3); it is left blank where teacher and student tie.

Small seeded subsets make every score noisy, so the report says how noisy: each score carries the
half-width of its 95% interval (normal approximation), and each change from the student the 95%
interval of the *paired* difference over the items both models answered (`items/<task>.jsonl`),
which is much tighter than comparing two independent intervals, since both saw the same questions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REFERENCES = ("teacher", "student")
Z95 = 1.959964


def score_half_width(score: float, n: int) -> float | None:
    """Half-width of the 95% normal-approximation interval of an accuracy over n items."""
    return Z95 * math.sqrt(score * (1 - score) / n) if n else None


def paired_change_interval(model: dict[str, bool], reference: dict[str, bool]) -> tuple[float, float] | None:
    """95% interval of mean(model correct − reference correct) over the item ids both answered; None
    when they share fewer than two items."""
    shared = sorted(model.keys() & reference.keys())
    if len(shared) < 2:
        return None
    differences = [float(model[i]) - float(reference[i]) for i in shared]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    half = Z95 * math.sqrt(variance / len(differences))
    return mean - half, mean + half


def item_verdicts(eval_dir: Path, name: str, task: str) -> dict[str, bool]:
    """Item id -> correct, from `pkt eval`'s `EVAL_DIR/NAME/items/TASK.jsonl`; empty when absent."""
    path = eval_dir / name / "items" / f"{task}.jsonl"
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {str(record["id"]): bool(record["correct"]) for record in records}


def gap_closed(method: float, student: float, teacher: float) -> float | None:
    return None if teacher == student else (method - student) / (teacher - student)


def run(eval_dir: str | Path, out: str | Path, runs_dir: str | Path = "runs", metrics_dir: str | Path = "metrics",
        echo=print) -> dict:
    eval_dir, out = Path(eval_dir), Path(out)
    scores = {path.parent.name: json.loads(path.read_text()) for path in sorted(eval_dir.glob("*/metrics.json"))}
    missing = [name for name in REFERENCES if name not in scores]
    if missing:
        raise FileNotFoundError(f"{eval_dir} lacks {', '.join(f'{m}/metrics.json' for m in missing)}: "
                                "evaluate the teacher and the student first (pkt eval ... --out "
                                f"{eval_dir}/teacher)")
    tasks = [task for task in ("mmlu", "gsm8k", "humaneval", "mbpp") if task in scores["student"]]
    methods = [name for name in scores if name not in REFERENCES]
    rows = []
    for name in [*REFERENCES, *methods]:
        row = {"name": name, "scores": {}}
        for task in tasks:
            if task not in scores[name]:
                continue
            value, n = scores[name][task]["score"], scores[name][task]["n"]
            student, teacher = scores["student"][task]["score"], scores["teacher"][task]["score"]
            interval = None if name == "student" else paired_change_interval(
                item_verdicts(eval_dir, name, task), item_verdicts(eval_dir, "student", task))
            row["scores"][task] = {"score": value, "n": n, "score_half_width_95": score_half_width(value, n),
                                   "delta": value - student if name != "student" else None,
                                   "delta_interval_95": list(interval) if interval else None,
                                   "gap_closed": gap_closed(value, student, teacher) if name not in REFERENCES else None}
        rows.append(row)
    costs = _stage_costs(scores, Path(runs_dir), Path(metrics_dir))
    out.mkdir(parents=True, exist_ok=True)
    report = {"tasks": tasks, "rows": rows, "stages": costs}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    _chart(report, out / "scores.png")
    echo(f"wrote {out / 'report.md'} and {out / 'scores.png'}")
    return report


def _stage_costs(scores: dict, runs_dir: Path, metrics_dir: Path) -> list[dict]:
    costs = [{"stage": path.stem, **_cost(json.loads(path.read_text()))} for path in sorted(metrics_dir.glob("*.json"))]
    costs += [{"stage": f"align {path.parent.name}", **_cost(json.loads(path.read_text()))}
              for path in sorted(runs_dir.glob("*/metrics.json"))]
    costs += [{"stage": f"evaluate {name}", **_cost(metrics)} for name, metrics in scores.items()]
    return costs


def _cost(metrics: dict) -> dict:
    return {"seconds": metrics.get("seconds"), "peak_rss_gib": metrics.get("peak_rss_gib")}


def _markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in report["rows"]:
        cells = []
        for task in tasks:
            cell = row["scores"].get(task)
            if cell is None:
                cells.append("–")
                continue
            spread = cell["score_half_width_95"]
            text = f"{100 * cell['score']:.1f}" + (f" ±{100 * spread:.1f}" if spread is not None else "") + f" (n={cell['n']})"
            if cell["delta"] is not None:
                text += f", {100 * cell['delta']:+.1f}"
                if cell["delta_interval_95"] is not None:
                    low, high = cell["delta_interval_95"]
                    text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
            if cell["gap_closed"] is not None:
                text += f", gap closed {100 * cell['gap_closed']:.0f}%"
            cells.append(text)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Scores in % with the half-width of their 95% interval; for each model: the change from the student",
              "with its 95% interval paired over the same items (an interval spanning 0 is no measured change at",
              "this n), and for each method the share of the teacher–student gap it closed.", "", "| stage | wall time (s) | peak RSS (GiB) |", "|---|---|---|"]
    lines += [f"| {c['stage']} | {c['seconds'] if c['seconds'] is not None else '–'} | "
              f"{c['peak_rss_gib'] if c['peak_rss_gib'] is not None else '–'} |" for c in report["stages"]]
    return "\n".join(lines) + "\n"


def _chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = report["tasks"], report["rows"]
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(rows) * len(tasks)), 3.5))
    width = 0.8 / max(len(rows), 1)
    for index, row in enumerate(rows):
        values = [100 * row["scores"][t]["score"] if t in row["scores"] else 0 for t in tasks]
        errors = [100 * (row["scores"][t]["score_half_width_95"] or 0) if t in row["scores"] else 0 for t in tasks]
        axis.bar([i + index * width for i in range(len(tasks))], values, width, yerr=errors, capsize=3,
                 error_kw={"linewidth": 0.8}, label=row["name"])
    axis.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(tasks))], tasks)
    axis.set_ylabel("score (%)")
    axis.legend(fontsize=8, ncols=min(len(rows), 4))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
