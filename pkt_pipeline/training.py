"""The one training loop every stage-two method runs on: phases, optimizer, checkpoints, logs.

A method supplies phases and a loss (`pkt_pipeline.methods`); this loop supplies the rest, so
SemAlign and the baselines differ only in what they optimise. Per phase the trainable set is
switched and a fresh optimizer (the method's: AdamW unless it publishes another) with warm-up and the
phase's schedule starts (a frontier stage is a new
problem; a short phase keeps a constant rate, since decaying each to 0 starves it).

Nothing is lost on a crash: every `checkpoint_every` steps (and on Ctrl-C) the trained
parameters, optimizer, scheduler, loader position and RNG state go to `checkpoint/`, written to a
temporary folder and renamed into place. A restarted run continues from there, consuming exactly
the batches the uninterrupted run would have. A checkpoint is safetensors and JSON only, never a
pickle, since loading a pickle runs whatever code it names. A failed write (a full disk) stops the
run with `WriteFailed`, the last checkpoint intact; the log's torn last line is dropped on resume.

Under torchrun / accelerate launch (torch.distributed started by the stage) every rank holds the whole
student and reads its slice of each global batch; each slice is weighted by its share of the global
batch's loss units, exactly as a micro-batch is, and the gradients are summed across ranks before
clipping, so every rank takes the single-process step. The sum is an explicit all-reduce after the
backward passes rather than a DistributedDataParallel wrapper: a phase switches the trainable set
(DDP fixes it when it wraps), micro-batches need no `no_sync`, and methods keep the bare model they
read layers and config from. Rank 0 alone writes the log and checkpoints; every rank resumes from them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from .config import AlignConfig
from .loader import BatchSource
from .methods import Method, Phase
from .write_errors import write_failed

CHECKPOINT = "checkpoint"
LOG_FILE = "train_log.jsonl"
TRAINED_FILE, TENSORS_FILE, STATE_FILE = "trained.safetensors", "state.safetensors", "state.json"
CHECKPOINT_FILES = (TRAINED_FILE, TENSORS_FILE, STATE_FILE)


class TrainingInterrupted(RuntimeError):
    """Ctrl-C arrived; a checkpoint of the last finished step was written."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; training stopped before the optimizer step could spread it."""


class WriteFailed(RuntimeError):
    """Writing the log or a checkpoint failed (a full disk, mostly); the last checkpoint is intact."""


@dataclass
class Position:
    """Where training stands: the phase, the step within it, and steps done in all."""

    phase: int = 0
    phase_step: int = 0
    global_step: int = 0


