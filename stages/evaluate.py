"""`pkt eval`: score one model on MMLU, GSM8K, HumanEval and MBPP, or on dev rows for tuning.

Writes `OUT/metrics.json` ({task: {score, n, dropped, ...}}) and, per task, `OUT/items/<task>.jsonl`
with one record a person can read per item (prompt, output, verdict). The prompts live in
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
import random
import time
from functools import partial
from pathlib import Path

from pkt_pipeline.config import EvalConfig, PktConfig, to_dict
from pkt_pipeline.datasets import find_dataset
from pkt_pipeline.evaluation.journal import Journal, model_fingerprint
from pkt_pipeline.models import load_model, load_tokenizer, peak_rss_gib, resolve_device

TASKS = ("mmlu", "gsm8k", "humaneval", "mbpp", "dev")


def run(config: PktConfig, model_name: str, progress: bool = True, echo=print) -> dict:
    cfg = config.eval
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown or not cfg.tasks:
        raise ValueError(f"eval.tasks must be a non-empty subset of {TASKS}; unknown: {unknown}")
    started = time.perf_counter()
    items = {task: _load(task, config) for task in cfg.tasks}  # data errors before the model loads
    if {"humaneval", "mbpp"} & set(cfg.tasks):
        from pkt_pipeline.evaluation.sandbox import sandbox_mode

        sandbox_mode()  # a machine that cannot sandbox code says so now, not after an hour of generation
    tokenizer = load_tokenizer(model_name, trust_remote_code=config.runtime.trust_remote_code)
    model = load_model(model_name, dtype=config.runtime.dtype, device=resolve_device(config.runtime.device),
                       trust_remote_code=config.runtime.trust_remote_code, tokenizer=tokenizer)
    out = Path(cfg.out)
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"model": model_name}
    for task in cfg.tasks:
        decontaminate = cfg.decontaminate and task != "dev"  # dev rows are transfer-split rows by definition
        task_items, dropped = _decontaminate(task, items[task], config.assets.data_dir) if decontaminate else (items[task], 0)
        task_started = time.perf_counter()
        journal = Journal(out / ".journal" / f"{task}.jsonl", _fingerprint(model_name, task, config))
        if journal.resumed():
            echo(f"{task}: resuming, {journal.resumed()} item record(s) already scored in {journal.path}")
        records = SCORERS[task](model, tokenizer, task_items, cfg, progress, journal)
        with open(items_dir / f"{task}.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        journal.remove()
        metrics[task] = {**summarise(records), "dropped": dropped, "subset": bool(cfg.limit),
                         "seconds": round(time.perf_counter() - task_started, 1)}
        echo(_summary_line(task, metrics[task]))
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_gib"] = peak_rss_gib()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _fingerprint(model_name: str, task: str, config: PktConfig) -> dict:
    """What a task's item records depend on: the model's files, the dtype and the scoring settings
    (not which items are chosen: a record is the same whichever subset, or dev rows, it is part of)."""
    chosen = ("out", "tasks", "limit", "nll_limit", "generate", "seed", "dev_data")
    scoring = {k: v for k, v in to_dict(config)["eval"].items() if k not in chosen}
    return {**model_fingerprint(model_name), "task": task, "dtype": str(config.runtime.dtype), "eval": scoring}


def _load(task: str, config: PktConfig) -> list:
    from pkt_pipeline.evaluation import code_tasks, dev, gsm8k, mmlu

    data_dir = config.assets.data_dir
    if task == "mmlu":
        return mmlu.load_mmlu(find_dataset("mmlu", data_dir))
    if task == "gsm8k":
        return gsm8k.load_gsm8k(find_dataset("gsm8k", data_dir) / "test.jsonl")
    if task == "humaneval":
        return code_tasks.load_humaneval(find_dataset("humaneval", data_dir))
    if task == "dev":
        return dev.load_dev_rows(config.eval.dev_data, data_dir)
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
    """A seeded subset of `limit` items in file order; 0 (or more than there are) means all.

    Subsets of one seed are nested (the first `limit` of one seeded permutation), so the items
    generated for accuracy are among those scored by NLL, and a larger run contains a smaller one."""
    if not limit or limit >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


CONTINUOUS_KEYS = ("p_correct", "log_p_correct", "nll")


def summarise(records: list[dict]) -> dict:
    """Task metrics from item records: accuracy over the items with a verdict (`score`, `correct`,
    `n`) and the mean of each continuous value present (`p_correct`, `log_p_correct`, `nll`, each
    with its own `<key>_n`)."""
    verdicts = [bool(r["correct"]) for r in records if r.get("correct") is not None]
    summary: dict = {"score": sum(verdicts) / len(verdicts) if verdicts else None, "correct": sum(verdicts),
                     "n": len(verdicts)}
    for key in CONTINUOUS_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[key], summary[f"{key}_n"] = sum(values) / len(values), len(values)
    return summary


def _summary_line(task: str, metrics: dict) -> str:
    parts = [f"{task:10s}"]
    if metrics["n"]:
        parts.append(f"accuracy {metrics['score']:.4f} ({metrics['correct']}/{metrics['n']})")
    parts += [f"{key} {metrics[key]:.4f} (n={metrics[key + '_n']})" for key in CONTINUOUS_KEYS[::2] if key in metrics]
    return "  ".join(parts) + f"; {metrics['dropped']} contaminated items dropped"


def _score_mmlu(model, tokenizer, items, cfg: EvalConfig, progress: bool, journal: Journal) -> list[dict]:
    """Letter log-likelihoods: accuracy and `p_correct` come from one forward per item."""
    from pkt_pipeline.evaluation.mmlu import score_mmlu

    return journal.score("score", _subset(items, cfg.limit, cfg.seed), lambda item: item.id, lambda chunk: score_mmlu(
        model, tokenizer, chunk, batch_size=cfg.batch_size, chat=cfg.chat, progress=progress,
        answer_prefix=cfg.mmlu_answer_prefix))


def _score_generative(model, tokenizer, items, cfg: EvalConfig, progress: bool, journal: Journal, task: str) -> list[dict]:
    """Teacher-forced NLL of the reference reply on `nll_limit` items, greedy generation and its
    verdict on the first `limit` of them; one record per item, `correct` None where not generated."""
    from pkt_pipeline.evaluation.generation import render_user_turn
    from pkt_pipeline.evaluation.reference_nll import reference_nll

    item_id = partial(_item_id, task)
    scored = _subset(items, cfg.limit if cfg.nll_limit is None else cfg.nll_limit, cfg.seed)
    generated = {item_id(item) for item in _subset(items, cfg.limit, cfg.seed)} if cfg.generate else set()

    def score_nll(chunk: list) -> list[dict]:
        prompts = [render_user_turn(tokenizer, _user_turn(task, item), cfg.chat) for item in chunk]
        replies = [_reference_reply(task, item) for item in chunk]
        nlls = reference_nll(model, tokenizer, [p + start for p, (start, _) in zip(prompts, replies)],
                             [target for _, target in replies], cfg.batch_size, progress, f"{task} nll",
                             add_special_tokens=not (cfg.chat and getattr(tokenizer, "chat_template", None)))
        return [{"id": item_id(item), "nll": value["nll"], "nll_tokens": value["tokens"]} for item, value in zip(chunk, nlls)]

    records = {record["id"]: record for record in journal.score("nll", scored, item_id, score_nll)}
    to_generate = [item for item in items if item_id(item) in generated]
    for record in journal.score("generate", to_generate, item_id,
                                lambda chunk: GENERATORS[task](model, tokenizer, chunk, cfg, progress)):
        records[record["id"]] = {**records.get(record["id"], {"id": record["id"]}), **record}
    order = {item_id(item): i for i, item in enumerate(items)}
    return [{"correct": None, **record} for record in sorted(records.values(), key=lambda r: order[r["id"]])]


def _user_turn(task: str, item) -> str:
    from pkt_pipeline.evaluation.generation import code_user_turn
    from pkt_pipeline.evaluation.gsm8k import gsm8k_prompt

    return gsm8k_prompt(item.question) if task == "gsm8k" else code_user_turn(item.prompt_text)


def _reference_reply(task: str, item) -> tuple[str, str]:
    from pkt_pipeline.evaluation.gsm8k import reference_reply

    return ("", reference_reply(item)) if task == "gsm8k" else item.reference_reply()


def _generate_gsm8k(model, tokenizer, items, cfg: EvalConfig, progress: bool) -> list[dict]:
    from pkt_pipeline.evaluation.generation import TASK_STOPS, generate, render_user_turn
    from pkt_pipeline.evaluation.gsm8k import extract_final_number, gsm8k_correct

    prompts = [render_user_turn(tokenizer, _user_turn("gsm8k", item), cfg.chat) for item in items]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens_gsm8k, cfg.generation_batch_size, progress,
                       "gsm8k", stop=TASK_STOPS["gsm8k"])
    return [{"id": item.id, "prompt": prompt, "output": output, "extracted": extract_final_number(output),
             "reference": item.reference, "correct": gsm8k_correct(output, item)}
            for item, prompt, output in zip(items, prompts, outputs)]


def _generate_code(model, tokenizer, items, cfg: EvalConfig, progress: bool) -> list[dict]:
    from pkt_pipeline.evaluation.code_tasks import extract_code
    from pkt_pipeline.evaluation.generation import TASK_STOPS, generate, render_user_turn
    from pkt_pipeline.evaluation.sandbox import run_programs

    if not items:
        return []
    prompts = [render_user_turn(tokenizer, _user_turn("code", item), cfg.chat) for item in items]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens_code, cfg.generation_batch_size, progress,
                       "code", stop=TASK_STOPS["humaneval"])
    programs = [item.test_program(extract_code(output, item.prompt_text)) for item, output in zip(items, outputs)]
    verdicts = run_programs(programs, workers=cfg.workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                            progress=progress, desc="execute")
    return [{"id": item.task_id, "prompt": prompt, "output": output, "verdict": verdict.status,
             "detail": verdict.detail, "correct": verdict.passed}
            for item, prompt, output, verdict in zip(items, prompts, outputs, verdicts)]


def _score_dev(model, tokenizer, items, cfg: EvalConfig, progress: bool, journal: Journal) -> list[dict]:
    """Transfer-split dev rows (`evaluation/dev.py`): reply NLL, and p_correct where a row is MMLU's."""
    from pkt_pipeline.evaluation.dev import score_dev

    return journal.score("dev", _subset(items, cfg.limit, cfg.seed), lambda row: row.id, lambda chunk: score_dev(
        model, tokenizer, chunk, batch_size=cfg.batch_size, progress=progress))


GENERATORS = {"gsm8k": _generate_gsm8k, "humaneval": _generate_code, "mbpp": _generate_code}
SCORERS = {"mmlu": _score_mmlu, "dev": _score_dev, **{task: partial(_score_generative, task=task) for task in GENERATORS}}
