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

(c) `--modes ddp` runs `pkt align` itself under `torchrun --nproc_per_node 2` (gloo, CPU) twice, from an
uncompressed cache (read as memory-mapped shard files) and from the same examples extracted with zstd
(zarr's decoding reads), and samples each rank's /proc/<pid>/smaps_rollup while it trains: Rss counts
the mapped cache pages a rank touched, shared with the other rank and reclaimable, so Pss (shared pages
split between the processes that map them), Private and Shared are reported beside it. It needs no
model download: it builds (once, under `--dir`) a teacher with tiny compute but wide hidden states
(`--width`, 4 layers, 16-dim attention heads, a 16-unit MLP) and the tiny student of
`pkt_pipeline.tiny_models`, and extracts both caches from `--examples` synthetic rows of up to 512
tokens, so the cache is large while a step is cheap and reading dominates.

    python bench/align_throughput.py --modes ddp [--dir /tmp/pkt-ddp-bench] [--width 4096] [--examples 64]

Targets: (a) cache/memory step time <= 1.05. (b) and (c) are reported as measured (ratio, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


# --- (c) two ranks on one node: memory-mapped vs decompressing reads ---------------------------------------

WIDE_LAYERS, MAX_LENGTH = 4, 512
DDP_ALIGN = ["runtime.dtype=float32", "align.method=semalign", "align.lora.r=4", "align.lora.alpha=8",
             "align.checkpoint_every=100000", "align.loader.shuffle_buffer=16"]
SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def wide_pair(folder: Path, width: int) -> dict[str, Path]:
    """A teacher whose hidden states are `width` wide but whose forward is cheap (16-dim heads, a 16-unit
    MLP), and the tiny student; one tokenizer. Built once: the weights are seeded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pkt_pipeline.tiny_models import save_tiny_pair

    paths = {"teacher": folder / f"teacher-{width}", "student": folder / "tiny" / "student"}
    if not (paths["student"] / "model.safetensors").exists():
        save_tiny_pair(folder / "tiny")
    if not (paths["teacher"] / "model.safetensors").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(paths["student"])
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=WIDE_LAYERS,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=16,
                             max_position_embeddings=MAX_LENGTH, tie_word_embeddings=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        torch.manual_seed(1)
        Qwen2ForCausalLM(config).save_pretrained(paths["teacher"], safe_serialization=True)
        tokenizer.save_pretrained(paths["teacher"])
    return paths


def long_rows(path: Path, examples: int) -> Path:
    """Chat rows of a few hundred words each (truncated to MAX_LENGTH tokens when extracted)."""
    words = ("the teacher knows how many clips Natalia sold in April and May def add return print range "
             "answer question function number even prime").split()
    rng = random.Random(0)
    with open(path, "w") as handle:
        for i in range(examples):
            handle.write(json.dumps({"id": f"ex{i:04d}", "messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(90, 150)))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(15, 40)))}]}) + "\n")
    return path


def wide_caches(folder: Path, width: int, examples: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """The pair and its two caches of the same rows (`none` and `zstd`), extracted once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = wide_pair(folder, width)
    data = long_rows(folder / f"rows-{examples}.jsonl", examples)
    caches = {}
    for codec in ("none", "zstd"):
        out = caches[codec] = folder / f"cache-{width}-{examples}-{codec}"
        if not (out / "manifest.json").exists():
            overrides = [f"teacher={pair['teacher']}", f"extract.data={data}", f"extract.out={out}",
                         "runtime.dtype=float32", f"extract.compressor={codec}", "extract.capture=[hidden]",
                         f"extract.max_length={MAX_LENGTH}", "extract.chunk_tokens=512", "extract.shard_tokens=8192",
                         "extract.batch_size=8", "extract.attribution_examples=4", "extract.top_k=16",
                         "extract.overwrite=true"]
            subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "extract", "--no-progress",
                            *(part for item in overrides for part in ("--set", item))], check=True)
    return pair, caches


