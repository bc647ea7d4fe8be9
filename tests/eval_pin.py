"""A small, fixed evaluation set for pinning `pkt eval`'s records and metrics across refactors.

`tests/data/eval_pin/` holds a few public rows of each task (MMLU, GSM8K, HumanEval, MBPP test sets;
dev rows of the MMLU and GSM8K transfer splits); MBPP's other test ids get a one-line synthetic problem. `pin_data_dir` lays them out as a data folder, with
the first MMLU item planted in a transfer split so decontamination drops it, and every transfer
split a shared data folder would add shadowed by an empty file: the result depends on these files only.
`expected_eval.json` was recorded from commit eba3d12 (before the task registry), by `record`.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PIN = Path(__file__).resolve().parent / "data" / "eval_pin"
EXPECTED = PIN / "expected_eval.json"
TASKS = ("mmlu", "gsm8k", "humaneval", "mbpp", "dev")
VOLATILE = ("seconds", "peak_rss_gib")
"""Metrics keys that measure the machine, not the model."""


def pin_data_dir(root: Path) -> Path:
    from pkt_pipeline.datasets import transfer_split_files
    from pkt_pipeline.evaluation.mmlu import load_mmlu, mmlu_prompt

    root.mkdir(parents=True, exist_ok=True)
    for source, target in (("mmlu.jsonl", "mmlu/test.jsonl"), ("gsm8k.jsonl", "gsm8k/test.jsonl"),
                           ("mbpp.jsonl", "mbpp/mbpp.jsonl"), ("dev.jsonl", "dev.jsonl")):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PIN / source, root / target)
    with open(root / "mbpp" / "mbpp.jsonl", "a") as handle:  # the loader wants the whole test split, 11-510
        for task_id in range(14, 511):
            handle.write(json.dumps({"task_id": task_id, "text": f"Write a function that adds {task_id} to a number.",
                                     "code": f"def add_{task_id}(x):\n    return x + {task_id}",
                                     "test_list": [f"assert add_{task_id}(1) == {task_id + 1}"], "test_setup_code": ""}) + "\n")
    (root / "humaneval").mkdir(exist_ok=True)
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as handle:
        handle.write((PIN / "humaneval.jsonl").read_text())
    planted = load_mmlu(root / "mmlu" / "test.jsonl")[0]
    row = {"id": "planted", "messages": [{"role": "user", "content": mmlu_prompt(planted)},
                                         {"role": "assistant", "content": "The answer is: A"}]}
    (root / "transfer-splits" / "mmlu").mkdir(parents=True, exist_ok=True)
    (root / "transfer-splits" / "mmlu" / "train.jsonl").write_text(json.dumps(row) + "\n")
    for path in transfer_split_files(root):
        shadow = root / "transfer-splits" / path.parent.name / path.name
        if not shadow.exists():
            shadow.parent.mkdir(parents=True, exist_ok=True)
            shadow.write_text("")
    return root


def pin_overrides(data_dir: Path, out: Path, tasks: tuple[str, ...] = TASKS) -> list[str]:
    return [f"assets.data_dir={data_dir}", f"eval.out={out}", f"eval.tasks=[{', '.join(tasks)}]",
            f"eval.dev_data=[{data_dir / 'dev.jsonl'}]", "eval.limit=2", "eval.nll_limit=3",
            "eval.max_new_tokens_gsm8k=12", "eval.max_new_tokens_code=12", "eval.timeout_s=5",
            "runtime.dtype=float32"]


def eval_result(out: Path, tasks: tuple[str, ...] = TASKS) -> dict:
    """metrics.json without the machine's measurements, and every task's item records."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics = {key: ({k: v for k, v in value.items() if k not in VOLATILE} if isinstance(value, dict) else value)
               for key, value in metrics.items() if key not in VOLATILE}
    metrics["model"] = Path(metrics["model"]).name
    items = {task: [json.loads(line) for line in (out / "items" / f"{task}.jsonl").read_text().splitlines()]
             for task in tasks}
    return {"metrics": metrics, "items": items}


def run_cli_eval(student: Path, data_dir: Path, out: Path, cwd: Path, tasks: tuple[str, ...] = TASKS) -> dict:
    """`pkt eval` in a subprocess of the code at `cwd` (so an old checkout can be run too)."""
    command = [sys.executable, "-m", "pkt_pipeline.cli", "eval", str(student), "--no-progress"]
    for override in pin_overrides(data_dir, out, tasks):
        command += ["--set", override]
    result = subprocess.run(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)},
                            capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(f"pkt eval failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return eval_result(out, tasks)


def record(code_root: str, work: str) -> None:
    """`python tests/eval_pin.py CODE_ROOT WORK`: run the code at CODE_ROOT and write EXPECTED."""
    from pkt_pipeline.tiny_models import save_tiny_pair

    work_dir = Path(work)
    pair = save_tiny_pair(work_dir / "tiny")
    result = run_cli_eval(pair["student"], pin_data_dir(work_dir / "data"), work_dir / "eval", Path(code_root))
    EXPECTED.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record(*sys.argv[1:3])