def train(model: nn.Module, method: Method, phases: list[Phase], make_loader: Callable[[Phase], BatchSource],
          config: AlignConfig, out: Path, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run `phases` on `model` in place (resuming from a checkpoint in `out`); returns this run's throughput.

    Under torch.distributed, `make_loader` gives each rank its slice of the global batches (a source that
    does not shard gives every rank the whole batch: still the single-process step, computed on each)."""
    rank, world = _ranks()
    saved = method.saved_parameters(model, phases)
    device = next(model.parameters()).device
    position, loader_state, resume = Position(), None, _load_checkpoint(out, model, saved)
    if world > 1:
        _check_same_start(out, resume)
        _broadcast_parameters(model, saved)
    if resume is not None:
        position, loader_state = Position(**resume["position"]), resume["loader"]
        echo(f"resuming {out} at step {position.global_step} ({phases[position.phase].name}, "
             f"step {position.phase_step}/{phases[position.phase].steps})")
    files = _RunFiles(out, position.global_step if resume is not None else None, writes=rank == 0)
    if rank == 0:
        with files.writing():
            _truncate_log(out / LOG_FILE, position.global_step)
    total = sum(phase.steps for phase in phases)
    micro_batch_size = micro_batch_size_for(config, method)
    summary: dict = {"steps": total, "steps_run": total - position.global_step, "tokens": 0}
    stop = _InterruptFlag()
    bar = tqdm(total=total, initial=position.global_step, desc=f"align {method.name}", unit="step", disable=not progress)
    started = time.perf_counter()
    try:
        with stop, files:
            for index in range(position.phase, len(phases)):
                phase = phases[index]
                names = set(method.trainable(model, phase))
                if not names:
                    raise ValueError(f"{method.name}: phase {phase.name!r} trains no parameter")
                for name, parameter in model.named_parameters():
                    parameter.requires_grad_(name in names)
                params = [p for n, p in model.named_parameters() if n in names]
                optimizer = method.optimizer(params)
                scheduler = method.scheduler(optimizer, phase)
                if resume is not None and index == position.phase and resume.get("optimizer"):
                    optimizer.load_state_dict(_like(resume["optimizer"], optimizer.state_dict()))
                    scheduler.load_state_dict(resume["scheduler"])
                    torch.set_rng_state(resume["rng"])
                loader = make_loader(phase)
                if loader_state is not None:
                    loader.load_state_dict(loader_state)
                sharded = getattr(loader, "world", 1) == world
                with loader:
                    batches = loader.batches(phase.steps - position.phase_step)
                    for batch in batches:
                        batch = batch.to(device)
                        model.train()
                        loss, parts = _accumulate_gradients(model, method, batch, phase, micro_batch_size, world)
                        tokens, stopping = batch.tokens, stop.requested
                        if world > 1:
                            loss, parts, tokens, stopping, with_grad = _sum_across_ranks(
                                loss, parts, tokens, stopping, params)
                            tokens = tokens if sharded else tokens // world
                        if not math.isfinite(loss):
                            raise NonFiniteLoss(
                                f"{method.name}: the loss is {loss} at step {position.global_step + 1} "
                                f"({phase.name}; parts {parts}; examples {batch.example_ids[:4]}). Lower align.lr "
                                "(a rerun with changed settings starts afresh) or check the cache with "
                                "`pkt cache verify`; the last checkpoint is intact.")
                        if world > 1:
                            _sum_gradients([p for p, used in zip(params, with_grad) if used])
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                        lr = scheduler.get_last_lr()[0]  # the rate this step uses
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        position = Position(index, position.phase_step + 1, position.global_step + 1)
                        summary["tokens"] += tokens
                        entry = {"step": position.global_step, "phase": phase.name, "phase_step": position.phase_step,
                                 "loss": loss, **parts, "grad_norm": float(grad_norm),
                                 "lr": lr, "tokens": tokens,
                                 "seconds": round(time.perf_counter() - started, 3)}
                        files.log(entry)
                        bar.update(1)
                        bar.set_postfix_str(f"{phase.name} loss {entry['loss']:.4f}", refresh=False)
                        if position.global_step % config.checkpoint_every == 0 or stopping:
                            files.checkpoint(model, saved, position, optimizer, scheduler, loader)
                        if stopping:
                            raise TrainingInterrupted(
                                f"interrupted at step {position.global_step}/{total}; checkpoint saved in {out}/"
                                f"{CHECKPOINT}. Rerun the same command to resume.")
                loader_state = loader.state_dict()
                position = Position(index + 1, 0, position.global_step)
                resume = None
    finally:
        bar.close()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["tokens_per_second"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
    summary["checkpointed"] = files.checkpointed
    return summary


class _RunFiles:
    """The log and checkpoints a run writes to `out`; a write that fails (a full disk) raises `WriteFailed`,
    saying which checkpoint a rerun resumes from."""

    def __init__(self, out: Path, checkpointed: int | None, writes: bool = True):
        self.out, self.checkpointed, self.writes = out, checkpointed, writes
        self._log = None

    @contextmanager
    def writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            intact = (f"The checkpoint at step {self.checkpointed} is intact" if self.checkpointed is not None
                      else "No checkpoint was written yet, so the rerun starts afresh")
            raise WriteFailed(write_failed(str(self.out), exc, intact)) from exc

    def __enter__(self) -> _RunFiles:
        if self.writes:
            with self.writing():
                self._log = open(self.out / LOG_FILE, "a")
        return self

    def __exit__(self, kind, *exc) -> None:
        if self._log is None:
            return
        if kind is None:
            with self.writing():
                self._log.close()
            return
        try:  # already failing: a log that cannot be flushed must not hide why
            self._log.close()
        except OSError:
            pass

    def log(self, entry: dict) -> None:
        if not self.writes:
            return
        with self.writing():
            self._log.write(json.dumps(entry) + "\n")

    def checkpoint(self, model: nn.Module, names: list[str], position: Position, optimizer, scheduler,
                   loader: BatchSource) -> None:
        if not self.writes:
            self.checkpointed = position.global_step
            return
        with self.writing():
            self._log.flush()  # every logged step the checkpoint covers is on disk before it
            _save_checkpoint(self.out, model, names, position, optimizer, scheduler, loader)
        self.checkpointed = position.global_step


def read_log(out: Path) -> list[dict]:
    """The logged steps; a torn last line (a write cut short by a full disk or a kill) is left out."""
    return [entry for entry, _ in _log_lines(out / LOG_FILE)]


def phase_summaries(entries: list[dict]) -> dict[str, dict]:
    """First and last logged values of each phase (works across a resumed run's log)."""
    phases: dict[str, dict] = {}
    for entry in entries:
        values = {k: v for k, v in entry.items() if k not in ("step", "phase", "phase_step", "lr", "tokens", "seconds")}
        record = phases.setdefault(entry["phase"], {"first": values})
        record["last"], record["steps"] = values, entry["phase_step"]
    return phases


def clear_checkpoint(out: Path) -> None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.previous", f"{CHECKPOINT}.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)


def _save_checkpoint(out: Path, model: nn.Module, names: list[str], position: Position, optimizer, scheduler,
                     loader: BatchSource) -> None:
    temporary, final = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT
    shutil.rmtree(temporary, ignore_errors=True)
    parameters = dict(model.named_parameters())
    optimizer_state = optimizer.state_dict()
    tensors = {"rng": torch.get_rng_state()}
    values: dict[str, dict] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().contiguous().cpu()
            else:
                values.setdefault(str(index), {})[key] = value
    state = {"position": position.__dict__, "loader": loader.state_dict(), "scheduler": scheduler.state_dict(),
             "optimizer": {"param_groups": optimizer_state["param_groups"], "state": values}}
    try:
        temporary.mkdir(parents=True)
        # Serialised in memory and written by plain file writes: a full disk then surfaces as OSError (ENOSPC),
        # where safetensors' and torch's own writers raise their own errors.
        _write_file(temporary / TRAINED_FILE, save_safetensors(
            {name: parameters[name].detach().contiguous().cpu() for name in names}))
        _write_file(temporary / TENSORS_FILE, save_safetensors(tensors))
        _write_file(temporary / STATE_FILE, (json.dumps(state) + "\n").encode())
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)  # give the space back; the last checkpoint stays whole
        raise
    # Swap by renames only, so a kill at any instant leaves one whole checkpoint: `final`, or
    # (between the two renames) `previous`, which _load_checkpoint falls back to.
    previous = out / f"{CHECKPOINT}.previous"
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(temporary, final)
    shutil.rmtree(previous, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _load_checkpoint(out: Path, model: nn.Module, names: list[str]) -> dict | None:
    folder = next((out / name for name in (CHECKPOINT, f"{CHECKPOINT}.previous") if (out / name).is_dir()), None)
    if folder is None:
        return None
    start_afresh = f"delete {folder} to start afresh (the run then trains from step 0)"
    if (folder / "state.pt").exists():
        raise ValueError(f"{folder / 'state.pt'} is a pickle, which pkt never loads since a pickle can run any code "
                         f"(an older pkt wrote checkpoints so, or someone planted it), so it was not loaded; "
                         f"{start_afresh}")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"the checkpoint in {folder} lacks {', '.join(missing)} (pkt writes a checkpoint whole, then "
                         f"renames it into place, so the folder was damaged or edited); {start_afresh}")
    try:
        trained = load_safetensors((folder / TRAINED_FILE).read_bytes())
        tensors = load_safetensors((folder / TENSORS_FILE).read_bytes())
        state = json.loads((folder / STATE_FILE).read_text())
        optimizer_state: dict = {int(index): dict(values) for index, values in state["optimizer"]["state"].items()}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        resume = {"position": state["position"], "loader": state["loader"], "scheduler": state["scheduler"],
                  "rng": tensors["rng"],
                  "optimizer": {"state": optimizer_state, "param_groups": state["optimizer"]["param_groups"]}}
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"the checkpoint in {folder} is damaged ({type(exc).__name__}: {exc}); {start_afresh}") \
            from exc
    missing = sorted(set(names) - set(trained))
    if missing:
        raise ValueError(f"the checkpoint in {folder} does not match this method and student (it lacks {missing[:3]}...); "
                         "start afresh with --overwrite")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            parameters[name].copy_(value)
    return resume