def smaps(pid: int) -> dict[str, int]:
    """kB of each SMAPS_FIELDS in /proc/<pid>/smaps_rollup (all of the process's mappings together)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        if name in SMAPS_FIELDS:
            values[name] = int(rest.split()[0])
    return values


def mapped_from(pid: int, folder: Path) -> dict[str, int]:
    """kB of Rss and Pss of the process's mappings of files under `folder` (the cache's shard files)."""
    values, inside, prefix = {"Rss": 0, "Pss": 0}, False, str(folder.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if not first.endswith(":"):  # a mapping's header: range, perms, offset, device, inode, path
            inside = line.split()[-1].startswith(prefix)
        elif inside and first[:-1] in values:
            values[first[:-1]] += int(line.split()[1])
    return {f"cache_{k}": v for k, v in values.items()}


def train_two_ranks(args, pair: dict[str, Path], cache: Path, out: Path) -> dict:
    """`pkt align` on 2 gloo ranks, each rank's smaps_rollup sampled every `--sample-every` s; per rank the
    sample of highest Rss and the highest of each field, plus the kernel's own peak (VmHWM)."""
    import psutil  # accelerate's dependency

    overrides = [f"student={pair['student']}", f"align.cache={cache}", f"align.batch_size={args.batch_size}",
                 f"align.steps={args.steps}", *DDP_ALIGN, *args.set]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pkt_pipeline.cli", "align", "--out", str(out), "--overwrite", "--no-progress",
               *[x for setting in overrides for x in ("--set", setting)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks: dict[int, dict] = {}
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                try:
                    rank = child.environ().get("RANK")
                    if rank is None:
                        continue
                    now = {**smaps(child.pid), **mapped_from(child.pid, cache)}
                    status = Path(f"/proc/{child.pid}/status").read_text()
                except (psutil.Error, OSError):  # the rank ended between listing and reading
                    continue
                if "VmHWM:" not in status or not now:  # an exited rank not yet reaped: no memory left to read
                    continue
                row = ranks.setdefault(int(rank), {"pid": child.pid, "peak": {}, "at_peak_rss": {}})
                row["peak"] = {k: max(v, row["peak"].get(k, 0)) for k, v in now.items()}
                if now.get("Rss", 0) >= row["at_peak_rss"].get("Rss", 0):
                    row["at_peak_rss"] = now
                row["VmHWM"] = int(status.split("VmHWM:")[1].split()[0])
            time.sleep(args.sample_every)
    if process.returncode != 0:
        sys.exit(f"torchrun failed ({process.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # seconds is the time since training began: a step's time is the difference (the first holds the warm-up)
    times = [b["seconds"] - a["seconds"] for a, b in zip(entries, entries[1:])]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"cache": str(cache), "step_seconds": times, "median_step_seconds": statistics.median(times),
            "tokens_per_second": metrics["tokens_per_second"], "rank0_peak_rss_gib_from_metrics": metrics["peak_rss_gib"],
            "ranks": {rank: ranks[rank] for rank in sorted(ranks)}}


def run_ddp(args) -> dict:
    from pkt_pipeline.cache import open_cache

    folder = Path(args.dir)
    pair, caches = wide_caches(folder, args.width, args.examples)
    results = {}
    for codec, read_path in (("none", "mmap"), ("zstd", "zarr")):
        cache = open_cache(caches[codec])
        assert cache.read_path == read_path, (codec, cache.read_path, cache.read_path_reason)
        stored = sum(p.stat().st_size for p in caches[codec].rglob("*") if p.is_file())
        results[read_path] = {**train_two_ranks(args, pair, caches[codec], folder / "runs" / read_path),
                              "stored_bytes": stored, "tokens": cache.manifest.counts.tokens,
                              "examples": cache.manifest.counts.examples}
    return results


def print_ddp(results: dict) -> None:
    gib = 2**20  # kB per GiB
    print(f"{'reads':6s} {'cache GiB':>9s} {'step s':>7s} {'rank':>4s} {'peak Rss':>8s} {'VmHWM':>6s} "
          f"{'Pss':>6s} {'Private':>7s} {'Shared':>6s} {'mapped cache Rss/Pss':>20s}   (GiB; the rest at the rank's "
          "peak Rss; the mapped cache is each field's peak)")
    for read_path, row in results.items():
        for rank, memory in row["ranks"].items():
            at = memory["at_peak_rss"]
            private = at.get("Private_Clean", 0) + at.get("Private_Dirty", 0)
            shared = at.get("Shared_Clean", 0) + at.get("Shared_Dirty", 0)
            print(f"{read_path:6s} {row['stored_bytes'] / 2**30:9.2f} {row['median_step_seconds']:7.3f} {rank:>4} "
                  f"{at['Rss'] / gib:8.2f} {memory['VmHWM'] / gib:6.2f} {at['Pss'] / gib:6.2f} {private / gib:7.2f} "
                  f"{shared / gib:6.2f} {memory['peak']['cache_Rss'] / gib:10.2f}/{memory['peak']['cache_Pss'] / gib:.2f}")
    if {"mmap", "zarr"} <= results.keys():
        print(f"mmap/zarr median step time: {results['mmap']['median_step_seconds'] / results['zarr']['median_step_seconds']:.3f}"
              " (indicative on a shared machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="needed for the paired, cache and online modes")
    parser.add_argument("--student", help="needed for the paired, cache and online modes")
    parser.add_argument("--teacher", help="needed for the online mode")
    parser.add_argument("--method", default="semalign")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", default="paired,cache,online", help="any of paired,cache,online; or ddp")
    parser.add_argument("--dir", default="/tmp/pkt-ddp-bench", help="ddp: where the wide caches and runs go")
    parser.add_argument("--width", type=int, default=4096, help="ddp: the teacher's hidden size")
    parser.add_argument("--examples", type=int, default=64, help="ddp: rows in each cache")
    parser.add_argument("--sample-every", type=float, default=0.05, help="ddp: seconds between smaps samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/align_throughput.json")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    if args.modes == "ddp":
        results = run_ddp(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "ddp": results, "cpu": cpu_facts()}, indent=2) + "\n")
        print_ddp(results)
        print(f"wrote {args.out}")
        return
    if not (args.cache and args.student):
        parser.error("--cache and --student are needed for the paired, cache and online modes")
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
