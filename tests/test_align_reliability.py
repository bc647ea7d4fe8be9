"""Stage two under a user's mishaps: a full disk, micro-batching, a planted checkpoint, a diverged run,
a damaged checkpoint folder and a small cache (issue 14, items 2, 8, 11 and 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pkt_pipeline.cache import open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.loader import CacheLoader
from pkt_pipeline.methods import AlignContext, available_methods, get_method, register, resolve
from pkt_pipeline.models import load_model, load_tokenizer, with_lora
from pkt_pipeline.training import _accumulate_gradients
from pkt_pipeline.xtok import align_cache
from stages import align
from nan_method import NanAtThirdStep
from tiny_data import extract_config, write_dataset

FAST = ["runtime.dtype=float32", "align.batch_size=4", "align.lr=5e-3", "align.loader.shuffle_buffer=8",
        "align.lora.r=4", "align.lora.alpha=8", "align.checkpoint_every=1000"]


def align_config(tiny_pair, cache, out, method, *extra):
    return load_config(overrides=[f"student={tiny_pair['student']}", f"align.cache={cache}", f"align.out={out}",
                                  f"align.method={method}", *FAST, *extra])


def log_entries(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "train_log.jsonl").read_text().splitlines()]


# --- item 2: a disk that fills during `pkt align` -------------------------------------------------------------

DISK_RUN = ["runtime.dtype=float32", "align.batch_size=4", "align.lr=5e-3", "align.loader.shuffle_buffer=8",
            "align.lora.r=4", "align.lora.alpha=8", "align.steps=48", "align.checkpoint_every=20"]


def pkt_align_command(tiny_pair, cache, out) -> list[str]:
    return [sys.executable, "-m", "pkt_pipeline.cli", "align", "--cache", str(cache), "--student",
            str(tiny_pair["student"]), "--method", "lora-sft", "--out", str(out), "--no-progress",
            *[x for setting in DISK_RUN for x in ("--set", setting)]]


def disk_full_scenario(command_file: str, disk: str, results: str) -> None:
    """Runs inside a private mount namespace: `pkt align` on a small tmpfs that another writer fills
    once the first checkpoint is down; a rerun with room for the log but not the checkpoint; a rerun
    once space is freed."""
    import time

    command = json.loads(Path(command_file).read_text())
    disk_path, results_path = Path(disk), Path(results)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", disk], check=True)
    out = disk_path / "run"
    report: dict = {"runs": []}

    def run() -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        log = out / "train_log.jsonl"
        report["runs"].append({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                               "log": log.read_bytes().decode("utf-8", "replace") if log.exists() else "",
                               "files": sorted(os.listdir(out))})

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    with open(disk_path / "filler", "wb", buffering=0) as filler:  # another program takes every free byte
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as error:
            report["filled"] = error.errno
    stdout, stderr = process.communicate()
    report["runs"].append({"rc": process.returncode, "stdout": stdout, "stderr": stderr,
                           "log": (out / "train_log.jsonl").read_bytes().decode("utf-8", "replace"),
                           "files": sorted(os.listdir(out))})
    os.truncate(disk_path / "filler", (disk_path / "filler").stat().st_size - 2 * 4096)
    run()  # two pages free: the log's next one fits, a checkpoint does not
    (disk_path / "filler").unlink()
    run()  # space is back
    if (out / "adapter").is_dir():
        shutil.copytree(out / "adapter", results_path / "adapter")
    (results_path / "report.json").write_text(json.dumps(report))


@pytest.mark.integration
def test_a_disk_filling_up_stops_align_clearly_and_the_run_resumes_exactly(tiny_pair, tiny_cache, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs `unshare` to mount a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.decode().strip()}")
    reference = tmp_path / "reference"
    done = subprocess.run(pkt_align_command(tiny_pair, tiny_cache, reference), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    disk, results = tmp_path / "disk", tmp_path / "results"
    disk.mkdir()
    results.mkdir()
    command_file = tmp_path / "command.json"
    command_file.write_text(json.dumps(pkt_align_command(tiny_pair, tiny_cache, disk / "run")))
    scenario = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent)]!r}; import test_align_reliability as t; "
                f"t.disk_full_scenario({str(command_file)!r}, {str(disk)!r}, {str(results)!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    subprocess.run(["unshare", "-rm", sys.executable, "-c", scenario], check=True, env=env, timeout=900)
    report = json.loads((results / "report.json").read_text())
    assert report["filled"] == 28  # ENOSPC
    full, nearly_full, freed = report["runs"]

    # The disk filled while the log was flushed at step 40: the line crossing the 4096th byte is torn.
    assert not full["log"].endswith("\n") and len(full["log"].encode()) == 4096, full["log"][-300:]
    for stopped in (full, nearly_full):
        assert stopped["rc"] == 1, stopped["stderr"]
        assert "Traceback" not in stopped["stderr"] and "Expecting" not in stopped["stderr"], stopped["stderr"]
        assert f"writing to {disk / 'run'} failed ([Errno 28] No space left on device)" in stopped["stderr"]
        assert "The checkpoint at step 20 is intact; free space (or fix the error) and rerun the same command " \
               "to resume" in stopped["stderr"]
    # The rerun dropped the torn line, logged steps 21-40 and failed writing its checkpoint, leaving no part of it.
    assert f"resuming {disk / 'run'} at step 20 " in nearly_full["stdout"]
    assert [json.loads(line)["step"] for line in nearly_full["log"].splitlines()] == list(range(1, 41))
    assert "checkpoint.tmp" not in nearly_full["files"] and "checkpoint" in nearly_full["files"]
    assert freed["rc"] == 0, freed["stderr"]
    assert f"resuming {disk / 'run'} at step 20 " in freed["stdout"]
    assert [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in freed["log"].splitlines()] \
        == log_entries(reference)
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    for name, value in load_file(results / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0)


# --- item 8: micro-batches weighted by what each loss averages over ----------------------------------------------


@pytest.fixture(scope="module")
def every_extra_cache(tiny_pair, tmp_path_factory) -> Path:
    """A cache every built-in method can train from: hidden states and deltas, top-k, and both extras."""
    from stages import extract

    folder = tmp_path_factory.mktemp("extras-data")
    write_dataset(folder / "extract.jsonl", 4, seed=11)
    write_dataset(folder / "align.jsonl", 8, seed=12)
    data = write_dataset(folder / "train.jsonl", 12, seed=13)
    out = folder / "cache"
    extract.run(extract_config(tiny_pair["teacher"], data, out, "extract.capture=[hidden, delta]",
                               "extract.extras=[laten, seeking]", f"student={tiny_pair['student']}",
                               "methods.laten.teacher.locate_examples=2"), progress=False, echo=lambda *_: None)
    return out


def _method_and_batch(tiny_pair, cache: Path, name: str, options: list[str]):
    """The method, student and one training batch, built as `pkt align` builds them."""
    resolved = resolve(load_config(overrides=[f"student={tiny_pair['student']}", f"align.cache={cache}",
                                              f"align.method={name}", "runtime.dtype=float32", "align.batch_size=4",
                                              "align.lora.r=4", "align.lora.dropout=0.0", *options]), name)
    cfg = resolved.align
    model = load_model(tiny_pair["student"], dtype="float32", device="cpu")
    method = resolved.method_class(AlignContext(open_cache(cache), cfg, load_tokenizer(tiny_pair["student"]),
                                                settings=resolved.settings))
    torch.manual_seed(cfg.seed)
    if method.uses_lora:
        model = with_lora(model, cfg.lora)
    elif not method.frozen_student:
        model = model.float()
    method.setup(model)
    phase = method.phases(8, model.config.num_hidden_layers)[0]
    names = set(method.trainable(model, phase))
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_name in names)
    # A cross-tokenizer method reads the student's own tokenization (here the same tokenizer: every token aligned).
    student = (align_cache(open_cache(cache), load_tokenizer(tiny_pair["student"]), who=name, progress=False)
               if method.cross_tokenizer else None)
    loader = method.loader(phase, cfg.seed) or CacheLoader(
        open_cache(cache), batch_size=cfg.batch_size, layers=phase.teacher_layers, kind=method.teacher_kind,
        topk=method.needs_topk, seed=cfg.seed, shuffle_buffer=8, student=student,
        target_logprob=method.needs_target_logprob)
    with loader:
        batch = next(iter(loader.batches(1)))
    model.eval()  # no dropout: both passes see the same network
    return method, model, phase, names, batch


BUILT_IN = [name for name in available_methods() if get_method(name).__module__.startswith("pkt_pipeline.")]
VARIANTS = [(name, []) for name in BUILT_IN] + [("semalign", ["methods.semalign.layer_loss=fisher"]),
                                                ("semalign", ["methods.semalign.objective=v1"]),
                                                ("kd", ["align.output_tokens=answer"])]


@pytest.mark.parametrize("name, options", VARIANTS, ids=[" ".join([n, *o]) for n, o in VARIANTS])
def test_micro_batches_of_one_give_the_whole_batch_gradient(tiny_pair, every_extra_cache, name, options):
    method, model, phase, names, batch = _method_and_batch(tiny_pair, every_extra_cache, name, options)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) > 1, f"the batch's examples must differ in length: {lengths}"
    results = []
    for size in (0, 1):
        model.zero_grad(set_to_none=True)
        loss, parts = _accumulate_gradients(model, method, batch, phase, size)
        results.append((loss, parts, {n: p.grad.clone() for n, p in model.named_parameters() if n in names}))
    (loss, parts, whole), (micro_loss, micro_parts, micro) = results
    assert micro_loss == pytest.approx(loss, rel=1e-5) and micro_parts == pytest.approx(parts, rel=1e-5)
    assert any(gradient.abs().sum() > 0 for gradient in whole.values())
    scale = max(float(gradient.abs().max()) for gradient in whole.values())
    for parameter_name in names:  # float32 sums in another order: equal to ~1e-6 of the largest gradient
        torch.testing.assert_close(micro[parameter_name], whole[parameter_name], rtol=1e-3, atol=1e-5 * scale)


# --- item 11: a planted checkpoint ---------------------------------------------------------------------------


class _NanAtHighRate(NanAtThirdStep):
    """NaN at the third step only when align.lr is at least 1 (a diverging run; lower rates train)."""

    diverges_at_lr = 1.0


def _diverged_run(tiny_pair, tiny_cache, out: Path):
    """A run stopped by a NaN at step 3, its checkpoint (step 2) left in `out`."""
    from pkt_pipeline.training import NonFiniteLoss

    if "test-diverges" not in available_methods():
        register("test-diverges", method=_NanAtHighRate)
    with pytest.raises(NonFiniteLoss, match=r"the loss is nan at step 3 .*Lower align.lr"):
        align.run(align_config(tiny_pair, tiny_cache, out, "test-diverges", "align.steps=4", "align.lr=2",
                               "align.checkpoint_every=2"), progress=False)
    assert (out / "checkpoint").is_dir()


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "planted code ran"))


def test_a_planted_pickle_in_the_checkpoint_is_refused_unread(tiny_pair, tiny_cache, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    _diverged_run(tiny_pair, tiny_cache, out)
    for name in os.listdir(out / "checkpoint"):
        if name != "trained.safetensors":
            (out / "checkpoint" / name).unlink()
    torch.save({"position": _Planted(marker)}, out / "checkpoint" / "state.pt")
    with pytest.raises(ValueError) as error:
        align.run(align_config(tiny_pair, tiny_cache, out, "test-diverges", "align.steps=4", "align.lr=2",
                               "align.checkpoint_every=2"), progress=False)
    assert not marker.exists()
    message = str(error.value)
    assert f"{out / 'checkpoint' / 'state.pt'}" in message and "pickle" in message and "not loaded" in message
    assert f"delete {out / 'checkpoint'}" in message


# --- item 14: the NaN remedy, a damaged checkpoint folder, a small cache ------------------------------------------


def test_after_a_nan_the_suggested_lower_rate_starts_afresh(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "run"
    _diverged_run(tiny_pair, tiny_cache, out)
    lines: list[str] = []
    summary = align.run(align_config(tiny_pair, tiny_cache, out, "test-diverges", "align.steps=4", "align.lr=1e-3",
                                     "align.checkpoint_every=2"), progress=False, echo=lines.append)
    assert summary["action"] == "trained"
    assert not any("resuming" in line for line in lines) and any("starts afresh" in line for line in lines), lines
    fresh = tmp_path / "fresh"
    align.run(align_config(tiny_pair, tiny_cache, fresh, "test-diverges", "align.steps=4", "align.lr=1e-3",
                           "align.checkpoint_every=2"), progress=False)
    assert log_entries(out) == log_entries(fresh)
    expected = load_file(fresh / "adapter" / "adapter_model.safetensors")
    for name, value in load_file(out / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0)


def test_a_checkpoint_missing_a_file_is_named(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "run"
    _diverged_run(tiny_pair, tiny_cache, out)
    (out / "checkpoint" / "trained.safetensors").unlink()
    with pytest.raises(ValueError) as error:
        align.run(align_config(tiny_pair, tiny_cache, out, "test-diverges", "align.steps=4", "align.lr=2",
                               "align.checkpoint_every=2"), progress=False)
    message = str(error.value)
    assert f"the checkpoint in {out / 'checkpoint'} lacks trained.safetensors" in message
    assert f"delete {out / 'checkpoint'}" in message


def test_semalign_with_its_defaults_trains_on_a_small_cache(tiny_pair, tiny_dataset, tmp_path):
    from stages import extract

    cache = tmp_path / "cache"
    extract.run(extract_config(tiny_pair["teacher"], tiny_dataset, cache, "extract.capture=[hidden, delta]",
                               "extract.limit=8"), progress=False)
    lines: list[str] = []
    config = load_config(overrides=[f"student={tiny_pair['student']}", f"align.cache={cache}",
                                    f"align.out={tmp_path / 'out'}", "align.method=semalign"])
    summary = align.run(config, progress=False, echo=lines.append)
    assert summary["action"] == "trained" and summary["metrics"]["steps"] == 2
    assert list(summary["metrics"]["phases"]) == ["layer 1", "layer 2"]
    assert any("raised to 2, one per phase" in line for line in lines), lines