def _like(saved, current):
    """`saved` (read back from JSON) with tuples where `current` has them (AdamW's betas), so a resumed
    optimizer's settings are exactly the ones it was built with."""
    if isinstance(current, dict) and isinstance(saved, dict):
        return {key: _like(value, current.get(key)) for key, value in saved.items()}
    if isinstance(current, (list, tuple)) and isinstance(saved, list):
        items = [_like(value, current[i] if i < len(current) else None) for i, value in enumerate(saved)]
        return tuple(items) if isinstance(current, tuple) else items
    return saved


def _log_lines(path: Path) -> list[tuple[dict, int]]:
    """(entry, byte offset after its line) per logged step. A last line without its newline, or not JSON, was
    torn by a write cut short (a full disk, a kill) and is left out; a damaged line before others is refused."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines, offset = [], 0
    while True:
        end = data.find(b"\n", offset)
        if end < 0:
            return lines  # the rest, if any, is a torn last line
        try:
            entry = json.loads(data[offset:end])
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise ValueError("not a step entry")
        except ValueError as exc:
            if end + 1 >= len(data):
                return lines
            raise ValueError(f"{path} line {len(lines) + 1} is damaged ({exc}); it is a record of the steps only: "
                             "delete the file, or the lines from there on, and rerun") from exc
        offset = end + 1
        lines.append((entry, offset))


def _truncate_log(path: Path, steps: int) -> None:
    """Drop log lines past the checkpoint, which a resumed run will log again (and a torn last line).
    Cut in place, so a still-full disk needs no space for it."""
    if not path.exists():
        return
    kept = 0
    for entry, end in _log_lines(path):
        if entry["step"] > steps:
            break
        kept = end
    if kept != path.stat().st_size:
        os.truncate(path, kept)


class _InterruptFlag:
    """Turns the first Ctrl-C into a request honoured after the current step (checkpoint, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort at once)")


