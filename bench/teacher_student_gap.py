"""The gap every method is judged against: the untouched teacher and student on seeded subsets of
the decontaminated test sets, with each score's 95% interval and the teacher − student difference's
95% interval paired over the same items (`stages/report.py`).

Runs `pkt eval` once per model and task group (MMLU is cheap, generation is not, so each has its
own `--limit`) into `OUT/<model>-<group>/`; with `--reuse` an evaluation whose metrics.json exists
is read, not rerun.

    python bench/teacher_student_gap.py --mmlu-limit 400 --generation-limit 40

Writes `bench/results/teacher_student_gap.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pkt_pipeline.models import cpu_facts
from pkt_pipeline.evaluation.stats import paired_change_interval, score_half_width
from pkt_pipeline.evaluation.records import item_verdicts

GROUPS = {"mmlu": ["mmlu"], "gen": ["gsm8k", "humaneval"]}


def evaluate(model: str, group: str, limit: int, out: Path, config: str, reuse: bool) -> Path:
    folder = out / f"{Path(model).name}-{group}"
    if not (reuse and (folder / "metrics.json").is_file()):
        subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "eval", model, "--config", config,
                        "--tasks", ",".join(GROUPS[group]), "--limit", str(limit), "--out", str(folder)], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--student", default="models/qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--mmlu-limit", type=int, default=400)
    parser.add_argument("--generation-limit", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gap"))
    parser.add_argument("--reuse", action="store_true", help="read evaluations already in --out instead of rerunning")
    parser.add_argument("--json", type=Path, default=Path("bench/results/teacher_student_gap.json"))
    args = parser.parse_args()

    limits = {"mmlu": args.mmlu_limit, "gen": args.generation_limit}
    rows = []
    for group, tasks in GROUPS.items():
        folders = {role: evaluate(model, group, limits[group], args.out, args.config, args.reuse)
                   for role, model in (("teacher", args.teacher), ("student", args.student))}
        written = {role: json.loads((folder / "metrics.json").read_text()) for role, folder in folders.items()}
        for task in tasks:
            metrics = {role: written[role][task] for role in folders}
            verdicts = {role: item_verdicts(folder.parent, folder.name, task) for role, folder in folders.items()}
            rows.append({"task": task, "n": metrics["teacher"]["n"], "dropped": metrics["teacher"]["dropped"],
                         **{role: {"score": m["score"], "half_width_95": score_half_width(m["score"], m["n"]),
                                   "seconds": m.get("seconds")}
                            for role, m in metrics.items()},
                         "difference": metrics["teacher"]["score"] - metrics["student"]["score"],
                         "difference_interval_95": paired_change_interval(verdicts["teacher"], verdicts["student"])})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"teacher": args.teacher, "student": args.student, "cpu": cpu_facts(), "tasks": rows}, indent=2) + "\n")
    print("| task | n | dropped | teacher | student | teacher - student [paired 95%] |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        low, high = row["difference_interval_95"]
        print(f"| {row['task']} | {row['n']} | {row['dropped']} | {100 * row['teacher']['score']:.1f} "
              f"±{100 * row['teacher']['half_width_95']:.1f} | {100 * row['student']['score']:.1f} "
              f"±{100 * row['student']['half_width_95']:.1f} | {100 * row['difference']:+.1f} "
              f"[{100 * low:+.1f}, {100 * high:+.1f}] |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
