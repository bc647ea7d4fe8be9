"""Stage two, `pkt align`: train the student from the cache alone, with a registered method.

Reads only the cache and the student; the teacher is never loaded. Writes to `align.out`:
`model/` (merged weights in safetensors + tokenizer, loadable by `from_pretrained`), `adapter/`
(the peft adapter, when LoRA trains), `metrics.json`, `train_log.jsonl` (one line per step, for
`dvc plots`) and `loss_curves.png`, the method's report (with `align.report_map`, e.g. SemAlign's
`map_report.json`) and, while running, `checkpoint/`.
Rerunning a killed run resumes from the checkpoint; rerunning a finished one does nothing.

Under `torchrun` / `accelerate launch` every rank runs this function: rank 0 prepares `align.out` and
writes everything in it; each rank trains a whole replica of the student on its slice of every batch
(`pkt_pipeline.training`), so `align.out` must be a folder all ranks see (any on one node).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from pkt_pipeline import __version__
from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.config import PktConfig, to_dict
from pkt_pipeline.extraction import vocabulary_sha256
from pkt_pipeline.loader import BatchSource, CacheLoader
from pkt_pipeline.methods import AlignContext, Method, Phase, available_methods, check_sections, get_method, resolve
from pkt_pipeline.models import distributed_context, load_model, load_tokenizer, peak_rss_gib, rank_device, with_lora
from pkt_pipeline.plots import plot_training_log
from pkt_pipeline.training import (LOG_FILE, NonFiniteLoss, TrainingInterrupted, WriteFailed, clear_checkpoint,
                                   micro_batch_size_for, phase_summaries, read_log, steps_for, train)
from pkt_pipeline.write_errors import write_failed
from pkt_pipeline.xtok import align_cache

RUN_FILE = "run.json"
STOPPED_FILE = "stopped.json"
"""Written when a non-finite loss stopped the run (see `_restart_diverged`)."""
__all__ = ["TrainingInterrupted", "run", "check_vocabulary"]


def check_vocabulary(cache, tokenizer, student: str, method: str = "") -> None:
    """Refuse a student whose token ids would mean something else than the cached ones (for `method`, one that
    trains on the cached token ids; a cross-tokenizer method never calls this)."""
    crossing = [name for name in available_methods() if get_method(name).cross_tokenizer]
    recorded = cache.manifest.tokenizer
    ours = {"vocabulary_sha256": vocabulary_sha256(tokenizer), "vocab_size": len(tokenizer)}
    theirs = {key: getattr(recorded, key) for key in ours}
    if ours != theirs:
        raise CacheError(
            f"the student's tokenizer does not match the cache: student {student} has vocabulary "
            f"{ours['vocabulary_sha256'][:12]} ({ours['vocab_size']} tokens), the cache's teacher "
            f"{cache.manifest.teacher.id} has {str(theirs['vocabulary_sha256'])[:12]} "
            f"({theirs['vocab_size']} tokens). {f'Method {method}' if method else 'Stage two'} trains on the cached "
            "token ids, so both must share one vocabulary; extract a cache with a teacher of the student's family"
            + (f", or use a method that works across tokenizers ({', '.join(crossing)})" if crossing else "") + ".")


def run(config: PktConfig, progress: bool = True, echo=print) -> dict:
    requested = config.align.method  # a registered method, or a variant of one (`methods:` in the config)
    check_sections(config)
    resolved = resolve(config, requested)
    config, cfg = resolved.config, resolved.align
    _refuse_fsdp()
    rank, world = distributed_context()
    if rank != 0:
        progress, echo = False, _silent
    started = time.perf_counter()
    method_class = resolved.method_class
    if cfg.report_map and method_class.report is Method.report:
        raise ValueError(f"align.report_map (--report-map): {method_class.name} writes no report")
    cache = open_cache(cfg.cache)
    tokenizer = load_tokenizer(config.student, trust_remote_code=config.runtime.trust_remote_code)
    student_tokens = None
    if method_class.cross_tokenizer:  # the student's own tokens of every example, aligned with the cached ones
        if method_class.needs_target_logprob:
            cache.require_target_logprob(f"method {method_class.name}")
        student_tokens = align_cache(cache, tokenizer, who=f"method {method_class.name}", progress=progress)
    else:
        check_vocabulary(cache, tokenizer, config.student, method_class.name)
    out = Path(cfg.out)
    record = {"pkt_version": __version__, "student": config.student, "cache": cfg.cache,
              "cache_identity": cache.manifest.identity,
              "align": {k: v for k, v in to_dict(config)["align"].items() if k != "overwrite"},  # how to run, not what
              **({"settings": dataclasses.asdict(resolved.settings)} if resolved.settings is not None else {})}

    def prepare() -> str:
        _restart_diverged(out, record, cfg.overwrite, echo)
        return _prepare_out(out, record, cfg.overwrite, method_class.report_file)

    if _on_rank_zero(rank, world, prepare) == "done":
        echo(f"{out} already holds this finished run; nothing to do (--overwrite to train again)")
        return {"out": str(out), "action": "up to date"}

    device = rank_device(config.runtime.device, world)
    model = load_model(config.student, dtype=config.runtime.dtype, device=device,
                       trust_remote_code=config.runtime.trust_remote_code, tokenizer=tokenizer)
    method = method_class(AlignContext(cache, cfg, tokenizer, settings=resolved.settings))
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: one seed, one run
    if method.uses_lora:
        model = with_lora(model, cfg.lora)
    elif not method.frozen_student:
        model = model.float()
    method.setup(model)

    def make_loader(phase: Phase, seed: int = cfg.seed, shard: bool = False) -> BatchSource:
        own = method.loader(phase, seed)
        if own is not None:
            return own
        return CacheLoader(cache, batch_size=cfg.batch_size, layers=phase.teacher_layers, kind=method.teacher_kind,
                           topk=method.needs_topk, seed=seed, shuffle_buffer=cfg.loader.shuffle_buffer,
                           prefetch=cfg.loader.prefetch, read_workers=cfg.loader.read_workers,
                           student=student_tokens, target_logprob=method.needs_target_logprob,
                           **({"rank": rank, "world": world} if shard else {}))

    student_layers = model.config.num_hidden_layers
    probe = make_loader(Phase("probe", 0))
    total = steps_for(cfg, len(probe))
    if not cfg.steps:
        total = _cover_phases(method, total, student_layers, cfg, echo)
    phases = method.phases(total, student_layers)
    source = (f"{cache.manifest.counts.examples} cached examples, batch {cfg.batch_size}"
              if isinstance(probe, CacheLoader) else f"{len(probe)} batches of the method's own per epoch")
    micro = micro_batch_size_for(cfg, method)
    echo(f"{method.name}: {sum(p.steps for p in phases)} steps in {len(phases)} phase(s) over {source}"
         + (f", {micro} example(s) per forward" if micro else ""))
    reporting = cfg.report_map and rank == 0  # on the whole batches, once
    report = method.report(model, make_loader, "before", None) if reporting else None

    try:
        summary = train(model, method, phases, lambda phase: make_loader(phase, shard=True), cfg, out,
                        progress=progress, echo=echo)
    except NonFiniteLoss as exc:
        if rank == 0:
            (out / STOPPED_FILE).write_text(json.dumps({"stopped": "non-finite loss", "message": str(exc)}) + "\n")
        raise
    if rank != 0:
        return {"out": str(out), "action": "trained on rank 0's behalf", "rank": rank}
    if report is not None:
        report = method.report(model, make_loader, "after", report)
    try:
        return _finish(config, requested, method, model, tokenizer, cache, out, summary, report, started)
    except OSError as exc:
        intact = (f"The checkpoint at step {summary['checkpointed']} is intact" if summary["checkpointed"] is not None
                  else "Training wrote no checkpoint, so the rerun trains again")
        raise WriteFailed(write_failed(str(out), exc, intact)) from exc


T = TypeVar("T")


def _on_rank_zero(rank: int, world: int, action: Callable[[], T]) -> T:
    """`action` run by rank 0 alone, its result (or its error, raised again) on every rank: the others wait
    for rank 0 to prepare `align.out`, then read the same checkpoint from it."""
    if world == 1:
        return action()
    outcome: list = [None]
    if rank == 0:
        try:
            outcome = [("done", action())]
        except Exception as exc:
            torch.distributed.broadcast_object_list([("failed", exc)], src=0)
            raise
    torch.distributed.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "failed":
        raise value
    return value


def _refuse_fsdp() -> None:
    """An `accelerate launch` FSDP config would otherwise run as plain data parallelism, a whole student
    per GPU, and fail later for memory with no word of why."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise ValueError("pkt align does not shard the student (FSDP): ACCELERATE_USE_FSDP is set by an accelerate "
                         "config with distributed_type FSDP. Use distributed_type MULTI_GPU (each GPU holds the "
                         "whole student), or train a LoRA adapter on a bf16 student (align.lora) to fit one GPU.")


