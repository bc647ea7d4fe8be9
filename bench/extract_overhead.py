"""Tokens/s of full extraction against a plain forward pass over the same batches.

Three timings over identical batches (same examples, order, padding, dtype, device):
  forward   model(input_ids, attention_mask): what running the teacher costs anyway;
  capture   + output_hidden_states, per-example slicing, float32 log-softmax and top-k;
  extract   the stage's own loop: capture + bf16 encoding + compressed whole-shard writes
            on a background thread + ledger (pkt_pipeline.extraction.extract_groups).
The target is extract / forward >= 0.90.

It also compares the two ways of cutting a shard group into batches: in example order (pkt
before length batching) and by similar length (`pkt_pipeline.extraction.length_batches`, what the stage
does now): the share of computed positions that are padding, and real (unpadded) tokens/s of a
plain forward under each.

Real model (default: the pinned Qwen2.5-Coder-0.5B on MMLU transfer data):
    python bench/extract_overhead.py --teacher models/qwen2.5-coder-0.5b-instruct
A 13B-class shape with random weights (for a GPU):
    python bench/extract_overhead.py --random-shape 40x5120 --device cuda --examples 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pkt_pipeline.cache import CacheWriter
from pkt_pipeline.cache.layout import array_specs, assign_offsets, compressor, plan_groups
from pkt_pipeline.datasets import resolve_data
from pkt_pipeline.examples import load_examples
from pkt_pipeline.extraction import CaptureSettings, capture_batch, extract_groups, length_batches
from pkt_pipeline.models import cpu_facts, load_model, load_tokenizer, resolve_device, resolve_dtype


def random_model(shape: str, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layers, width = (int(x) for x in shape.lower().split("x"))
    config = Qwen2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 128,
                         num_key_value_heads=width // 128, intermediate_size=int(width * 2.6875) // 256 * 256,
                         vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


def random_examples(n: int, length: int, vocab: int):
    rng = np.random.default_rng(0)
    return [SimpleNamespace(example_id=f"r{i}", input_ids=rng.integers(0, vocab, length).astype(np.int32),
                            supervised=np.ones(length, bool)) for i in range(n)]


def padding_fraction(batches) -> float:
    """Share of the positions a padded forward computes that are padding."""
    computed = sum(len(batch) * max(len(e.input_ids) for e in batch) for batch in batches)
    return 1 - sum(len(e.input_ids) for batch in batches for e in batch) / computed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(model, batches, device, with_capture: CaptureSettings | None) -> float:
    synchronize(device)
    started = time.perf_counter()
    for batch in batches:
        if with_capture is not None:
            capture_batch(model, batch, with_capture)
            continue
        longest = max(len(e.input_ids) for e in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, example in enumerate(batch):
            ids[row, : len(example.input_ids)] = torch.from_numpy(example.input_ids.astype(np.int64))
            mask[row, : len(example.input_ids)] = 1
        model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float().sum().item()
    synchronize(device)
    return time.perf_counter() - started


def batch_plans(examples, shard_tokens: int, batch_size: int) -> tuple[list, list]:
    """(in example order, by similar length) batches of each shard group, as the stage forms them."""
    lengths = [len(e.input_ids) for e in examples]
    groups = plan_groups(lengths, shard_tokens)
    in_order = [[examples[i] for i in members[s:s + batch_size]]
                for members in groups for s in range(0, len(members), batch_size)]
    by_length = [[examples[members[r]] for r in rows] for members in groups
                 for rows in length_batches([lengths[i] for i in members], batch_size)]
    return in_order, by_length


def write_padding_only(args, name: str, examples) -> None:
    in_order, by_length = batch_plans(examples, args.shard_tokens, args.batch_size)
    result = {"model": name, "data": args.data, "examples": len(examples), "batch_size": args.batch_size,
              "shard_tokens": args.shard_tokens, "max_length": args.length,
              "padding_fraction": {"in_order": padding_fraction(in_order), "by_length": padding_fraction(by_length)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.data}, {len(examples)} examples: padding {100 * result['padding_fraction']['in_order']:.1f}% of computed "
          f"positions in example order, {100 * result['padding_fraction']['by_length']:.1f}% by length; wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="models/qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--random-shape", default=None, help="LAYERSxWIDTH random Qwen2 instead of --teacher")
    parser.add_argument("--data", default="mmlu/train")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512, help="max length (random models: every length)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--shard-tokens", type=int, default=8192)
    parser.add_argument("--compressor", default="zstd-3")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dir", default=None, help="where the benchmark cache is written (default: a temp dir)")
    parser.add_argument("--out", default="bench/results/extract_overhead.json")
    parser.add_argument("--padding-only", action="store_true",
                        help="only the padding share of both batch plans, from token lengths (no model, no timing)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.random_shape:
        model = random_model(args.random_shape, device, dtype)
        examples = random_examples(args.examples, args.length, model.config.vocab_size)
        name = f"random Qwen2 {args.random_shape}"
    else:
        tokenizer = load_tokenizer(args.teacher)
        examples, _ = load_examples(resolve_data(args.data), tokenizer, max_length=args.length, limit=args.examples or None)
        name = args.teacher
        if args.padding_only:
            return write_padding_only(args, name, examples)
        model = load_model(args.teacher, dtype=dtype, device=str(device))
    layers = tuple(range(model.config.num_hidden_layers + 1))
    settings = CaptureSettings(layers, ("hidden",), args.top_k, "bfloat16")
    lengths = [len(e.input_ids) for e in examples]
    groups = plan_groups(lengths, args.shard_tokens)
    offsets, _ = assign_offsets(groups, lengths, args.shard_tokens)
    in_order, batches = batch_plans(examples, args.shard_tokens, args.batch_size)
    tokens = sum(lengths)

    import pyarrow as pa

    root = Path(args.dir or tempfile.mkdtemp(prefix="pkt-overhead-"))
    codec_name, _, level = args.compressor.rpartition("-")
    run = {"identity": {"bench": "extract_overhead"}, "capture": {"storage_dtype": "bfloat16"},
           "layout": {"chunk_tokens": 512, "shard_tokens": args.shard_tokens, "groups": len(groups)}}
    index = pa.table({"example_id": [str(e.example_id) for e in examples], "offset": pa.array(offsets, pa.int64()),
                      "length": pa.array(lengths, pa.int32())})

    def time_extract(repeat: int) -> tuple[float, int]:
        folder = root / f"cache{repeat}"
        writer = CacheWriter.open(folder, run, index, array_specs(settings, model.config.hidden_size),
                                  compressor(codec_name, int(level)))
        synchronize(device)
        started = time.perf_counter()
        extract_groups(model, writer, examples, groups, offsets, list(range(len(groups))), settings, args.batch_size,
                       progress=False)
        synchronize(device)
        seconds = time.perf_counter() - started
        stored = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return seconds, stored

    time_forward(model, batches, device, None)  # warm-up over every batch shape: kernels, allocator
    timings: dict[str, list[float]] = {"forward": [], "capture": [], "extract": []}
    for repeat in range(args.repeats):  # interleaved, so drift in machine speed hits all three alike
        timings["forward"].append(time_forward(model, batches, device, None))
        timings["capture"].append(time_forward(model, batches, device, settings))
        seconds, stored = time_extract(repeat)
        timings["extract"].append(seconds)
    forward_s, capture_s, extract_s = (float(np.median(timings[k])) for k in ("forward", "capture", "extract"))
    in_order_s = float(np.median([time_forward(model, in_order, device, None) for _ in range(args.repeats)]))
    batching = {plan: {"padding_fraction": padding_fraction(plan_batches), "real_tok_per_s": tokens / seconds,
                       "forward_s": seconds}
                for plan, plan_batches, seconds in (("in_order", in_order, in_order_s), ("by_length", batches, forward_s))}

    result = {
        "model": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "examples": len(examples), "tokens": tokens,
        "batch_size": args.batch_size, "layers_captured": len(layers), "top_k": args.top_k, "compressor": args.compressor,
        "forward_tok_per_s": tokens / forward_s, "capture_tok_per_s": tokens / capture_s,
        "extract_tok_per_s": tokens / extract_s, "ratio_extract_to_forward": forward_s / extract_s,
        "repeats": args.repeats, "all_times_s": timings,
        "time_s": {"forward": forward_s, "capture_extra": capture_s - forward_s, "encode_write_extra": extract_s - capture_s},
        "stored_bytes_per_token": stored / tokens,
        "batching": batching, "cpu": cpu_facts(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name} on {result['device_name']} ({result['dtype']}), {tokens} tokens in {len(batches)} batches")
    print(f"{'pass':10s} {'tok/s':>9s} {'seconds':>8s}")
    for label, seconds in (("forward", forward_s), ("capture", capture_s), ("extract", extract_s)):
        print(f"{label:10s} {tokens / seconds:9.1f} {seconds:8.1f}")
    for plan, facts in batching.items():
        print(f"forward, batches {plan:9s}: padding {100 * facts['padding_fraction']:4.1f}% of positions, "
              f"{facts['real_tok_per_s']:.1f} real tok/s")
    print(f"extract / forward = {result['ratio_extract_to_forward']:.3f} (target >= 0.90); "
          f"{result['stored_bytes_per_token'] / 1024:.1f} KiB stored per token; wrote {args.out}")


if __name__ == "__main__":
    main()
