"""What pkt may delete, who may write a cache, and a cache whose creation was cut short.

`--overwrite` replaces only what pkt recognisably wrote; a half-made cache layout is resumed;
one writer at a time holds a cache (a lock naming its holder, taken over when stale); a finished
cache holds no stray `*.partial` file and its manifest is byte-identical across clean runs.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pkt_pipeline.cache import CacheError, CacheFiles, open_cache, verify_cache
from pkt_pipeline.cache.layout import INDEX_FILE, LOCK_FILE, RUN_FILE, ledger_key
from pkt_pipeline.methods import REGISTRY, ExtraOutput, TeacherExtra, register
from stages import extract
from tiny_data import SMALL_LAYOUT, extract_config, write_dataset

LIMIT = "extract.limit=8"


def pkt(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pkt_pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def pkt_here(*args: str) -> subprocess.CompletedProcess:
    """The `pkt` command in this process (no interpreter start-up); an unexpected exception fails the test."""
    from click.testing import CliRunner

    from pkt_pipeline.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def quiet(*_) -> None:
    pass


def extract_small(tiny_pair, data, out, *extra: str, teacher: str = "teacher") -> dict:
    return extract.run(extract_config(tiny_pair[teacher], data, out, LIMIT, *extra), progress=False, echo=quiet)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tiny_pair, tiny_dataset, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted or repeated run must equal byte for byte."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    extract_small(tiny_pair, tiny_dataset, out)
    return out


# 1. --overwrite never deletes what pkt did not write

def test_extract_overwrite_refuses_a_folder_pkt_did_not_write(tiny_pair, tiny_dataset, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("four years of work")
    for overwrite in ([], ["extract.overwrite=true"]):
        with pytest.raises(CacheError) as refused:
            extract_small(tiny_pair, tiny_dataset, thesis, *overwrite)
        message = str(refused.value)
        assert f"{thesis} exists and is not a pkt cache" in message and "thesis.tex" in message
        assert "--overwrite" not in message
        assert tree(thesis) == {"thesis.tex": b"four years of work"}


def test_extract_overwrite_keeps_a_users_file_inside_a_cache(tiny_pair, tiny_dataset, clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CacheError) as refused:
        extract_small(tiny_pair, tiny_dataset, out, "extract.overwrite=true", teacher="student")
    assert "holds files pkt did not write (notes.txt)" in str(refused.value)
    assert "--overwrite" not in str(refused.value)
    assert (out / "notes.txt").read_text() == "mine"
    assert open_cache(out).manifest.teacher.hidden_size == 64  # the teacher's cache is untouched


def test_extract_overwrite_still_replaces_another_cache(tiny_pair, tiny_dataset, clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    extract_small(tiny_pair, tiny_dataset, out, "extract.overwrite=true", teacher="student")
    assert open_cache(out).manifest.teacher.hidden_size == 32
    assert not (out / LOCK_FILE).exists()


def align_cli(tiny_pair, cache: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return pkt_here("align", "--cache", str(cache), "--student", str(tiny_pair["student"]), "--method", "kd",
                    "--out", str(out), "--no-progress", "--set", "runtime.dtype=float32", "--set", "align.steps=1",
                    "--set", "align.batch_size=2", *extra)


def test_align_overwrite_refuses_a_folder_pkt_did_not_write(tiny_pair, clean, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "one.tex").write_text("four years of work")
    (thesis / "run.json").write_text('{"not": "pkt"}')  # a file of that name alone does not make it ours
    for extra in ([], ["--overwrite"]):
        result = align_cli(tiny_pair, clean, thesis, *extra)
        assert result.returncode == 1, result.stderr
        assert f"{thesis} is not empty and holds no pkt align run" in result.stderr
        assert "--overwrite" not in result.stderr and "Traceback" not in result.stderr
        assert tree(thesis) == {"chapters/one.tex": b"four years of work", "run.json": b'{"not": "pkt"}'}


def test_align_trains_in_a_folder_holding_only_dvcs_gitignore(tiny_pair, clean, tmp_path):
    """A DVC stage's --out in a clone: DVC removed the stale outputs before the command, the committed
    `.gitignore` it wrote beside them stays, and is kept."""
    out = tmp_path / "runs" / "kd"
    out.mkdir(parents=True)
    (out / ".gitignore").write_text("/model\n")
    result = align_cli(tiny_pair, clean, out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / ".gitignore").read_text() == "/model\n" and (out / "metrics.json").exists()
    (out / "notes.txt").write_text("mine")
    refused = align_cli(tiny_pair, clean, out, "--overwrite")
    assert "holds files pkt align did not write (notes.txt)" in refused.stderr


def test_align_overwrite_replaces_only_its_own_run(tiny_pair, clean, tmp_path):
    out = tmp_path / "run"
    assert align_cli(tiny_pair, clean, out).returncode == 0
    (out / "notes.txt").write_text("mine")
    refused = align_cli(tiny_pair, clean, out, "--overwrite")
    assert refused.returncode == 1
    assert "holds files pkt align did not write (notes.txt)" in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").exists()
    (out / "notes.txt").unlink()
    again = align_cli(tiny_pair, clean, out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert "trained" in again.stdout


# 3. a cache whose layout creation was cut short is ours, and resumes

def fail_writing(monkeypatch, key: str) -> None:
    """Make the one write of `key` fail as on a full disk, everything before it having been written."""
    real = CacheFiles.write_bytes

    def write_bytes(self, name, data):
        if name == key:
            raise OSError(errno.ENOSPC, "No space left on device", self.full(name))
        return real(self, name, data)

    monkeypatch.setattr(CacheFiles, "write_bytes", write_bytes)


@pytest.mark.parametrize("key", [RUN_FILE, INDEX_FILE])
def test_a_layout_cut_short_is_resumed(tiny_pair, tiny_dataset, clean, tmp_path, monkeypatch, key):
    out = tmp_path / "cache"
    fail_writing(monkeypatch, key)
    with pytest.raises(CacheError, match=f"creating the cache in {out} failed .*No space left.*rerun the same command"):
        extract_small(tiny_pair, tiny_dataset, out)
    monkeypatch.undo()
    assert not (out / LOCK_FILE).exists()
    extract_small(tiny_pair, tiny_dataset, out)
    assert tree(out) == tree(clean)


def test_the_half_made_layout_of_earlier_versions_is_resumed(tiny_pair, tiny_dataset, clean, tmp_path):
    """Earlier versions wrote zarr.json, every array's metadata and the index, then run.json."""
    out = tmp_path / "cache"
    for path in [*clean.rglob("zarr.json"), clean / INDEX_FILE]:
        if not {"attribution", "teacher"} & set(path.relative_to(clean).parts):  # arrays written after the groups
            target = out / path.relative_to(clean)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    assert (out / "zarr.json").exists() and not (out / RUN_FILE).exists()
    extract_small(tiny_pair, tiny_dataset, out)
    assert tree(out) == tree(clean)