def _silent(message: str) -> None:
    """The echo of ranks other than 0, which would print everything again."""


def _finish(config, requested, method, model, tokenizer, cache, out: Path, summary: dict, report: dict | None,
            started: float) -> dict:
    """Write the outputs of a trained run, then drop its checkpoint."""
    cfg = config.align
    if report is not None:
        (out / method.report_file).write_text(json.dumps(report, indent=2) + "\n")
    model = method.finalize(model)
    saved = _save_outputs(model, tokenizer, out, method.uses_lora)
    log = read_log(out)
    saved["loss_curves"] = str(plot_training_log(log, out / "loss_curves.png",
                                                 f"{method.name}: {config.student} from {cfg.cache}"))
    metrics = {"method": method.name, **({"variant": requested} if requested != method.name else {}), "student": config.student, "cache": cfg.cache,
               "teacher": cache.manifest.teacher.id, "steps": summary["steps"],
               "phases": phase_summaries(log), "seconds": round(time.perf_counter() - started, 1),
               "train_seconds": summary["seconds"], "tokens_per_second": summary["tokens_per_second"],
               "peak_rss_gib": peak_rss_gib(), **saved}
    if getattr(method, "pairs", None):  # student layer -> teacher layer, recorded with every run that pairs layers
        metrics["pairs"] = {str(k): p for k, p in method.pairs.items()}
    metrics.update(method.run_metrics())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    clear_checkpoint(out)
    (out / STOPPED_FILE).unlink(missing_ok=True)
    return {"out": str(out), "action": "trained", "metrics": metrics, "report": report,
            "report_lines": method.format_report(report) if report is not None else []}


