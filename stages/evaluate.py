"""`pkt eval`: score one model on MMLU, GSM8K, HumanEval and MBPP.

Writes `OUT/metrics.json` ({task: {score, n, dropped, ...}}) and, per task, `OUT/items/<task>.jsonl`
with one record a person can read per item (prompt, output, verdict). The prompts live in
`pkt_pipeline/evaluation/` next to their scorers:

- MMLU, 0-shot: the log-likelihood of the answer letters after the question (`mmlu.py`);
- GSM8K, 0-shot greedy: exact match of the final number (`gsm8k.py`);
- HumanEval and MBPP (task_ids 11-510), pass@1 with greedy decoding, the code run only in the
  sandbox (`sandbox.py`: no network namespace, memory/CPU/file limits, process-group kill).

Test items that appear in the transfer splits (the data any student was trained on) are dropped
first and counted (`dropped`), then `eval.limit` picks a seeded subset for quick runs.
"""

from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path

from pkt_pipeline.config import EvalConfig, PktConfig
from pkt_pipeline.datasets import find_dataset
from pkt_pipeline.models import load_model, load_tokenizer, resolve_device

TASKS = ("mmlu", "gsm8k", "humaneval", "mbpp")


def run(config: PktConfig, model_name: str, progress: bool = True, echo=print) -> dict:
    cfg = config.eval
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown or not cfg.tasks:
        raise ValueError(f"eval.tasks must be a non-empty subset of {TASKS}; unknown: {unknown}")
    started = time.perf_counter()
    items = {task: _load(task, config.assets.data_dir) for task in cfg.tasks}  # data errors before the model loads
    tokenizer = load_tokenizer(model_name, trust_remote_code=config.runtime.trust_remote_code)
    model = load_model(model_name, dtype=config.runtime.dtype, device=resolve_device(config.runtime.device),
                       trust_remote_code=config.runtime.trust_remote_code)
    out = Path(cfg.out)
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"model": model_name}
    for task in cfg.tasks:
        task_items, dropped = _decontaminate(task, items[task], config.assets.data_dir) if cfg.decontaminate else (items[task], 0)
        task_items = _subset(task_items, cfg.limit, cfg.seed)
        task_started = time.perf_counter()
        records = SCORERS[task](model, tokenizer, task_items, cfg, progress)
        with open(items_dir / f"{task}.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        correct = sum(bool(r["correct"]) for r in records)
        metrics[task] = {"score": correct / max(len(records), 1), "correct": correct, "n": len(records),
                         "dropped": dropped, "subset": bool(cfg.limit), "seconds": round(time.perf_counter() - task_started, 1)}
        echo(f"{task:10s} {metrics[task]['score']:.4f} ({correct}/{len(records)}; {dropped} contaminated items dropped)")
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _load(task: str, data_dir: str) -> list:
    from pkt_pipeline.evaluation import code_tasks, gsm8k, mmlu

    if task == "mmlu":
        return mmlu.load_mmlu(find_dataset("mmlu", data_dir))
    if task == "gsm8k":
        return gsm8k.load_gsm8k(find_dataset("gsm8k", data_dir) / "test.jsonl")
    if task == "humaneval":
        return code_tasks.load_humaneval(find_dataset("humaneval", data_dir))
    return code_tasks.load_mbpp(find_dataset("mbpp", data_dir))


def _item_text(task: str, item) -> str:
    from pkt_pipeline.evaluation import mmlu

    if task == "mmlu":
        return mmlu.mmlu_item_text(item)
    if task == "gsm8k":
        return item.question
    return item.prompt_text


def _decontaminate(task: str, items: list, data_dir: str) -> tuple[list, int]:
    """Drop items found in any transfer split; without the splits there is nothing to drop.

    Rows carved from a test set name their source item (`test_item_id`), which is dropped by
    construction; the overlap check catches the rest."""
    from pkt_pipeline.datasets import transfer_split_files
    from pkt_pipeline.evaluation.decontamination import contaminated_ids, declared_test_ids

    files = transfer_split_files(data_dir)
    if not files:
        return items, 0
    ids = {_item_id(task, item): _item_text(task, item) for item in items}
    dropped = contaminated_ids(ids, files) | (declared_test_ids(files, task) & set(ids))
    return [item for item in items if _item_id(task, item) not in dropped], len(dropped)


def _item_id(task: str, item) -> str:
    return item.task_id if task in ("humaneval", "mbpp") else item.id


def _subset(items: list, limit: int, seed: int) -> list:
    if not limit or limit >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def _score_mmlu(model, tokenizer, items, cfg: EvalConfig, progress: bool) -> list[dict]:
    from pkt_pipeline.evaluation.mmlu import score_mmlu

    return score_mmlu(model, tokenizer, items, batch_size=cfg.batch_size, chat=cfg.chat, progress=progress,
                      answer_prefix=cfg.mmlu_answer_prefix)


def _score_gsm8k(model, tokenizer, items, cfg: EvalConfig, progress: bool) -> list[dict]:
    from pkt_pipeline.evaluation.generation import generate, render_user_turn
    from pkt_pipeline.evaluation.gsm8k import extract_final_number, gsm8k_correct, gsm8k_prompt

    prompts = [render_user_turn(tokenizer, gsm8k_prompt(item.question), cfg.chat) for item in items]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens_gsm8k, cfg.batch_size, progress, "gsm8k")
    return [{"id": item.id, "prompt": prompt, "output": output, "extracted": extract_final_number(output),
             "reference": item.reference, "correct": gsm8k_correct(output, item)}
            for item, prompt, output in zip(items, prompts, outputs)]


def _score_code(model, tokenizer, items, cfg: EvalConfig, progress: bool) -> list[dict]:
    from pkt_pipeline.evaluation.code_tasks import extract_code
    from pkt_pipeline.evaluation.generation import code_user_turn, generate, render_user_turn
    from pkt_pipeline.evaluation.sandbox import run_programs

    prompts = [render_user_turn(tokenizer, code_user_turn(item.prompt_text), cfg.chat) for item in items]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens_code, cfg.batch_size, progress, "code")
    programs = [item.test_program(extract_code(output, item.prompt_text)) for item, output in zip(items, outputs)]
    verdicts = run_programs(programs, workers=cfg.workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                            progress=progress, desc="execute")
    return [{"id": item.task_id, "prompt": prompt, "output": output, "verdict": verdict.status,
             "detail": verdict.detail, "correct": verdict.passed}
            for item, prompt, output, verdict in zip(items, prompts, outputs, verdicts)]


SCORERS = {"mmlu": _score_mmlu, "gsm8k": _score_gsm8k, "humaneval": _score_code, "mbpp": _score_code}