def test_a_run_without_its_record_but_with_data_is_not_wiped(tiny_pair, tiny_dataset, clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    (out / RUN_FILE).unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(CacheError, match=f"{out} holds cache data but no {RUN_FILE}.*--overwrite"):
        extract_small(tiny_pair, tiny_dataset, out)
    assert (out / ledger_key(0)).exists()


# 4. one writer at a time

HOLD = """
import sys
from pkt_pipeline.cache.store import WriterLock
lock = WriterLock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def hold_lock(out: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    return holder


@pytest.mark.integration
def test_a_second_writer_is_refused_naming_the_holder(tiny_pair, tiny_dataset, tmp_path):
    out = tmp_path / "cache"
    holder = hold_lock(out)
    try:
        second = pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(tiny_dataset), "--out", str(out),
                     "--no-progress", *[x for o in [*SMALL_LAYOUT, LIMIT] for x in ("--set", o)])
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 1, stderr
        assert f"{out} is being written by another pkt process (pid {holder.pid} on {socket.gethostname()}" in stderr
        assert "Traceback" not in stderr
        assert not (out / RUN_FILE).exists()
        with pytest.raises(CacheError, match=f"pid {holder.pid}"):
            extract_small(tiny_pair, tiny_dataset, out)
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_killed_writer_is_taken_over(tiny_pair, tiny_dataset, clean, tmp_path):
    out = tmp_path / "cache"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    extract_small(tiny_pair, tiny_dataset, out)
    assert not (out / LOCK_FILE).exists()
    assert tree(out) == tree(clean)


def test_a_lock_file_naming_a_dead_process_is_stale(tiny_pair, tiny_dataset, tmp_path):
    """A lock whose holder is gone, as left on a filesystem without flock, or copied along with a cache."""
    from pkt_pipeline.cache.store import WriterLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "cache"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
    WriterLock.acquire(out).release()
    assert not (out / LOCK_FILE).exists()
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere", "started": "then"}))
    with pytest.raises(CacheError, match=f"pid {int(dead.stdout)} on elsewhere.*delete {out / LOCK_FILE}"):
        WriterLock.acquire(out)


@pytest.mark.integration
def test_the_lock_is_released_on_ctrl_c(tiny_pair, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", 160, seed=2)
    write_dataset(tmp_path / "extract.jsonl", 2, seed=3)
    out = tmp_path / "cache"
    process = pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(data), "--out", str(out),
                  "--no-progress", *[x for o in [*SMALL_LAYOUT, "runtime.dtype=float32"] for x in ("--set", o)])
    deadline = time.time() + 240
    while not list((out / "ledger").glob("*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert (out / LOCK_FILE).exists()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert not (out / LOCK_FILE).exists()


def test_an_error_releases_the_lock_and_a_folder_it_made(tiny_pair, tmp_path):
    out = tmp_path / "new" / "cache"
    with pytest.raises(FileNotFoundError):
        extract_small(tiny_pair, tmp_path / "nope.jsonl", out)
    assert not out.exists()


def test_the_lock_takes_a_conditional_create_on_other_filesystems(tmp_path):
    from pkt_pipeline.cache.store import WriterLock

    url = f"memory://pkt-lock-test-{time.time_ns()}/cache"
    lock = WriterLock.acquire(url)
    with pytest.raises(CacheError, match=f"{url} is being written by another pkt process"):
        WriterLock.acquire(url)
    lock.release()
    WriterLock.acquire(url).release()


# smaller: stray partial files, a deterministic manifest, a truncated manifest

def test_stray_partial_files_are_removed_when_the_cache_completes(tiny_pair, tiny_dataset, clean, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    fail_writing(monkeypatch, ledger_key(1))
    with pytest.raises(CacheError, match="failed"):
        extract_small(tiny_pair, tiny_dataset, out)
    monkeypatch.undo()
    (out / f"{ledger_key(1)}.partial-4242").write_text("{\"gro")  # a write killed before its rename
    (out / "hidden" / "02" / "c" / "x.partial-4242").write_bytes(b"torn")
    extract_small(tiny_pair, tiny_dataset, out)
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert tree(out) == tree(clean)


class SlowOnce(TeacherExtra):
    """A real extra whose run time differs between runs, as every real one's does."""

    name = "test-slow-once"
    calls = 0

    def compute(self, teacher, tokenizer, config, data_path, progress):
        SlowOnce.calls += 1
        time.sleep(0.3 if SlowOnce.calls == 1 else 0)
        return ExtraOutput({"norm": np.array([teacher.model.norm.weight.sum().item()], np.float32)}, {"layers": 4})


def test_two_clean_runs_write_byte_identical_manifests(tiny_pair, tiny_dataset, tmp_path):
    register(SlowOnce.name, teacher=SlowOnce)
    try:
        first, second = tmp_path / "a" / "cache", tmp_path / "b" / "cache"
        metrics = tmp_path / "metrics.json"
        extract_small(tiny_pair, tiny_dataset, first, f"extract.extras=[{SlowOnce.name}]", f"extract.metrics={metrics}")
        extract_small(tiny_pair, tiny_dataset, second, f"extract.extras=[{SlowOnce.name}]")
    finally:
        REGISTRY.pop(SlowOnce.name, None)
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    assert json.loads(metrics.read_text())["extras_seconds"][SlowOnce.name] >= 0.3


def test_a_truncated_manifest_is_named(clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    with pytest.raises(CacheError, match=f"{manifest} is truncated or not valid JSON"):
        open_cache(out)
    for command in ("verify", "info"):
        process = pkt_here("cache", command, str(out))
        stderr = process.stderr
        assert process.returncode == 1
        assert f"{manifest} is truncated or not valid JSON" in stderr and "Traceback" not in stderr
    assert verify_cache(clean) == []
