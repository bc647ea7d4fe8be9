"""Items/s of evaluation's greedy generation: transformers `model.generate` (before) vs pkt's loop (after).

For each model and task, the same `--limit` seeded items (the registered tasks' loading and subset, the
prompts rendered as `pkt eval` renders them) are generated twice:
  before  `generate_reference`: model.generate(do_sample=False) on length-sorted left-padded batches
          of 8, each batch running until its longest row ends (evaluation's path until now);
  after   pkt_pipeline.evaluation.generation: rows leave the batch when they end, freed slots are
          refilled, and the task's stop rule (`Task.stop_rule`) ends a row once its answer is complete.
Then every item's verdict is compared: GSM8K `gsm8k_correct` on both outputs, HumanEval/MBPP the
`extract_code` strings (what the sandbox would run). Differing item ids are listed. MMLU is scored
by letter log-likelihoods, not generated, so it has nothing to time here and is reported as skipped.

    python bench/eval_speed.py --tasks gsm8k --limit 64 --batch-size 64 [--models models/a models/b]
    python bench/eval_speed.py --tiny --limit 3 --max-new-tokens 16   # checks the script, not speed

Both sides get the same items; `--limit` at least `--batch-size` lets the loop's batch fill. Next to the
wall-clock items/s, the process CPU seconds of each side are recorded, per generated token (after) and per
decoded row-step (before: every row of a static batch decodes until the batch's longest row ends): CPU
seconds move less than wall time when other work shares the machine.

Writes bench/results/eval_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from pkt_pipeline.evaluation.code_tasks import extract_code
from pkt_pipeline.evaluation.generation import greedy_generate, render_user_turn
from pkt_pipeline.evaluation.gsm8k import extract_final_number, gsm8k_correct
from pkt_pipeline.models import cpu_facts, load_model, load_tokenizer, resolve_device, resolve_dtype
from pkt_pipeline.config import EvalConfig
from pkt_pipeline.evaluation.tasks import get_task, subset

GENERATIVE = ("gsm8k", "humaneval", "mbpp")


@torch.no_grad()
def generate_reference(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                       progress: bool = True, desc: str = "before", row_steps: list[int] | None = None) -> list[str]:
    """Evaluation's generation before pkt's own loop, kept verbatim as the baseline: prompts sorted
    by characters, left-padded static batches through `model.generate`, special tokens removed.
    `row_steps` gets each batch's rows x decoded columns (the work done, padding rows included)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
                new_tokens = generated[:, encoded["input_ids"].shape[1]:]  # (rows, decoded columns)
                if row_steps is not None:
                    row_steps.append(new_tokens.numel())
                for row, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[row] = text
                bar.update(len(rows))
    finally:
        tokenizer.padding_side = previous_side
    return outputs


