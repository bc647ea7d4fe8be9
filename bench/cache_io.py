"""Sustained write and read speed of the cache layer alone, next to the disk's raw speed.

Synthetic bf16 activations (normal values, which compress about as badly as real ones) are
written group by group through `CacheWriter` and read back through `open_cache` a whole group
at a time, its layers on parallel threads (`Cache.read_group`), as the streaming loader reads.
Random access, one example and layer per call, is reported too. Each compressor is measured.
The raw baseline writes and reads plain files of the same size with fsync, in the same run and
folder. Both reads are measured after dropping the page
cache when the kernel allows it (the JSON says whether it did).

An uncompressed cache is read twice: through zarr (`read_path="zarr"`, decoding reads) and as
memory-mapped views of its shard files (`mmap_read_gbps`, the path `pkt align` takes on it). Each
read copies every example out once, as the loader does into its batches: a view alone reads nothing.

With `--real-cache PATH ...` it also reports bytes/token and the compression ratio of real
extractions (make them with `pkt extract --set extract.compressor=...`).

    python bench/cache_io.py [--dir /tmp/pkt-bench] [--gib 2] [--real-cache cache/a cache/b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pkt_pipeline.cache import ArraySpec, CacheWriter, cache_info, open_cache
from pkt_pipeline import __version__
from pkt_pipeline.cache.layout import (FINAL_LAYER_RAW, AttributionSource, AttributionSummary, Capture, Counts,
                                       DatasetInfo, Layout, Prompt, TeacherInfo, TokenizerInfo, compressor, run_record)
from pkt_pipeline.models import cpu_facts

WIDTH, LAYERS, SHARD, CHUNK = 1536, 29, 4096, 512


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_speed(folder: Path, total: int) -> tuple[float, float]:
    """GB/s of writing then reading `total` bytes as 64 MiB blocks in 1 GiB files, fsynced."""
    folder.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    files = [folder / f"raw{i}" for i in range(max(1, total // (1 << 30)))]
    per_file = total // len(files)
    started = time.perf_counter()
    for path in files:
        with open(path, "wb") as handle:
            for _ in range(per_file // len(block)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
    write = total / (time.perf_counter() - started) / 1e9
    drop_page_cache()
    started = time.perf_counter()
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass
    read = total / (time.perf_counter() - started) / 1e9
    shutil.rmtree(folder)
    return write, read


def synthetic_run(codec_name: str, level: int, groups: int, examples: int) -> dict:
    """The run record of a cache of synthetic activations, so it opens as any cache does."""
    unknown = "0" * 64
    return run_record(
        version=__version__,
        teacher=TeacherInfo(id=f"synthetic ({codec_name})", weights_sha256=unknown, dtype="bfloat16", num_layers=LAYERS - 1,
                            hidden_size=WIDTH, vocab_size=0, architecture="none"),
        tokenizer=TokenizerInfo(sha256=unknown, vocab_size=0),
        capture=Capture(layers=tuple(range(LAYERS)), kinds=("hidden",), top_k=0, storage_dtype="bfloat16",
                        compressor=codec_name, compression_level=level, final_layer=FINAL_LAYER_RAW),
        prompt=Prompt(format="none", max_length=SHARD, train_on_inputs=False),
        layout=Layout(chunk_tokens=CHUNK, shard_tokens=SHARD, groups=groups),
        dataset=DatasetInfo(path="synthetic", fingerprint=unknown),
        counts=Counts(examples=examples, tokens=groups * SHARD, supervised_tokens=0, truncated=0),
        attribution=AttributionSource(data="none", aggregation="abs", limit=0))


def cache_speed(folder: Path, total: int, codec_name: str, level: int, workers: int) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    bytes_per_group = SHARD * WIDTH * 2 * LAYERS
    groups = max(1, total // bytes_per_group)
    examples = SHARD // 512
    index = pa.table({"example_id": [f"g{g}e{e}" for g in range(groups) for e in range(examples)],
                      "group": pa.array([g for g in range(groups) for _ in range(examples)], pa.int32()),
                      "content_hash": ["0" * 64] * (groups * examples),
                      "offset": pa.array([g * SHARD + e * 512 for g in range(groups) for e in range(examples)], pa.int64()),
                      "length": pa.array([512] * (groups * examples), pa.int32())})
    run = synthetic_run(codec_name, level, groups, groups * examples)
    specs = [ArraySpec(f"hidden/{layer:02d}", (WIDTH,), "uint16") for layer in range(LAYERS)]
    codec = compressor(codec_name, level)
    writer = CacheWriter.open(folder, run, index, specs, codec)
    rng = np.random.default_rng(1)
    blocks = {spec.key: rng.standard_normal((SHARD, WIDTH), dtype=np.float32)
              for spec in specs[:4]}
    encoded = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in blocks.items()}
    payload = {spec.key: encoded[specs[i % 4].key] for i, spec in enumerate(specs)}
    started = time.perf_counter()
    for group in range(groups):
        writer.write_group(group, payload, {"examples": examples, "tokens": SHARD})
    os.sync()
    write_s = time.perf_counter() - started
    writer.finalize(AttributionSummary(aggregation="abs", examples=0), {})
    stored = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    dropped = drop_page_cache()
    cache = open_cache(folder, read_path="zarr")
    read_s = read_seconds(cache, groups, workers)
    mmap_gbps = None
    if codec_name == "none":
        dropped = drop_page_cache() and dropped
        mapped = open_cache(folder)
        assert mapped.read_path == "mmap", mapped.read_path_reason
        mmap_gbps = groups * bytes_per_group / read_seconds(mapped, groups, workers) / 1e9
    sample = cache.index.column("example_id").to_pylist()[: examples]
    started = time.perf_counter()
    for example_id in sample:  # random access, one example and layer per call (page cache warm)
        for layer in range(LAYERS):
            cache.hidden(layer, example_id)
    random_access_gbps = len(sample) * 512 * WIDTH * 2 * LAYERS / (time.perf_counter() - started) / 1e9
    logical = groups * bytes_per_group
    shutil.rmtree(folder)
    return {"compressor": f"{codec_name}-{level}" if codec_name != "none" else "none", "logical_bytes": logical,
            "stored_bytes": stored, "ratio": logical / stored, "write_gbps": logical / write_s / 1e9,
            "read_gbps": logical / read_s / 1e9, "mmap_read_gbps": mmap_gbps, "random_access_read_gbps": random_access_gbps,
            "page_cache_dropped": dropped}


def read_seconds(cache, groups: int, workers: int) -> float:
    """Seconds to read every group as the streaming loader does: whole groups, each example then copied once."""
    keys = [f"hidden/{layer:02d}" for layer in range(LAYERS)]
    started = time.perf_counter()
    for group in range(groups):
        spans = [cache.span(example_id) for example_id in cache.group_examples(group)]
        arrays, first = cache.read_group(keys, group, workers)
        _ = [np.array(rows[a - first:b - first]) for rows in arrays.values() for a, b in spans]
    return time.perf_counter() - started


def real_codec_ratios(path: str, codecs: list[str], max_tokens: int = 4096) -> dict:
    """Compression ratio and single-thread encode speed of each codec on a real cache's activations.

    Chunks of the first `max_tokens` rows of every cached hidden layer are re-encoded with
    the numcodecs implementation of each codec (the same libraries zarr's codecs use).
    """
    import numcodecs

    cache = open_cache(path)
    rows = min(max_tokens, int(cache.index.column("length").to_numpy()[: 64].sum()))
    chunks = []
    for layer in cache.layers:
        data = cache.root[f"hidden/{layer:02d}"][:rows]
        chunks += [np.ascontiguousarray(data[s:s + CHUNK]) for s in range(0, rows, CHUNK)]
    raw = sum(c.nbytes for c in chunks)
    results = {}
    for spec in codecs:
        if spec == "none":
            continue
        name, _, level = spec.rpartition("-")
        codec = {"zstd": lambda: numcodecs.Zstd(level=int(level)),
                 "blosc-lz4": lambda: numcodecs.Blosc("lz4", int(level), numcodecs.Blosc.SHUFFLE),
                 "blosc-zstd": lambda: numcodecs.Blosc("zstd", int(level), numcodecs.Blosc.SHUFFLE)}[name]()
        started = time.perf_counter()
        stored = sum(len(codec.encode(c)) for c in chunks)
        seconds = time.perf_counter() - started
        results[spec] = {"ratio": raw / stored, "encode_mb_per_s": raw / seconds / 1e6}
    return {"path": path, "teacher": cache.manifest.teacher.id, "tokens_sampled": rows,
            "layers": len(cache.layers), "raw_bytes": raw, "codecs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/pkt-bench-io")
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--codecs", default="none,zstd-1,zstd-3,blosc-lz4-5,blosc-zstd-1")
    parser.add_argument("--real-cache", nargs="*", default=[])
    parser.add_argument("--read-workers", type=int, default=4, help="threads reading a group's layers (Cache.read_group)")
    parser.add_argument("--out", default="bench/results/cache_io.json")
    args = parser.parse_args()
    folder, total = Path(args.dir), int(args.gib * (1 << 30))
    raw_write, raw_read = raw_speed(folder / "raw", total)
    rows = []
    for spec in args.codecs.split(","):
        name, _, level = spec.rpartition("-") if spec != "none" else ("none", "", "0")
        rows.append(cache_speed(folder / "cache", total, name, int(level), args.read_workers))
    real = [cache_info(path) for path in args.real_cache]
    real_codecs = [real_codec_ratios(path, args.codecs.split(",")) for path in args.real_cache]
    result = {"raw_write_gbps": raw_write, "raw_read_gbps": raw_read, "cache": rows,
              "real_caches": [{k: r[k] for k in ("path", "compressor", "tokens", "bytes_per_token", "compression_ratio",
                                                 "stored_bytes")} for r in real],
              "real_codec_ratios": real_codecs,
              "shape": {"width": WIDTH, "layers": LAYERS, "shard_tokens": SHARD, "chunk_tokens": CHUNK}, "gib": args.gib, "read_workers": args.read_workers}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**result, "cpu": cpu_facts()}, indent=2) + "\n")
    print(f"raw disk: write {raw_write:.2f} GB/s, read {raw_read:.2f} GB/s")
    print(f"{'compressor':14s} {'ratio':>6s} {'write GB/s':>10s} {'% raw':>6s} {'zarr read GB/s':>14s} {'% raw':>6s} "
          f"{'mmap read GB/s':>14s} {'% raw':>6s}")
    for row in rows:
        mmap = (f"{row['mmap_read_gbps']:14.2f} {100 * row['mmap_read_gbps'] / raw_read:5.0f}%" if row["mmap_read_gbps"]
                else f"{'-':>14s} {'':>6s}")
        print(f"{row['compressor']:14s} {row['ratio']:6.2f} {row['write_gbps']:10.2f} {100 * row['write_gbps'] / raw_write:5.0f}% "
              f"{row['read_gbps']:14.2f} {100 * row['read_gbps'] / raw_read:5.0f}% {mmap}")
    for row in result["real_caches"]:
        print(f"real {row['path']}: {row['compressor']}, {row['bytes_per_token'] / 1024:.1f} KiB/token, ratio {row['compression_ratio']:.2f}")
    for row in real_codecs:
        print(f"real activations of {row['teacher']} ({row['tokens_sampled']} tokens x {row['layers']} layers):")
        for codec, value in row["codecs"].items():
            print(f"  {codec:14s} ratio {value['ratio']:5.2f}   encode {value['encode_mb_per_s']:6.0f} MB/s (1 thread)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
