"""Stage two's step time: (a) fed by the streaming cache loader vs the same batches from memory,
(b) offline (teacher signals read from the cache) vs online distillation (teacher forward in the loop).

(a) runs in one process, paired: at each step index the student trains once on the batch read
into RAM beforehand and once on the same batch pulled from `CacheLoader` (fetch included), so
the noise of a shared machine hits both sides alike; the ratio is the median of the per-step
ratios (the ratio of the totals is reported too). (b) runs `cache` (offline) and `online` in
processes of their own, so each peak RSS is its own: `online` loads the teacher too and
recomputes, per batch, what the cache holds (the paired layer's residual stream and the top-k
log-probs) before the same student step. All modes use one method
(`--method`, SemAlign's first frontier stage by default), one student, one seed, the same batches.

    python bench/align_throughput.py --cache cache/qwen1.5b-mmlu64 \
        --student models/qwen2.5-coder-0.5b-instruct --teacher models/qwen2.5-coder-1.5b-instruct

Targets: (a) cache/memory step time <= 1.05. (b) is reported as measured (ratio and peak RSS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pkt_pipeline.models import cpu_facts, peak_rss_gib


def build(args):
    from pkt_pipeline.cache import open_cache
    from pkt_pipeline.config import load_config
    from pkt_pipeline.loader import CacheLoader
    from pkt_pipeline.methods import AlignContext, resolve
    from pkt_pipeline.models import load_model, load_tokenizer, with_lora

    config = load_config(overrides=[f"align.method={args.method}", f"align.batch_size={args.batch_size}",
                                    f"align.cache={args.cache}", *args.set])
    resolved = resolve(config, args.method)
    config = resolved.config
    cache = open_cache(args.cache)
    tokenizer = load_tokenizer(args.student)
    student = load_model(args.student, dtype=args.dtype)
    method = resolved.method_class(AlignContext(cache, config.align, tokenizer, settings=resolved.settings))
    if method.uses_lora:
        student = with_lora(student, config.align.lora)
    method.setup(student)
    phase = method.phases(args.steps + args.warmup, student.config.num_hidden_layers)[0]
    names = set(method.trainable(student, phase))
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name in names)
    params = [p for n, p in student.named_parameters() if n in names]
    optimizer = torch.optim.AdamW(params, lr=config.align.lr)
    loader = CacheLoader(cache, batch_size=args.batch_size, layers=phase.teacher_layers, kind=method.teacher_kind,
                         topk=method.needs_topk, seed=0, shuffle_buffer=config.align.loader.shuffle_buffer,
                         prefetch=config.align.loader.prefetch, read_workers=config.align.loader.read_workers)
    return method, phase, student, params, optimizer, loader, cache


def online_teacher_signals(teacher, batch, phase, kind: str, top_k: int):
    """What stage one would have cached for this batch, computed now by the teacher."""
    from pkt_pipeline.extraction import top_k_logprobs
    from pkt_pipeline.residual import forward_with_residual_stream, layer_state

    with torch.no_grad():
        out, states = forward_with_residual_stream(teacher, input_ids=batch.input_ids,
                                                   attention_mask=batch.attention_mask)
        for layer in phase.teacher_layers:
            batch.teacher[layer] = layer_state(states, layer, kind).to(torch.bfloat16)
        values, indices = top_k_logprobs(out.logits.flatten(0, 1), top_k)
        batch.topk_logprobs = values.view(*out.logits.shape[:2], top_k).float()
        batch.topk_indices = indices.view(*out.logits.shape[:2], top_k).long()
    return batch


def student_step(method, student, params, optimizer, batch, phase) -> None:
    loss, _ = method.loss(student, batch, phase)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_paired(args) -> dict:
    """(a): each step index runs twice, once on the batch from memory, once on the same batch pulled
    from the streaming loader (its fetch timed too), so machine noise hits both sides alike."""
    torch.manual_seed(0)
    method, phase, student, params, optimizer, loader, cache = build(args)
    total = args.steps + args.warmup
    from pkt_pipeline.loader import CacheLoader

    twin = CacheLoader(cache, batch_size=args.batch_size, layers=phase.teacher_layers, kind=method.teacher_kind,
                       topk=method.needs_topk, seed=0, shuffle_buffer=loader.shuffle_buffer)
    in_memory = list(twin.batches(total))
    twin.close()
    streamed = iter(loader.batches(total))
    memory_times, cache_times, tokens = [], [], 0
    for step in range(total):
        started = time.perf_counter()
        student_step(method, student, params, optimizer, in_memory[step], phase)
        memory_seconds = time.perf_counter() - started
        started = time.perf_counter()
        batch = next(streamed)
        assert batch.example_ids == in_memory[step].example_ids
        student_step(method, student, params, optimizer, batch, phase)
        cache_seconds = time.perf_counter() - started
        if step >= args.warmup:
            memory_times.append(memory_seconds)
            cache_times.append(cache_seconds)
            tokens += batch.tokens
    return {"mode": "paired", "memory_step_seconds": memory_times, "cache_step_seconds": cache_times,
            "cache_over_memory": statistics.median(c / m for c, m in zip(cache_times, memory_times)),
            "cache_over_memory_total": sum(cache_times) / sum(memory_times), "tokens_per_step": tokens / len(cache_times),
            "peak_rss_gib": peak_rss_gib(None), "phase": phase.name}


def run_mode(args) -> dict:
    """(b): offline (`cache`) or online (`online`: the teacher runs in the loop) in this process."""
    if args.mode == "paired":
        return run_paired(args)
    torch.manual_seed(0)
    method, phase, student, params, optimizer, loader, cache = build(args)
    total = args.steps + args.warmup
    teacher = None
    if args.mode == "online":
        from pkt_pipeline.models import load_model

        teacher = load_model(args.teacher, dtype=args.dtype).eval()
    source = iter(loader.batches(total))
    times, tokens = [], 0
    for step in range(total):
        started = time.perf_counter()
        batch = next(source)
        if teacher is not None:
            batch = online_teacher_signals(teacher, batch, phase, method.teacher_kind, cache.manifest.capture.top_k)
        student_step(method, student, params, optimizer, batch, phase)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens += batch.tokens
    return {"mode": args.mode, "step_seconds": times, "median_step_seconds": statistics.median(times),
            "tokens_per_second": tokens / sum(times), "peak_rss_gib": peak_rss_gib(None),
            "phase": phase.name, "teacher_layers": list(phase.teacher_layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", help="needed for the online mode")
    parser.add_argument("--method", default="semalign")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", default="paired,cache,online")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/align_throughput.json")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results = {}
    for mode in args.modes.split(","):
        if mode == "online" and not args.teacher:
            continue
        command = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"mode {mode} failed:\n{finished.stderr[-3000:]}")
        results[mode] = json.loads(finished.stdout.strip().splitlines()[-1])
    summary = {"settings": {k: v for k, v in vars(args).items() if k != "mode"}, "modes": results}
    if "paired" in results:
        summary["cache_over_memory"] = results["paired"]["cache_over_memory"]
    if "online" in results and "cache" in results:
        summary["online_over_offline"] = results["online"]["median_step_seconds"] / results["cache"]["median_step_seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**summary, "cpu": cpu_facts()}, indent=2) + "\n")
    print(f"{'mode':8s} {'step s':>8s} {'tok/s':>8s} {'peak RSS GiB':>13s}")
    for mode, row in results.items():
        if mode == "paired":
            for side in ("memory", "cache"):
                times = row[f"{side}_step_seconds"]
                print(f"{side:8s} {statistics.median(times):8.2f} {row['tokens_per_step'] / statistics.mean(times):8.1f} "
                      f"{row['peak_rss_gib']:13.2f}  (paired, one process)")
        else:
            print(f"{mode:8s} {row['median_step_seconds']:8.2f} {row['tokens_per_second']:8.1f} {row['peak_rss_gib']:13.2f}")
    for key in ("cache_over_memory", "online_over_offline"):
        if key in summary:
            print(f"{key}: {summary[key]:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