def micro_batch_size_for(config: AlignConfig, method: Method) -> int:
    """Examples per forward: `align.micro_batch_size`, else the method's own; 0 = the whole batch."""
    return config.micro_batch_size or method.micro_batch_size


def _accumulate_gradients(model: nn.Module, method: Method, batch, phase: Phase,
                          micro_batch_size: int, world: int = 1) -> tuple[float, dict]:
    """Backward through `batch` in micro-batches whose losses add up to the whole batch's; returns the batch's
    loss and parts (the same weighted sums) as floats.

    A loss is a mean (over scored tokens, sequences or examples: `Method.loss_units`), so each micro-batch
    is weighted by its share of what that mean runs over in the whole batch, as torchtune weights by
    tokens; weighting by the share of examples would let a short example's tokens count more. Under
    `world` ranks `batch` is this rank's slice and the whole batch is all ranks' slices together: the
    returned loss and parts are this rank's shares of the global ones, which the ranks' sums give."""
    micro_batches = batch.split(micro_batch_size)
    if world == 1 and len(micro_batches) == 1:
        loss, parts = method.loss(model, batch, phase)
        if torch.isfinite(loss):
            loss.backward()
        return loss.item(), parts
    whole = method.loss_units(batch, phase) if world == 1 else _global_loss_units(method, batch, phase)
    if not batch.example_ids:
        return 0.0, {}
    total, parts = 0.0, {}
    for micro in micro_batches:
        counts = method.loss_units(micro, phase)
        shares = {unit: counts[unit] / count if count else 0.0 for unit, count in whole.items()}
        loss, micro_parts = method.weighted_loss(model, micro, phase, shares)
        if not torch.isfinite(loss):
            return loss.item(), micro_parts
        loss.backward()
        total += loss.item()
        for key, value in micro_parts.items():
            parts[key] = parts.get(key, 0.0) + value
    return total, parts


