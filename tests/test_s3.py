"""A team cache on S3, against a real S3 server process (`s3_server` in conftest.py).

Extraction straight into a bucket (killed with -9 and resumed), `pkt cache verify`, `pkt align`
streaming from the bucket, and a DVC S3 remote, each checked against the same cache written to
local disk. pkt is given only an `s3://` URL: the endpoint and credentials come from the
environment, as they do for a user.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from safetensors.numpy import load_file

from pkt_pipeline.cache import CacheError, CacheFiles, WriterLock, open_cache, verify_cache
from pkt_pipeline.cache.layout import LEDGER_DIR, LOCK_FILE, MANIFEST_FILE, ledger_key
from tiny_data import SMALL_LAYOUT

# The tests that run `pkt extract` in a subprocess killed with -9 (the `s3_cache` fixture) are `integration`;
# the others start only the S3 server (a few seconds) and run in `make test`; `pytest -k s3` selects all of them.

SETTINGS = [*SMALL_LAYOUT, "runtime.dtype=float32", "extract.limit=8"]


def pkt_here(*args: str) -> subprocess.CompletedProcess:
    """The `pkt` command in this process (no interpreter start-up); an unexpected exception fails the test."""
    from click.testing import CliRunner

    from pkt_pipeline.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def extract_args(tiny_pair, data, out) -> list[str]:
    sets = [x for setting in SETTINGS for x in ("--set", setting)]
    return ["extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(data), "--out", str(out), "--no-progress", *sets]


def s3() -> fsspec.AbstractFileSystem:
    """A filesystem of the test's own that lists the bucket afresh every time (pkt's writer is another process)."""
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def checksums_at(url: str) -> dict[str, str | None]:
    return json.loads(s3().cat_file(f"{url}/{MANIFEST_FILE}"))["checksums"]


@pytest.fixture(scope="module")
def local_cache(tiny_pair, tiny_dataset, tmp_path_factory) -> Path:
    """The reference: the same `pkt extract` written to local disk in one uninterrupted run."""
    out = tmp_path_factory.mktemp("s3ref") / "cache"
    result = pkt_here(*extract_args(tiny_pair, tiny_dataset, out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def s3_cache(tiny_pair, tiny_dataset, s3_bucket) -> dict:
    """`pkt extract --out s3://...` in a subprocess killed with -9 after two groups, then rerun to resume."""
    url = f"{s3_bucket}/team/tiny"
    process = subprocess.Popen([sys.executable, "-m", "pkt_pipeline.cli", *extract_args(tiny_pair, tiny_dataset, url)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fs, ledger = s3(), f"{url}/{LEDGER_DIR}"
    deadline = time.monotonic() + 600
    while not (fs.exists(ledger) and len(fs.ls(ledger)) >= 2):
        if process.poll() is not None:
            pytest.fail(f"extract to {url} ended before writing two groups: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"extract to {url} wrote no two groups in time")
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = {"ledger": len(fs.ls(ledger)), "groups": json.loads(fs.cat_file(f"{url}/run.json"))["layout"]["groups"],
              "lock": fs.exists(f"{url}/{LOCK_FILE}"), "manifest": fs.exists(f"{url}/{MANIFEST_FILE}")}
    resumed = pkt_here(*extract_args(tiny_pair, tiny_dataset, url))
    return {"url": url, "killed": killed, "resumed": resumed}


@pytest.mark.integration
def test_s3_extract_resumes_after_kill_9_byte_identical(s3_cache, local_cache):
    killed, resumed = s3_cache["killed"], s3_cache["resumed"]
    assert killed["ledger"] < killed["groups"], "the kill came after the run had finished"
    assert killed["lock"] and not killed["manifest"]
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    local = json.loads((local_cache / MANIFEST_FILE).read_text())["checksums"]
    assert checksums_at(s3_cache["url"]) == local
    assert not s3().exists(f"{s3_cache['url']}/{LOCK_FILE}")


@pytest.mark.integration
def test_s3_cache_verify_passes_and_names_a_damaged_shard(s3_cache):
    url = s3_cache["url"]
    result = pkt_here("cache", "verify", url)
    assert result.returncode == 0, result.stderr
    assert f"{url}: ok" in result.stdout
    shard = "hidden/02/c/1/0"
    fs = s3()
    original = fs.cat_file(f"{url}/{shard}")
    try:
        fs.pipe_file(f"{url}/{shard}", original[:-1] + bytes([original[-1] ^ 1]))
        damaged = pkt_here("cache", "verify", url)
        assert damaged.returncode == 1
        assert f"checksum mismatch: {shard}" in damaged.stdout + damaged.stderr
        with pytest.raises(CacheError, match=f"the cache at {url} is damaged: checksum mismatch: {shard}"):
            open_cache(url).hidden(2, open_cache(url).group_examples(1)[0])
    finally:
        fs.pipe_file(f"{url}/{shard}", original)
    assert verify_cache(url) == []


@pytest.mark.integration
def test_s3_align_streams_from_the_bucket_as_from_disk(tiny_pair, s3_cache, local_cache, tmp_path):
    runs = {}
    for name, cache in (("s3", s3_cache["url"]), ("local", local_cache)):
        out = tmp_path / name
        result = pkt_here("align", "--cache", str(cache), "--student", str(tiny_pair["student"]), "--method", "kd",
                          "--out", str(out), "--no-progress", "--set", "runtime.dtype=float32", "--set", "align.steps=2",
                          "--set", "align.batch_size=2")
        assert result.returncode == 0, result.stderr
        runs[name] = out
    logs = {name: [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
            for name, out in runs.items()}
    assert logs["s3"] == logs["local"] and len(logs["s3"]) == 2
    s3_weights, local_weights = (load_file(out / "model" / "model.safetensors") for out in runs.values())
    assert s3_weights.keys() == local_weights.keys()
    for key in s3_weights:
        assert (s3_weights[key] == local_weights[key]).all(), key


def test_s3_writer_sees_files_another_process_wrote(s3_bucket):
    """fsspec keeps directory listings; a writer that trusted one would miss the groups other ranks wrote."""
    url = f"{s3_bucket}/listing"
    files = CacheFiles(url)
    first, second = ledger_key(0), ledger_key(1)
    files.write_json(first, {"group": 0})
    assert files.listdir(LEDGER_DIR) == [posixpath.basename(first)]
    s3().pipe_file(f"{url}/{second}", b"{}")
    assert files.listdir(LEDGER_DIR) == [posixpath.basename(first), posixpath.basename(second)]
    assert files.exists(second)


def test_s3_one_writer_holds_the_lock(s3_bucket):
    url = f"{s3_bucket}/locked"
    lock = WriterLock.acquire(url)
    with pytest.raises(CacheError, match=f"{url} is being written by another pkt process"):
        WriterLock.acquire(url)
    lock.release()
    assert not s3().exists(f"{url}/{LOCK_FILE}")
    WriterLock.acquire(url).release()


def dvc(repo: Path, *args: str) -> None:
    from dvc.cli import main

    assert main(["--cd", str(repo), *args]) == 0, f"dvc {' '.join(args)} failed"


def test_s3_dvc_remote_push_and_pull(local_cache, s3_bucket, s3_server, tmp_path):
    repo = tmp_path / "team"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    shutil.copytree(local_cache, repo / "cache" / "tiny")
    dvc(repo, "add", "-q", "cache/tiny")
    store = f"{s3_bucket}/dvcstore"
    dvc(repo, "remote", "add", "-d", "team", store)
    dvc(repo, "remote", "modify", "team", "endpointurl", s3_server)
    assert "AWS_SECRET_ACCESS_KEY" not in (repo / ".dvc" / "config").read_text()
    dvc(repo, "push", "-q")
    contents = {hashlib.md5(p.read_bytes()).hexdigest() for p in local_cache.rglob("*") if p.is_file()}
    pushed = {posixpath.dirname(key)[-2:] + posixpath.basename(key) for key in s3().find(store)}
    assert contents < pushed and len(pushed - contents) == 1  # DVC's objects are content-addressed, + the .dir listing
    shutil.rmtree(repo / "cache" / "tiny")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull", "-q")
    pulled = repo / "cache" / "tiny"
    assert {str(p.relative_to(pulled)): p.read_bytes() for p in pulled.rglob("*") if p.is_file()} == \
        {str(p.relative_to(local_cache)): p.read_bytes() for p in local_cache.rglob("*") if p.is_file()}
    assert verify_cache(pulled) == []