def tiny_model(dtype):
    """The tiny random teacher of the test suite, built in memory (no files, no download)."""
    from pkt_pipeline.tiny_models import TEACHER_SHAPE, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(TEACHER_SHAPE, len(tokenizer), 1, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return model.to(dtype), tokenizer


def verdict(task: str, item, output: str):
    """What the scorer decides from: GSM8K's correctness, the code the sandbox would run."""
    if task == "gsm8k":
        return gsm8k_correct(output, item)
    return extract_code(output, item.prompt_text)


def time_task(model, tokenizer, task: str, items: list, args) -> dict:
    prompts = [render_user_turn(tokenizer, get_task(task).user_turn(i), not args.no_chat) for i in items]
    max_new = args.max_new_tokens or (args.max_new_tokens_gsm8k if task == "gsm8k" else args.max_new_tokens_code)
    row_steps: list[int] = []
    started, cpu = time.perf_counter(), time.process_time()
    before = generate_reference(model, tokenizer, prompts, max_new, args.reference_batch_size, desc=f"{task} before",
                                row_steps=row_steps)
    before_s, before_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    after = greedy_generate(model, tokenizer, prompts, max_new, args.batch_size, desc=f"{task} after",
                            stop=None if args.no_stop else get_task(task).stop_rule(), pack_weights=not args.no_pack)
    after_s, after_cpu = time.perf_counter() - started, time.process_time() - cpu
    after_tokens = sum(len(a.token_ids) for a in after)
    differing = [get_task(task).item_id(item) for item, b, a in zip(items, before, after)
                 if verdict(task, item, b) != verdict(task, item, a.text)]
    result = {
        "n": len(items), "max_new_tokens": max_new, "stop_rule": None if args.no_stop else get_task(task).stop_rule().__name__,
        "before_s": round(before_s, 2), "after_s": round(after_s, 2),
        "before_items_per_s": len(items) / before_s, "after_items_per_s": len(items) / after_s,
        "speedup": before_s / after_s,
        # Process CPU seconds (all threads), prefill included; per token of the work each side did.
        "before_cpu_s": round(before_cpu, 2), "after_cpu_s": round(after_cpu, 2), "cpu_speedup": before_cpu / after_cpu,
        "before_row_steps": sum(row_steps), "before_cpu_s_per_row_step": before_cpu / sum(row_steps),
        "after_cpu_s_per_token": after_cpu / after_tokens,
        "verdicts_same": not differing, "differing_ids": differing,
        # Texts: after equal to before, or before cut where the stop rule fired.
        "outputs_prefix_of_before": sum(b.startswith(a.text) for b, a in zip(before, after)),
        "after_finish": {reason: sum(a.finish == reason for a in after) for reason in ("eos", "stop", "length")},
        "after_new_tokens": after_tokens,
    }
    if task == "gsm8k":
        result["score_before"] = sum(gsm8k_correct(b, i) for i, b in zip(items, before)) / len(items)
        result["score_after"] = sum(gsm8k_correct(a.text, i) for i, a in zip(items, after)) / len(items)
        result["extracted_differ_ids"] = [get_task(task).item_id(i) for i, b, a in zip(items, before, after)
                                          if extract_final_number(b) != extract_final_number(a.text)]
    if args.keep_outputs:
        result["outputs"] = [{"id": get_task(task).item_id(i), "before": b, "after": a.text, "finish": a.finish}
                             for i, b, a in zip(items, before, after)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--tiny", action="store_true", help="the tiny random test model instead of --models")
    parser.add_argument("--tasks", default="gsm8k,humaneval", help="comma list of gsm8k, humaneval, mbpp (mmlu: skipped)")
    parser.add_argument("--limit", type=int, default=64, help="seeded items per task (>= --batch-size to fill a batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=EvalConfig().generation_batch_size,
                        help="pkt loop's rows per step (after); default: pkt eval's generation_batch_size")
    parser.add_argument("--reference-batch-size", type=int, default=8, help="model.generate's batch (before)")
    parser.add_argument("--max-new-tokens-gsm8k", type=int, default=384)
    parser.add_argument("--max-new-tokens-code", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="override both (e.g. short runs with --tiny)")
    parser.add_argument("--no-stop", action="store_true", help="after runs to EOS too (tests exactness, not stop rules)")
    parser.add_argument("--no-pack", action="store_true", help="after without packed float32 linears (pkt's loop as before)")
    parser.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--keep-outputs", action="store_true", help="store every item's two outputs in the JSON")
    parser.add_argument("--out", default="bench/results/eval_speed.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(GENERATIVE) - {"mmlu"})
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {list(GENERATIVE)} (+ mmlu, skipped)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    items = {task: subset(get_task(task).load(args.data_dir, EvalConfig()), args.limit, args.seed)
             for task in tasks if task in GENERATIVE}
    rows = []
    for name in (["tiny"] if args.tiny else args.models):
        started = time.perf_counter()
        if args.tiny:
            model, tokenizer = tiny_model(dtype)
        else:
            model, tokenizer = load_model(name, dtype=dtype, device=str(device)), load_tokenizer(name)
        load_s = time.perf_counter() - started
        # First-call costs (allocator, kernels, generate's set-up) kept out of both timings.
        generate_reference(model, tokenizer, ["warm-up", "a longer warm-up"], 2, progress=False)
        greedy_generate(model, tokenizer, ["warm-up", "a longer warm-up"], 2, progress=False)
        for task in tasks:
            if task == "mmlu":
                rows.append({"model": name, "task": task, "skipped": "scored by letter log-likelihood, not generated"})
                continue
            rows.append({"model": name, "task": task, "load_s": round(load_s, 1), **time_task(model, tokenizer, task, items[task], args)})
        del model

    result = {
        "bench": "eval_speed", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "cpu": cpu_facts(), "torch": torch.__version__,
        "transformers": transformers.__version__, "limit": args.limit, "seed": args.seed,
        "batch_size_before": args.reference_batch_size, "batch_size_after": args.batch_size,
        "packed_weights_after": not args.no_pack, "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    cpu = result["cpu"]
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if cpu[f]) or "none"
    print(f"{cpu['model']} ({flags}), {cpu['threads']} threads, {result['dtype']} on {result['device']}")
    print(f"{'model':34s} {'task':10s} {'n':>4s} {'before it/s':>11s} {'after it/s':>10s} {'speedup':>8s} "
          f"{'CPU speedup':>11s} {'CPU s/token':>11s}  verdicts")
    for row in rows:
        if "skipped" in row:
            print(f"{Path(row['model']).name:34s} {row['task']:10s} skipped: {row['skipped']}")
            continue
        same = "same" if row["verdicts_same"] else f"differ: {', '.join(row['differing_ids'])}"
        print(f"{Path(row['model']).name:34s} {row['task']:10s} {row['n']:4d} {row['before_items_per_s']:11.3f} "
              f"{row['after_items_per_s']:10.3f} {row['speedup']:7.2f}x {row['cpu_speedup']:10.2f}x "
              f"{row['after_cpu_s_per_token']:11.4f}  {same}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
