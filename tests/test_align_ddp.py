"""`pkt align` under torchrun (issue 16, item 2): two gloo processes on CPU, each reading its slice of every
global batch, train the weights one process trains on the same batches; a killed two-process run resumes
exactly. The reference is the single-process stage; the two-process runs are real `torchrun` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # accelerate's dependency
import pytest
import torch
from safetensors.torch import load_file

from pkt_pipeline.config import load_config
from pkt_pipeline.loader import CacheLoader
from stages import align

FAST = ["runtime.dtype=float32", "align.lr=5e-3", "align.loader.shuffle_buffer=8", "align.lora.r=4",
        "align.lora.alpha=8", "align.checkpoint_every=1000"]
# batch 3 over 2 ranks: slices of 2 and 1 examples, so the ranks' shares of a batch differ
KD = ["align.batch_size=3", "align.steps=10", "align.micro_batch_size=1"]
SEMALIGN = ["align.batch_size=3", "align.steps=40", "align.checkpoint_every=4"]


def settings(tiny_pair, cache, method: str, extra: list[str]) -> list[str]:
    return [f"student={tiny_pair['student']}", f"align.cache={cache}", f"align.method={method}", *FAST, *extra]


def single_process(tiny_pair, cache, out: Path, method: str, extra: list[str]) -> Path:
    align.run(load_config(overrides=[*settings(tiny_pair, cache, method, extra), f"align.out={out}"]), progress=False)
    return out


def torchrun_command(tiny_pair, cache, out: Path, method: str, extra: list[str]) -> list[str]:
    overrides = [x for setting in settings(tiny_pair, cache, method, extra) for x in ("--set", setting)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "pkt_pipeline.cli", "align", "--out", str(out), "--no-progress", *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def two_processes(tiny_pair, cache, out: Path, method: str, extra: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(tiny_pair, cache, out, method, extra), capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def log(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_training(multi: Path, single: Path, initial: dict[str, torch.Tensor]) -> None:
    """The same weights within float tolerance (sums over other slices and paddings round differently: on
    the tiny pair they differ by <= 1.3e-7 where training moved them by up to 0.06), and the same logged
    steps: loss, tokens and phases."""
    reference, trained = weights(single), weights(multi)
    assert trained.keys() == reference.keys()
    changed = 0
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, initial[name])
    assert changed, "training changed no weight: the comparison would prove nothing"
    ours, theirs = log(multi), log(single)
    assert [(e["step"], e["phase"], e["tokens"]) for e in ours] == [(e["step"], e["phase"], e["tokens"]) for e in theirs]
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def initial(tiny_pair) -> dict[str, torch.Tensor]:
    """The untrained student's weights."""
    return load_file(tiny_pair["student"] / "model.safetensors")


@pytest.fixture(scope="module")
def semalign_runs(tiny_pair, tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """SemAlign trained by one process and, uninterrupted, by two."""
    folder = tmp_path_factory.mktemp("semalign")
    two_processes(tiny_pair, tiny_cache, folder / "two", "semalign", SEMALIGN)
    return {"one": single_process(tiny_pair, tiny_cache, folder / "one", "semalign", SEMALIGN), "two": folder / "two"}


@pytest.mark.integration
def test_kd_on_two_processes_trains_the_single_process_weights(tiny_pair, tiny_cache, initial, tmp_path):
    result = two_processes(tiny_pair, tiny_cache, tmp_path / "two", "kd", KD)
    assert_same_training(tmp_path / "two", single_process(tiny_pair, tiny_cache, tmp_path / "one", "kd", KD), initial)
    assert result.stdout.count("trained kd") == 1, result.stdout  # rank 0 alone reports (and writes)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.integration
def test_semalign_on_two_processes_trains_the_single_process_weights(semalign_runs, initial):
    """SemAlign switches its trainable set at each frontier stage: the gradient sum follows it."""
    assert {e["phase"] for e in log(semalign_runs["two"])} == {"layer 1", "layer 2"}
    assert_same_training(semalign_runs["two"], semalign_runs["one"], initial)


@pytest.mark.integration
def test_a_rank_with_an_empty_slice_adds_nothing(tiny_pair, tiny_cache, initial, tmp_path):
    """24 examples at batch 23: the epoch's last batch holds one example, so rank 1's slice is empty."""
    extra = ["align.batch_size=23", "align.loader.shuffle_buffer=23", "align.steps=2"]
    with CacheLoader(tiny_cache, batch_size=23, shuffle_buffer=23, rank=1, world=2, topk=False) as loader:
        assert [len(batch.example_ids) for batch in loader.batches(2)] == [11, 0]
    two_processes(tiny_pair, tiny_cache, tmp_path / "two", "kd", extra)
    assert_same_training(tmp_path / "two", single_process(tiny_pair, tiny_cache, tmp_path / "one", "kd", extra),
                         initial)


def checkpointed_step(out: Path) -> int | None:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["position"]["global_step"]
    except (OSError, ValueError):
        return None


@pytest.mark.integration
def test_a_killed_two_process_run_resumes_exactly(tiny_pair, tiny_cache, semalign_runs, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(torchrun_command(tiny_pair, tiny_cache, out, "semalign", SEMALIGN),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while checkpointed_step(out) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    ranks = psutil.Process(process.pid).children(recursive=True)  # torchrun starts each in its own session
    for victim in [psutil.Process(process.pid), *ranks]:
        victim.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(ranks, timeout=30)
    killed_at = checkpointed_step(out)
    assert killed_at is not None and not (out / "metrics.json").exists(), "the run ended before it was killed"
    result = two_processes(tiny_pair, tiny_cache, out, "semalign", SEMALIGN)
    assert f"resuming {out} at step" in result.stdout
    assert log(out) == log(semalign_runs["two"])
    uninterrupted = weights(semalign_runs["two"])
    for name, value in weights(out).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=name)


def test_the_loader_refuses_a_rank_outside_the_world(tiny_cache):
    with pytest.raises(ValueError, match=r"rank must be in \[0, world\) = \[0, 2\), got 2"):
        CacheLoader(tiny_cache, batch_size=4, rank=2, world=2)


def test_an_accelerate_fsdp_config_is_refused(tiny_pair, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = load_config(overrides=[*settings(tiny_pair, tiny_cache, "kd", KD), f"align.out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="pkt align does not shard the student .FSDP.: ACCELERATE_USE_FSDP"):
        align.run(config, progress=False)
    assert not (tmp_path / "out").exists()


RANKS_DISAGREE = """
import sys
from pathlib import Path
from pkt_pipeline.models import distributed_context
from pkt_pipeline.training import _check_same_start

rank, world = distributed_context()
resume = {"position": {"global_step": 8}} if rank == 0 else None  # rank 1 sees no checkpoint
try:
    _check_same_start(Path(sys.argv[1]), resume)
except ValueError as exc:
    print(f"rank {rank} refused: {exc}")
"""


@pytest.mark.integration
def test_ranks_that_find_different_checkpoints_are_refused_on_every_rank(tmp_path):
    """An `align.out` not shared by the ranks (several machines, no shared filesystem) would let each rank
    resume from its own step and wait forever at the first exchange the others never reach."""
    script = tmp_path / "disagree.py"
    script.write_text(RANKS_DISAGREE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (f"rank {rank} refused: the ranks found different checkpoints in {tmp_path / 'out'} (rank 0: step 8, "
                "rank 1: no checkpoint); align.out must be one folder every rank sees") in result.stdout