def _ranks() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group the stage started; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sum_objects(value: dict) -> dict:
    """Every rank's `value` (a flat dict of numbers) summed key by key, on every rank."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    total: dict = {}
    for one in gathered:
        for key, number in one.items():
            total[key] = total.get(key, 0) + number
    return total


def _global_loss_units(method: Method, batch, phase: Phase) -> dict[str, int]:
    """The loss units of the global batch: every rank's slice counted (an empty slice counts none)."""
    return _sum_objects(method.loss_units(batch, phase) if batch.example_ids else {})


def _sum_across_ranks(loss: float, parts: dict, tokens: int, stop: bool,
                      params: list[nn.Parameter]) -> tuple[float, dict, int, bool, list[bool]]:
    """One exchange per step: the global loss and parts (sums of the ranks' shares), tokens, whether any
    rank was asked to stop (all stop together, or the others would wait forever), and which parameters got
    a gradient on some rank (one none did keeps `grad` None, as in one process, so AdamW skips it)."""
    gradients = {f"grad/{i}": int(p.grad is not None) for i, p in enumerate(params)}
    mine = {"loss": loss, "tokens": tokens, "stop": int(stop), **{f"part/{k}": v for k, v in parts.items()},
            **gradients}
    total = _sum_objects(mine)
    summed_parts = {key[5:]: value for key, value in total.items() if key.startswith("part/")}
    return (total["loss"], summed_parts, int(total["tokens"]), total["stop"] > 0,
            [total[f"grad/{i}"] > 0 for i in range(len(params))])


_BUCKET_BYTES = 64 << 20


def _sum_gradients(params: list[nn.Parameter]) -> None:
    """Sum `params`' gradients across ranks in place, in flat buckets of one device and dtype (as DDP does):
    one all-reduce per bucket, not per tensor."""
    for parameter in params:
        if parameter.grad is None:  # no gradient on this rank (an empty slice): it adds zero
            parameter.grad = torch.zeros_like(parameter)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for grad in [parameter.grad for parameter in params]:
        key = (grad.device, grad.dtype)
        bucket = buckets.setdefault(key, [])
        bucket.append(grad)
        if sum(g.numel() for g in bucket) * grad.element_size() >= _BUCKET_BYTES:
            _all_reduce_flat(buckets.pop(key))
    for bucket in buckets.values():
        _all_reduce_flat(bucket)


def _all_reduce_flat(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([grad.reshape(-1) for grad in grads])  # [sum of numel]
    torch.distributed.all_reduce(flat)
    for grad, summed in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(summed.view_as(grad))


def _check_same_start(out: Path, resume: dict | None) -> None:
    """Refuse, on every rank, a start the ranks disagree on (a checkpoint some of them do not see): each
    would train on from its own step and wait forever for the others at the first step they do not share."""
    step = -1 if resume is None else int(resume["position"]["global_step"])
    steps: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {rank}: {'no checkpoint' if s < 0 else f'step {s}'}" for rank, s in enumerate(steps))
        raise ValueError(f"the ranks found different checkpoints in {out} ({seen}); align.out must be one folder "
                         "every rank sees (on several machines a shared filesystem), written by no other run")


def _broadcast_parameters(model: nn.Module, names: list[str]) -> None:
    """Rank 0's values of the trained parameters on every rank, as DDP starts: a random initialisation
    (LoRA's A) that differed by rank would leave the ranks training different models."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            torch.distributed.broadcast(parameters[name].data, src=0)


def steps_for(config: AlignConfig, batches_per_epoch: int) -> int:
    """The shared step budget: `align.steps`, or `align.epochs` passes over the cache."""
    return config.steps if config.steps > 0 else max(1, math.ceil(config.epochs * batches_per_epoch))
