"""`pkt eval`: score one model on MMLU, GSM8K, HumanEval and MBPP, or on dev rows for tuning.

Writes `OUT/metrics.json` ({task: {score, n, dropped, ...}}) and, per task, `OUT/items/<task>.jsonl`
with one record a person can read per item (prompt, output, verdict). The tasks are registered in
`pkt_pipeline/evaluation/tasks.py` (a plug-in adds one there, not here); their prompts live in
`pkt_pipeline/evaluation/` next to their scorers:

- MMLU, 0-shot: the log-likelihood of the answer letters after the question (`mmlu.py`); accuracy
  and, continuous, `p_correct`: the correct letter's probability renormalised over the four;
- GSM8K, 0-shot greedy: exact match of the final number (`gsm8k.py`);
  greedy generation (`generation.py`) is pkt's own batched loop: a row leaves the batch, and the
  next prompt takes its slot, as soon as it ends (EOS, `max_new_tokens`, or its task's stop rule:
  the code block closed, the GSM8K answer paragraph finished);
- HumanEval and MBPP (task_ids 11-510), pass@1 with greedy decoding, the code run only in the
  sandbox (`sandbox.py`: its own mount, PID and network namespaces, a read-only file system with a
  size-capped tmpfs work folder, an unprivileged uid, process/memory/CPU/file limits);
- and for these three, continuous: `nll`, the teacher-forced mean NLL per token of the reference
  reply (`reference_nll.py`), on `eval.nll_limit` items (one forward each, so many more than are
  generated) that contain the `eval.limit` generated ones.

- `dev`: rows of the transfer splits (`eval.dev_data`, e.g. `mmlu/align`), never test items: the NLL
  of each reply and, for MMLU rows, p_correct (`dev.py`); hyperparameters are chosen on these.

Accuracy is the headline, as in the papers; the continuous metrics are what separate two models at
the item counts a CPU can afford. Every record keeps its item id and values, so any two runs can be
paired afterwards (`pkt report`).

Test items that appear in the transfer splits (the data any student was trained on) are dropped
first and counted (`dropped`), then `eval.limit` picks a seeded subset for quick runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pkt_pipeline.config import ConfigError, PktConfig, to_dict
from pkt_pipeline.evaluation.journal import Journal, model_fingerprint
from pkt_pipeline.evaluation.tasks import Task, available_tasks, drop_contaminated, get_task
from pkt_pipeline.models import load_model, load_tokenizer, peak_rss_gib

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def run(config: PktConfig, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Score `eval.model` on every task of `eval.tasks`; returns what metrics.json holds."""
    cfg = config.eval
    if not cfg.model:
        raise ConfigError("eval.model is empty: name the model to score (pkt eval MODEL)")
    registered = available_tasks()
    unknown = sorted(set(cfg.tasks) - set(registered))
    if unknown or not cfg.tasks:
        raise ValueError(f"eval.tasks must be a non-empty subset of {registered}; unknown: {unknown}")
    started = time.perf_counter()
    tasks = [get_task(name) for name in cfg.tasks]
    items = {task.name: task.load(config.assets.data_dir, cfg) for task in tasks}  # data errors before the model loads
    if any(task.runs_code for task in tasks):
        from pkt_pipeline.evaluation.sandbox import sandbox_mode

        sandbox_mode()  # a machine that cannot sandbox code says so now, not after an hour of generation
    model_name = cfg.model
    tokenizer = load_tokenizer(model_name, trust_remote_code=config.runtime.trust_remote_code)
    runtime = config.runtime
    model = load_model(model_name, dtype=runtime.dtype, device=runtime.device,
                       trust_remote_code=runtime.trust_remote_code, tokenizer=tokenizer, device_map=runtime.device_map,
                       max_memory=runtime.max_memory, offload_folder=runtime.offload_folder)
    out = Path(cfg.out)
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"model": model_name}
    for task in tasks:
        metrics[task.name] = _score_task(task, items[task.name], model, tokenizer, config, progress, echo)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_gib"] = peak_rss_gib()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _score_task(task: Task, items: list, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                config: PktConfig, progress: bool, echo: Callable[[str], None]) -> dict:
    """Decontaminate, score (resuming from the journal), write the item records; the task's metrics."""
    cfg, out = config.eval, Path(config.eval.out)
    task_items, dropped = (drop_contaminated(task, items, config.assets.data_dir) if cfg.decontaminate and task.test_set
                           else (items, 0))
    task_started = time.perf_counter()
    journal = Journal(out / ".journal" / f"{task.name}.jsonl", _fingerprint(cfg.model, task.name, config))
    if journal.resumed():
        echo(f"{task.name}: resuming, {journal.resumed()} item record(s) already scored in {journal.path}")
    records = task.score(model, tokenizer, task_items, cfg, progress, journal)
    with open(out / "items" / f"{task.name}.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    journal.remove()
    metrics = {**summarise(records, task.continuous), "continuous": list(task.continuous), "dropped": dropped,
               "subset": bool(cfg.limit),
               "seconds": round(time.perf_counter() - task_started, 1)}
    echo(_summary_line(task, metrics))
    return metrics


def _fingerprint(model_name: str, task: str, config: PktConfig) -> dict:
    """What a task's item records depend on: the model's files, the dtype and the scoring settings
    (not which items are chosen: a record is the same whichever subset, or dev rows, it is part of)."""
    chosen = ("model", "out", "tasks", "limit", "nll_limit", "generate", "seed", "dev_data")
    scoring = {k: v for k, v in to_dict(config)["eval"].items() if k not in chosen}
    return {**model_fingerprint(model_name), "task": task, "dtype": str(config.runtime.dtype), "eval": scoring}


CONTINUOUS_KEYS = ("p_correct", "log_p_correct", "nll")


def summarise(records: list[dict], continuous: tuple[str, ...] = CONTINUOUS_KEYS) -> dict:
    """Task metrics from item records: accuracy over the items with a verdict (`score`, `correct`,
    `n`) and the mean of each continuous value present (`p_correct`, `log_p_correct`, `nll` and those
    in `continuous`, each with its own `<key>_n`)."""
    verdicts = [bool(r["correct"]) for r in records if r.get("correct") is not None]
    summary: dict = {"score": sum(verdicts) / len(verdicts) if verdicts else None, "correct": sum(verdicts),
                     "n": len(verdicts)}
    for key in dict.fromkeys((*CONTINUOUS_KEYS, *continuous)):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[key], summary[f"{key}_n"] = sum(values) / len(values), len(values)
    return summary


def _summary_line(task: Task, metrics: dict) -> str:
    parts = [f"{task.name:10s}"]
    if metrics["n"]:
        parts.append(f"accuracy {metrics['score']:.4f} ({metrics['correct']}/{metrics['n']})")
    shown = dict.fromkeys((*CONTINUOUS_KEYS[::2], *task.continuous))
    parts += [f"{key} {metrics[key]:.4f} (n={metrics[key + '_n']})" for key in shown if key in metrics]
    return "  ".join(parts) + f"; {metrics['dropped']} contaminated items dropped"
