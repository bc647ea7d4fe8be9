"""`pkt report`: one table and one chart that compare every method with the teacher and the student.

Reads `EVAL_DIR/<name>/metrics.json` as written by `pkt eval` (`teacher` and `student` are the
reference rows; every other folder is a method) and, when present, `RUNS_DIR/<name>/metrics.json`
of `pkt align` and `METRICS_DIR/*.json` of the other stages for wall time and peak memory. Writes
`OUT/report.md`, `OUT/scores.png` and `OUT/report.json`.

Gap closed = (method − student) / (teacher − student): the share of the teacher's lead that the
transfer recovered (METHOD.md §3); it is left blank where teacher and student tie.
"""

from __future__ import annotations

import json
from pathlib import Path

REFERENCES = ("teacher", "student")


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
            value = scores[name][task]["score"]
            student, teacher = scores["student"][task]["score"], scores["teacher"][task]["score"]
            row["scores"][task] = {"score": value, "n": scores[name][task]["n"],
                                   "delta": value - student if name != "student" else None,
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
            text = f"{100 * cell['score']:.1f} (n={cell['n']})"
            if cell["delta"] is not None:
                text += f", {100 * cell['delta']:+.1f}"
            if cell["gap_closed"] is not None:
                text += f", gap closed {100 * cell['gap_closed']:.0f}%"
            cells.append(text)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Scores in %; for each method: the change from the student, and the share of the teacher–student",
              "gap it closed.", "", "| stage | wall time (s) | peak RSS (GiB) |", "|---|---|---|"]
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
        axis.bar([i + index * width for i in range(len(tasks))], values, width, label=row["name"])
    axis.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(tasks))], tasks)
    axis.set_ylabel("score (%)")
    axis.legend(fontsize=8, ncols=min(len(rows), 4))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