def _restart_diverged(out: Path, record: dict, overwrite: bool, echo) -> None:
    """Start afresh a run that a non-finite loss stopped, when it is rerun with changed settings.

    The NaN message tells the user to lower align.lr. A checkpoint continues exactly the run that wrote
    it, and this one holds the diverging weights, worthless under new settings: so a changed record
    (lr is in it) replaces the stopped run instead of being refused as another run. An unchanged record
    resumes as usual (after the cache was repaired, say)."""
    stopped, run_file = out / STOPPED_FILE, out / RUN_FILE
    if overwrite or not stopped.is_file() or not run_file.is_file():
        return
    if json.loads(run_file.read_text()) == json.loads(json.dumps(record)):
        return
    clear_checkpoint(out)
    (out / LOG_FILE).unlink(missing_ok=True)
    run_file.write_text(json.dumps(record, indent=2) + "\n")
    stopped.unlink()
    echo(f"{out} holds a run stopped by a non-finite loss; rerun with changed settings, it starts afresh")


def _cover_phases(method, total: int, student_layers: int, cfg, echo) -> int:
    """An epoch budget too short to give each of the method's phases a step (SemAlign's frontier stages on
    a small cache) is raised to one step per phase, so the defaults train; an explicit align.steps is
    left to the method to accept or refuse."""
    needed = len(method.phases(max(total, 1 << 20), student_layers))
    if total >= needed:
        return total
    echo(f"{method.name}: {cfg.epochs:g} epoch(s) at batch {cfg.batch_size} is {total} step(s), fewer than its "
         f"{needed} phases; raised to {needed}, one per phase (set align.steps to choose)")
    return needed


def _prepare_out(out: Path, record: dict, overwrite: bool, report_file: str) -> str:
    """'done', 'resume' or 'fresh'; refuses a folder holding a different run unless overwriting.

    `--overwrite` replaces a finished run or a run of other settings, as `pkt extract --overwrite`
    replaces a cache of other settings: a killed run of these same settings resumes from its checkpoint
    all the same, so a DVC stage (whose command overwrites, to replace what a changed dependency made
    stale) loses no training to a kill. It replaces only a pkt align run (its `run.json` record)
    holding nothing else; a folder pkt did not write is refused as it is, however the command was given.
    """
    from pkt_pipeline.training import CHECKPOINT, LOG_FILE

    # what pkt align writes in --out, each also with a suffix (`checkpoint.tmp`, a log's temporary)
    ours = (RUN_FILE, "model", "adapter", "metrics.json", LOG_FILE, "loss_curves.png", report_file, CHECKPOINT)
    run_file = out / RUN_FILE
    previous = _align_record(run_file)
    if previous == record and not (out / "metrics.json").exists():
        return "resume"
    if previous is not None and not overwrite:
        if previous != record:
            changed = sorted(k for k in record if previous.get(k) != record[k])
            raise ValueError(f"{out} holds another run (it differs in {', '.join(changed)}); choose another "
                             "--out or pass --overwrite")
        return "done" if (out / "metrics.json").exists() else "resume"
    # DVC writes a `.gitignore` beside each output it tracks (`/model`) and commits it; it belongs to the
    # repository, so it neither makes the folder foreign nor is deleted.
    entries = sorted(p for p in out.iterdir() if p.name != ".gitignore") if out.is_dir() else []
    if entries and previous is None:
        raise ValueError(f"{out} is not empty and holds no pkt align run (no {RUN_FILE} of pkt align); pkt neither "
                         "writes into nor deletes a folder it did not make: choose another --out")
    foreign = [p.name for p in entries if not any(p.name == n or p.name.startswith(n + ".") for n in ours)]
    if foreign:
        raise ValueError(f"{out} holds files pkt align did not write ({', '.join(foreign)}); pkt will not delete "
                         "them: move them out of it, or choose another --out")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    partial = run_file.with_name(RUN_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(run_file)  # whole or absent: a torn record would make the folder look foreign
    return "fresh"


def _align_record(run_file: Path) -> dict | None:
    """The run record pkt align wrote in this folder, or None (absent, unreadable, or someone else's run.json)."""
    try:
        record = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and {"pkt_version", "cache_identity", "align"} <= record.keys() else None


def _save_outputs(model, tokenizer, out: Path, lora: bool) -> dict:
    """The adapter (LoRA) and a merged, standalone HF model directory."""
    paths = {}
    if lora:
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        paths["adapter"] = str(out / "adapter")
        model = model.merge_and_unload()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    paths["model"] = str(out / "model")
    return paths

