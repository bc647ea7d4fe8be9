"""What a lossy cache codec does to a short training run: the same KD and SemAlign runs from caches
that differ only in their codec, scored on the same items.

For each codec setting (bf16 rows with the exact top-k, the reference; float8_e4m3 rows; int8 rows;
bf16 rows with the uint8 top-k) it runs the real stages as subprocesses, as a user would:

    pkt extract   the config's data at its settings, `extract.layers=auto`, no teacher extras, a small
                  attribution (`--attribution-examples`), with that codec
    pkt align     each method (`--methods`, kd and semalign) from that cache, the config's budget and seed
    pkt eval      each student on the config's eval items (same seed, so the same items)

and reports, per codec: the cache's stored bytes/token (`pkt cache info`'s, activations and top-k),
the rows' and top-k's fidelity to the bf16 cache's (bench/cache_fidelity.py's measures, on the first
`--examples` examples), per method the final and mean training loss and the largest per-step
|loss - bf16 run's loss|, and the continuous metric (MMLU p_correct) with its change from the
bf16-cache student, paired over the same items, with its 95% interval (`pkt report`'s pairing).

Everything lands under `--dir` (`<codec>/cache`, `<codec>/runs/<method>`, `<codec>/eval/<method>`,
`<codec>/logs`); a stage whose output is complete is skipped, so a rerun after a kill continues. A merged
student is deleted once it is scored (`--keep-models` keeps it; its LoRA adapter stays either way).

    python bench/codec_training.py                       # the transfer benchmark's MMLU smoke settings
    python bench/codec_training.py --tiny --dir /tmp/ct  # the tiny random pair: checks the wiring

The tiny run's time is the 20 subprocesses' start-up (each imports torch, transformers and peft: ~5 s on
an idle 2-core CPU), not their work.

Writes `--out` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from cache_fidelity import fidelity, topk_kl
from pkt_pipeline.cache import cache_info, open_cache
from pkt_pipeline.evaluation.records import item_values
from pkt_pipeline.evaluation.stats import paired_difference
from pkt_pipeline.jsonl import jsonl_records
from pkt_pipeline.models import cpu_facts

SETTINGS = {
    "bfloat16": {"storage_dtype": "bfloat16", "topk_codec": "exact"},
    "float8_e4m3": {"storage_dtype": "float8_e4m3", "topk_codec": "exact"},
    "int8": {"storage_dtype": "int8", "topk_codec": "exact"},
    "topk_uint8": {"storage_dtype": "bfloat16", "topk_codec": "uint8"},
}
REFERENCE = "bfloat16"
TASK, METRIC = "mmlu", "p_correct"


def stage(name: str, command: list[str], done: Path, log: Path) -> None:
    """Run `pkt <command>` unless `done` exists (the file the stage writes last); its output goes to `log`."""
    if done.is_file():
        print(f"  {name}: done before, skipped", flush=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        finished = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", *command],
                                  stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if finished.returncode != 0 or not done.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} failed (exit {finished.returncode}; log {log}): pkt {' '.join(command)}\n{tail}")
    print(f"  {name}: {seconds:.0f} s", flush=True)


def sets(overrides: list[str]) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


def run_codec(codec: str, folder: Path, args, common: list[str]) -> None:
    """Extract, align every method and evaluate every student for one codec setting."""
    print(f"{codec}:", flush=True)
    settings = SETTINGS[codec]
    cache = folder / "cache"
    stage("extract", ["extract", "--config", args.config, "--out", str(cache), "--no-progress", *sets([
        "extract.layers=auto", "extract.extras=[]", f"extract.attribution_examples={args.attribution_examples}",
        *common, f"extract.storage_dtype={settings['storage_dtype']}", f"extract.topk_codec={settings['topk_codec']}",
        f"extract.metrics={folder / 'extract.json'}"])], folder / "extract.json", folder / "logs" / "extract.log")
    for method in args.methods:
        run = folder / "runs" / method
        stage(f"align {method}", ["align", "--config", args.config, "--method", method, "--cache", str(cache),
                                  "--out", str(run), "--no-progress", *sets(common)],
              run / "metrics.json", folder / "logs" / f"align-{method}.log")
        evaluated = folder / "eval" / method
        stage(f"eval {method}", ["eval", str(run / "model"), "--config", args.config, "--tasks", TASK,
                                 "--out", str(evaluated), "--no-progress", *sets(common)],
              evaluated / "metrics.json", folder / "logs" / f"eval-{method}.log")
        if not args.keep_models and (run / "model").is_dir():
            shutil.rmtree(run / "model")  # ~2.4 GB per merged 0.5B student; run/adapter keeps what was trained


def loss_curve(run: Path) -> list[float]:
    """The loss at each optimizer step of `run/train_log.jsonl` (a resumed run's repeated steps: the last)."""
    by_step = {record["step"]: float(record["loss"]) for _, record in jsonl_records(run / "train_log.jsonl")}
    return [by_step[step] for step in sorted(by_step)]


def versus_reference(reference: Path, cache: Path, examples: int) -> dict:
    """The cache's decoded rows and top-k against the bf16 cache's, on the same first `examples` examples."""
    ref, mine = open_cache(str(reference), read_path="zarr"), open_cache(str(cache), read_path="zarr")
    ids = ref.index.column("example_id").to_pylist()[:examples]
    layers = [layer for layer in ref.layers if layer in mine.layers]
    hidden = fidelity([ref.hidden(layer, i) for layer in layers for i in ids],
                      [mine.hidden(layer, i) for layer in layers for i in ids]) if layers else None
    ref_topk, my_topk = [ref.topk(i) for i in ids], [mine.topk(i) for i in ids]
    kl = topk_kl(torch.cat([values for values, _ in ref_topk]), torch.cat([values for values, _ in my_topk]))
    return {"examples": len(ids), "layers": layers, "hidden": hidden,
            "topk_ids_equal": all(torch.equal(a, b) for (_, a), (_, b) in zip(ref_topk, my_topk)),
            "topk_kl_mean": float(kl.mean()), "topk_kl_max": float(kl.max())}


def summarise(folders: dict[str, Path], args) -> dict:
    """The JSON record: per codec its cache, its fidelity to the bf16 cache, and per method its run and scores."""
    reference = folders[REFERENCE]
    infos = {codec: cache_info(str(folder / "cache")) for codec, folder in folders.items()}
    codecs = {}
    for codec, folder in folders.items():
        info = infos[codec]
        row = {**SETTINGS[codec],
               "cache": {**{key: info[key] for key in ("tokens", "layers", "bytes_per_token", "activation_bytes",
                                                       "stored_bytes", "compression_ratio")},
                         "bytes_per_token_ratio_to_bfloat16": infos[REFERENCE]["bytes_per_token"] / info["bytes_per_token"]},
               "extract_seconds": json.loads((folder / "extract.json").read_text()).get("seconds"),
               "versus_bfloat16": versus_reference(reference / "cache", folder / "cache", args.examples),
               "methods": {}}
        for method in args.methods:
            curve, ref_curve = loss_curve(folder / "runs" / method), loss_curve(reference / "runs" / method)
            trained = json.loads((folder / "runs" / method / "metrics.json").read_text())
            scored = json.loads((folder / "eval" / method / "metrics.json").read_text())
            values = item_values(folder / "eval", method, TASK, METRIC)
            ref_values = item_values(reference / "eval", method, TASK, METRIC)
            row["methods"][method] = {
                "loss_curve": curve, "loss_final": curve[-1], "loss_mean": sum(curve) / len(curve),
                "loss_max_abs_difference_from_bfloat16": max(abs(a - b) for a, b in zip(curve, ref_curve)),
                "align_seconds": trained.get("seconds"),
                METRIC: sum(values.values()) / len(values), "n": len(values),
                "accuracy": scored[TASK]["score"], "eval_seconds": scored.get("seconds"),
                f"{METRIC}_change_from_bfloat16": paired_difference(values, ref_values)}
        codecs[codec] = row
    return {"settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "cpu": cpu_facts(), "reference": REFERENCE, "task": TASK, "metric": METRIC, "codecs": codecs}


def table(result: dict) -> str:
    methods = result["settings"]["methods"]
    head = f"{'codec':12s} {'B/token':>8s} {'ratio':>5s} {'cos':>8s} {'top-k KL':>8s}"
    for method in methods:
        head += f" | {method + ' loss fin/mean':>20s} {'max|dL|':>7s} {METRIC:>7s} {'change [95%]':>23s}"
    lines = [head]
    for codec, row in result["codecs"].items():
        versus = row["versus_bfloat16"]
        cosine = versus["hidden"]["cosine_mean"] if versus["hidden"] else math.nan
        line = (f"{codec:12s} {row['cache']['bytes_per_token']:8.0f} {row['cache']['bytes_per_token_ratio_to_bfloat16']:5.2f} "
                f"{cosine:8.5f} {versus['topk_kl_mean']:8.1e}")
        for method in methods:
            m = row["methods"][method]
            change = m[f"{METRIC}_change_from_bfloat16"]
            interval = (f"{100 * change['mean']:+.2f} [{100 * change['interval_95'][0]:+.2f}, "
                        f"{100 * change['interval_95'][1]:+.2f}]") if change else "n/a"
            line += (f" | {m['loss_final']:9.4f} / {m['loss_mean']:8.4f} {m['loss_max_abs_difference_from_bfloat16']:7.4f} "
                     f"{100 * m[METRIC]:7.2f} {interval:>23s}")
        lines.append(line)
    return "\n".join(lines) + f"\n({METRIC} and its change in points; the change paired over the same items)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/transfer/mmlu-smoke.yaml")
    parser.add_argument("--dir", type=Path, default=Path("bench/results/codec_training"))
    parser.add_argument("--codecs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help=f"{REFERENCE} (the reference) is always run")
    parser.add_argument("--methods", nargs="+", default=["kd", "semalign"])
    parser.add_argument("--attribution-examples", type=int, default=4)
    parser.add_argument("--examples", type=int, default=12, help="examples compared row by row with the bf16 cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every stage (e.g. teacher=PATH, extract.layers=[8,16]), "
                             "but the codec")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep each merged student after its evaluation (default: only its LoRA adapter)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random pair (built under --dir) with configs/tiny.yaml")
    parser.add_argument("--out", type=Path, default=Path("bench/results/codec_training.json"))
    args = parser.parse_args()
    args.codecs = [REFERENCE, *(codec for codec in args.codecs if codec != REFERENCE)]
    common = list(args.set)
    if args.tiny:
        from pkt_pipeline.tiny_models import save_tiny_pair

        args.config = "configs/tiny.yaml"
        pair = {role: args.dir / "tiny" / role for role in ("teacher", "student")}
        if not all((path / "config.json").is_file() for path in pair.values()):
            pair = save_tiny_pair(args.dir / "tiny")
        common = [f"teacher={pair['teacher']}", f"student={pair['student']}", *common]
    torch.set_num_threads(1)
    started = time.perf_counter()
    folders = {codec: args.dir / codec for codec in args.codecs}
    for codec, folder in folders.items():
        run_codec(codec, folder, args, common)
    result = summarise(folders, args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
