"""`pkt report`: tables and a chart that compare every method with the teacher and the student,
and the methods with each other.

Reads `EVAL_DIR/<name>/metrics.json` and `EVAL_DIR/<name>/items/<task>.jsonl` as written by
`pkt eval` (`teacher` and `student` are the reference rows; every other folder is a method; the teacher's folder
may be another benchmark's, `--teacher-eval`, when it scored the same items) and,
when present, `RUNS_DIR/<name>/metrics.json` of `pkt align` and `METRICS_DIR/*.json` of the other
stages for wall time and peak memory. Writes `OUT/report.md`, `OUT/scores.png`, `OUT/report.json`.

Every task has two metrics: accuracy (the headline, as in the papers) and a continuous one read
from the same items (MMLU: `p_correct`, the correct letter's probability over the four letters;
GSM8K/HumanEval/MBPP: `nll`, the reference reply's mean NLL per token, lower is better). The
continuous metric moves with every change of belief, so it resolves far smaller changes at the
item counts a CPU can afford.

Noise is stated, never left to the reader: each value carries the half-width of its 95% interval
(normal approximation), each change from the student and each method-vs-method difference the 95%
interval of the *paired* difference over the items both runs scored (much tighter than two
independent intervals, since both saw the same items). Gap closed = (method − student) /
(teacher − student), the share of the teacher's lead the transfer recovered (METHOD.md §3), blank
where they tie. The resolution table says what this run could detect at all: the median paired
half-width of method − student per metric (a change below it is not resolved at this n).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pkt_pipeline.evaluation.records import ACCURACY, METRICS, Metric, item_values, metric_for
from pkt_pipeline.evaluation.stats import mean_half_width, paired_difference, score_half_width

REFERENCES = ("teacher", "student")
RESOLUTION_TARGET = 0.015
"""The paired half-width a transfer benchmark aims for on a % metric (1.5 points); the resolution table
says how many items would reach it, from the spread this run measured."""
DEFAULT_COMPARISONS = (("semalign", "kd"), ("semalign", "lora-sft"), ("kd", "lora-sft"),
                       ("semalign", "semalign-kl-only"),
                       ("uld", "lora-sft"), ("alm", "lora-sft"), ("semalign-xvocab", "lora-sft"),
                       ("semalign-xvocab", "alm"), ("semalign-xvocab", "uld"), ("alm", "uld"))
"""The comparisons the papers argue about, and the ablation that says whether SemAlign's layer term helps; across
tokenizers, each method against the control and against the cheaper methods it builds on (semalign-xvocab's output
term is alm's; alm and uld are the published baselines). A pair is skipped where either method is absent."""


def metrics_of(task: str, scored: dict) -> tuple[Metric, ...]:
    """Accuracy and the task's continuous values, as `pkt eval` listed them in the student's metrics
    (`continuous`); results written before it listed them show the known metrics they hold."""
    keys = scored.get("continuous") or [key for key in METRICS if key != ACCURACY.key and key in scored]
    return (ACCURACY, *(metric_for(key) for key in keys))


def report_metrics(report: dict, task: str) -> tuple[Metric, ...]:
    return tuple(metric_for(key) for key in report["metrics"][task])


def scored_tasks(metrics: dict) -> list[str]:
    """The tasks of a `metrics.json`, in the order `pkt eval` scored them (a task's entry has `score`)."""
    return [task for task, value in metrics.items() if isinstance(value, dict) and "score" in value]


def gap_closed(method: float, student: float, teacher: float) -> float | None:
    return None if teacher == student else (method - student) / (teacher - student)


@dataclass(frozen=True)
class ReportConfig:
    """What `pkt report` reads and writes. Its own settings, not a `PktConfig` section: the report reads
    only result folders, so it does not depend on (or rerun for) the pipeline's config."""

    eval_dir: str | Path = "eval"
    out: str | Path = "report"
    runs_dir: str | Path = "runs"
    metrics_dir: str | Path = "metrics"
    comparisons: tuple[tuple[str, str], ...] = DEFAULT_COMPARISONS
    """(A, B) method pairs for A − B, skipped where either is absent."""
    teacher_eval: str | Path | None = None
    """The teacher's `pkt eval` folder when it is not `EVAL_DIR/teacher`: another benchmark's evaluation of the same
    teacher on the same items (the costliest evaluation, made once). Refused unless it scored exactly the student's
    items of every task, so the gap is paired over the same questions."""


def run(config: ReportConfig, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Build the report (`progress` is accepted for the stages' common signature: nothing here takes long)."""
    eval_dir, out = Path(config.eval_dir), Path(config.out)
    folders = {path.parent.name: path.parent for path in sorted(eval_dir.glob("*/metrics.json"))}
    if config.teacher_eval is not None:
        folders["teacher"] = _reused_teacher(Path(config.teacher_eval), folders)
    scores = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in folders.items()}
    # Every change is paired against the student, so it is required; the teacher only sets the gap
    # closed, and a dev grid is worth reading before the teacher's costly scores exist.
    if "student" not in scores:
        raise FileNotFoundError(f"{eval_dir} lacks student/metrics.json: evaluate the student first "
                                f"(pkt eval STUDENT ... --out {eval_dir}/student)")
    tasks = scored_tasks(scores["student"])
    metrics = {task: metrics_of(task, scores["student"][task]) for task in tasks}
    methods = [name for name in scores if name not in REFERENCES]
    values = {(name, task, metric.key): item_values(folders[name].parent, folders[name].name, task, metric.key)
              for name in scores for task in tasks for metric in metrics[task]}
    if config.teacher_eval is not None:
        _check_same_items(values, tasks, metrics, folders)
    rows = []
    for name in [*(r for r in REFERENCES if r in scores), *methods]:
        row = {"name": name, "scores": {}}
        for task in tasks:
            if task not in scores[name]:
                continue
            row["scores"][task] = {metric.name: _cell(scores, values, name, task, metric)
                                   for metric in metrics[task]}
            row["scores"][task] = {k: v for k, v in row["scores"][task].items() if v is not None}
        rows.append(row)
    pairs = [(a, b) for a, b in config.comparisons if a in scores and b in scores]
    compared = []
    for a, b in pairs:
        for task in tasks:
            for metric in metrics[task]:
                difference = paired_difference(values[(a, task, metric.key)], values[(b, task, metric.key)])
                if difference:
                    compared.append({"a": a, "b": b, "task": task, "metric": metric.name, **difference})
    report = {"tasks": tasks, "metrics": {task: [metric.key for metric in metrics[task]] for task in tasks},
              "rows": rows, "has_teacher": "teacher" in scores, "comparisons": compared,
              "resolution": _resolution(rows, metrics),
              "stages": _stage_costs(scores, Path(config.runs_dir), Path(config.metrics_dir),
                                     reused={"teacher": folders["teacher"]} if config.teacher_eval is not None else {})}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    _chart(report, out / "scores.png")
    echo(f"wrote {out / 'report.md'} and {out / 'scores.png'}")
    return report


def _reused_teacher(folder: Path, folders: dict[str, Path]) -> Path:
    if not (folder / "metrics.json").is_file():
        raise FileNotFoundError(f"--teacher-eval {folder} holds no metrics.json: evaluate the teacher there first "
                                f"(pkt eval TEACHER ... --out {folder})")
    if "teacher" in folders:
        raise ValueError(f"two teacher evaluations: {folders['teacher']} and --teacher-eval {folder}; keep one")
    return folder


def _check_same_items(values: dict, tasks: list[str], metrics: dict[str, tuple[Metric, ...]],
                      folders: dict[str, Path]) -> None:
    """A teacher evaluated elsewhere must have scored exactly the student's items: its gap and the gap closed are
    then over the same questions, as when both ran under one config."""
    for task in tasks:
        for metric in metrics[task]:
            teacher, student = values[("teacher", task, metric.key)], values[("student", task, metric.key)]
            if set(teacher) != set(student):
                common = len(set(teacher) & set(student))
                raise ValueError(
                    f"the teacher's evaluation {folders['teacher']} scored other {task} items ({metric.name}) than the "
                    f"student's {folders['student']}: {common} in common of {len(teacher)} and {len(student)}. Evaluate "
                    "both with the same `eval` section (tasks, limit, seed, decontamination)")


def _cell(scores: dict, values: dict, name: str, task: str, metric: Metric) -> dict | None:
    """One model's value of one metric: mean, n, 95% half-width, change from the student (paired), gap closed."""
    mine = values[(name, task, metric.key)]
    if metric is ACCURACY:
        value, n = scores[name][task].get("score"), scores[name][task].get("n", 0)
        if value is None or not n:
            return None
        half = score_half_width(value, n)
    else:
        if not mine:
            return None
        value, n, half = sum(mine.values()) / len(mine), len(mine), mean_half_width(list(mine.values()))
    cell = {"value": value, "n": n, "half_width_95": half, "delta": None, "delta_interval_95": None, "gap_closed": None}
    if name == "student":
        return cell
    student = _mean(scores, values, "student", task, metric)
    teacher = _mean(scores, values, "teacher", task, metric)
    if student is not None:
        cell["delta"] = value - student
        difference = paired_difference(mine, values[("student", task, metric.key)])
        if difference:
            cell["delta"], cell["delta_interval_95"] = difference["mean"], difference["interval_95"]
            cell["delta_half_width_95"] = difference["half_width_95"]
    if name not in REFERENCES and student is not None and teacher is not None:
        cell["gap_closed"] = gap_closed(value, student, teacher)
    return cell


def _mean(scores: dict, values: dict, name: str, task: str, metric: Metric) -> float | None:
    if metric is ACCURACY:
        return scores.get(name, {}).get(task, {}).get("score")
    mine = values.get((name, task, metric.key))
    return sum(mine.values()) / len(mine) if mine else None


def _resolution(rows: list[dict], metrics: dict[str, tuple[Metric, ...]]) -> list[dict]:
    """Per task and metric: the median, over methods (and the teacher when there is no method), of
    the paired 95% half-width of model − student: the smallest change this run resolves."""
    resolution = []
    for task, task_metrics in metrics.items():
        for metric in task_metrics:
            cells = {row["name"]: row["scores"].get(task, {}).get(metric.name) for row in rows}
            halves = [c["delta_half_width_95"] for name, c in cells.items()
                      if c and c.get("delta_half_width_95") is not None and name not in REFERENCES]
            if not halves and cells.get("teacher") and cells["teacher"].get("delta_half_width_95") is not None:
                halves = [cells["teacher"]["delta_half_width_95"]]
            if halves:
                n, half = next(c["n"] for c in cells.values() if c), statistics.median(halves)
                entry = {"task": task, "metric": metric.name, "n": n, "paired_half_width_95": half}
                if metric.percent and half > 0:  # the half-width shrinks as 1/sqrt(n)
                    entry["n_for_target"] = math.ceil(n * (half / RESOLUTION_TARGET) ** 2)
                resolution.append(entry)
    return resolution


def _stage_costs(scores: dict, runs_dir: Path, metrics_dir: Path, reused: dict[str, Path]) -> list[dict]:
    """Each stage's wall time and peak memory; an evaluation `reused` from another folder is named with it (its
    cost was paid there, once)."""
    costs = [{"stage": path.stem, **_cost(json.loads(path.read_text()))} for path in sorted(metrics_dir.glob("*.json"))]
    costs += [{"stage": f"align {path.parent.name}", **_cost(json.loads(path.read_text()))}
              for path in sorted(runs_dir.glob("*/metrics.json"))]
    costs += [{"stage": f"evaluate {name}" + (f" (reused: {reused[name]})" if name in reused else ""), **_cost(metrics)}
              for name, metrics in scores.items()]
    return costs


def _cost(metrics: dict) -> dict:
    return {"seconds": metrics.get("seconds"), "peak_rss_gib": metrics.get("peak_rss_gib")}


def _metric(report: dict, task: str, name: str) -> Metric:
    return next(metric for metric in report_metrics(report, task) if metric.name == name)


def _unit(metric: Metric) -> str:
    """A column heading's unit: `(%)`, `(nats/token, lower is better)`, ..."""
    words = ["%" if metric.percent else metric.unit, "" if metric.higher_is_better else "lower is better"]
    shown = ", ".join(word for word in words if word)
    return f" ({shown})" if shown else ""


def _number(metric: Metric, value: float, signed: bool = False) -> str:
    scale, digits = (100, 1) if metric.percent else (1, 3)
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


def _markdown(report: dict) -> str:
    lines = []
    for task in report["tasks"]:
        metrics = list(report_metrics(report, task))
        present = [m for m in metrics if any(m.name in row["scores"].get(task, {}) for row in report["rows"])]
        lines += [f"### {task}", "", "| model | " + " | ".join(
            f"{m.name}{_unit(m)} | change from student | gap closed"
            for m in present) + " |", "|---|" + "---|---|---|" * len(present)]
        for row in report["rows"]:
            cells = []
            for metric in present:
                cell = row["scores"].get(task, {}).get(metric.name)
                if cell is None:
                    cells += ["–", "–", "–"]
                    continue
                value = _number(metric, cell["value"]) + (f" ±{_number(metric, cell['half_width_95'])}"
                                                          if cell["half_width_95"] is not None else "") + f" (n={cell['n']})"
                change = "–" if cell["delta"] is None else _number(metric, cell["delta"], signed=True)
                if cell["delta_interval_95"] is not None:
                    low, high = cell["delta_interval_95"]
                    change += f" [{_number(metric, low, True)}, {_number(metric, high, True)}]"
                gap = "–" if cell["gap_closed"] is None else f"{100 * cell['gap_closed']:.0f}%"
                cells += [value, change, gap]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Values with the half-width of their 95% interval; the change from the student with its 95% interval",
              "paired over the same items (an interval spanning 0 is no measured change at this n); for each method",
              "the share of the teacher–student gap it closed."]
    if not report.get("has_teacher", True):
        lines += ["", "No teacher scores in this folder: the gap closed needs `pkt eval TEACHER ... --out <eval>/teacher`."]
    if report["comparisons"]:
        lines += ["", "### Methods against each other (A − B, paired over the same items)", "",
                  "| A − B | task | metric | difference [95% interval] | n |", "|---|---|---|---|---|"]
        for c in report["comparisons"]:
            metric = _metric(report, c["task"], c["metric"])
            low, high = c["interval_95"]
            lines.append(f"| {c['a']} − {c['b']} | {c['task']} | {c['metric']} | {_number(metric, c['mean'], True)} "
                         f"[{_number(metric, low, True)}, {_number(metric, high, True)}] | {c['n']} |")
    if report["resolution"]:
        lines += ["", "### Resolution: the smallest change from the student this run can see", "",
                  "| task | metric | n | paired 95% half-width (median over methods) | items for ±1.5 points |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['metric']} | {r['n']} | ±{_number(_metric(report, r['task'], r['metric']), r['paired_half_width_95'])} "
                  f"| {r.get('n_for_target', '–')} |" for r in report["resolution"]]
    lines += ["", "| stage | wall time (s) | peak RSS (GiB) |", "|---|---|---|"]
    lines += [f"| {c['stage']} | {c['seconds'] if c['seconds'] is not None else '–'} | "
              f"{c['peak_rss_gib'] if c['peak_rss_gib'] is not None else '–'} |" for c in report["stages"]]
    return "\n".join(lines) + "\n"


def _chart(report: dict, path: Path) -> None:
    """One panel per (task, metric): every model's value with its 95% error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, metric) for task in report["tasks"] for metric in report_metrics(report, task)
              if any(metric.name in row["scores"].get(task, {}) for row in report["rows"])]
    rows = report["rows"]
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(max(4.5, 0.5 * len(rows)) * max(len(panels), 1), 3.6),
                                squeeze=False)
    for axis, (task, metric) in zip(axes[0], panels):
        scale = 100 if metric.percent else 1
        names = [row["name"] for row in rows if metric.name in row["scores"].get(task, {})]
        cells = [row["scores"][task][metric.name] for row in rows if metric.name in row["scores"].get(task, {})]
        axis.bar(range(len(cells)), [scale * c["value"] for c in cells],
                 yerr=[scale * (c["half_width_95"] or 0) for c in cells], capsize=3, error_kw={"linewidth": 0.8},
                 color=[f"C{i}" for i in range(len(cells))])
        axis.set_xticks(range(len(cells)), names, rotation=35, ha="right", fontsize=8)
        axis.set_title(f"{task}: {metric.name}" + ("" if metric.higher_is_better else " (lower is better)"), fontsize=9)
        axis.set_ylabel("%" if metric.percent else metric.unit)
        if not metric.higher_is_better:
            low = min(scale * (c["value"] - (c["half_width_95"] or 0)) for c in cells)
            axis.set_ylim(bottom=max(0.0, 0.9 * low))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
