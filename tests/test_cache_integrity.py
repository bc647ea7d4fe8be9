"""Stage two trusts nothing it reads: checksums per shard, finite teacher values, paths inside the cache."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pkt_pipeline.cache import CacheError, open_cache, verify_cache
from pkt_pipeline.cache.store import shard_file
from pkt_pipeline.config import load_config
from pkt_pipeline.loader import CacheLoader
from pkt_pipeline.models import load_model
from stages import align, extract
from tiny_data import SMALL_LAYOUT, extract_config, write_dataset

ALIGN = ["runtime.dtype=float32", "align.batch_size=4", "align.loader.shuffle_buffer=8", "align.lora.r=4",
         "align.lora.alpha=8", "align.checkpoint_every=1000", "align.steps=4"]  # one epoch: reads every group


def cli(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """The `pkt` command: in this process (an unexpected exception fails the test), or, given a
    `timeout`, in a child process, for the cases where a regression could hang the reader."""
    if timeout is not None:
        return subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", *args], capture_output=True, text=True,
                              timeout=timeout)
    from click.testing import CliRunner

    from pkt_pipeline.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity-data")
    write_dataset(folder / "extract.jsonl", 2, seed=1)
    return write_dataset(folder / "train.jsonl", 16)


def config(tiny_pair, data, out, *extra):
    # Uncompressed shards: a flipped byte still decodes, to a changed value (the silent case).
    return extract_config(tiny_pair["teacher"], data, out, "extract.compressor=none", "extract.layers=[1, 2]", *extra)


@pytest.fixture(scope="module")
def pristine(tiny_pair, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "cache"
    extract.run(config(tiny_pair, data, out), progress=False)
    return out


@pytest.fixture
def cache_copy(pristine, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def read_everything(path: Path, layers=(1, 2)) -> list:
    with CacheLoader(path, batch_size=4, layers=list(layers), shuffle_buffer=8) as loader:
        return list(loader)


# Item 5: the loader verifies every shard it reads against the manifest, once per shard.

def test_a_missing_shard_is_refused_by_align_naming_it(tiny_pair, cache_copy, tmp_path):
    key = shard_file("topk/logprobs", 2, 1)
    (cache_copy / key).unlink()
    with pytest.raises(CacheError) as error:
        read_everything(cache_copy)
    assert f"missing file: {key}" in str(error.value) and "rerun `pkt extract`" in str(error.value)
    overrides = [f"student={tiny_pair['student']}", f"align.cache={cache_copy}", f"align.out={tmp_path / 'out'}",
                 "align.method=kd", *ALIGN]
    with pytest.raises(CacheError, match=f"missing file: {key}"):
        align.run(load_config(overrides=overrides), progress=False)


def test_a_flipped_byte_that_still_decodes_is_refused(cache_copy):
    key = shard_file("topk/logprobs", 2, 0)
    before = open_cache(cache_copy).root["topk/logprobs"][:]
    flip_a_byte(cache_copy / key)
    assert not np.array_equal(open_cache(cache_copy).root["topk/logprobs"][:], before)  # zarr alone does not notice
    with pytest.raises(CacheError) as error:
        read_everything(cache_copy)
    assert f"checksum mismatch: {key}" in str(error.value) and "pkt extract" in str(error.value)


def test_a_damaged_index_is_refused(cache_copy):
    flip_a_byte(cache_copy / "index.parquet")
    with pytest.raises(CacheError, match="index.parquet"):
        read_everything(cache_copy)


def test_each_shard_is_hashed_once_per_cache(pristine):
    cache = open_cache(pristine)
    hashed: list[str] = []
    real_sha256 = cache.files.sha256

    def counting(key: str) -> str | None:
        hashed.append(key)
        return real_sha256(key)

    cache.files.sha256 = counting
    with CacheLoader(cache, batch_size=4, layers=[2], shuffle_buffer=8) as loader:
        list(loader.batches(3 * len(loader)))  # three epochs
    with CacheLoader(cache, batch_size=4, layers=[1, 2], shuffle_buffer=8) as loader:
        list(loader)
    assert len(hashed) == len(set(hashed))
    groups = manifest(pristine)["layout"]["groups"]
    shards = {shard_file(key, 2 if "/" in key else 1, g) for g in range(groups)
              for key in ("tokens", "supervised", "answer", "hidden/01", "hidden/02", "topk/logprobs", "topk/indices")}
    present = {key for key in shards if manifest(pristine)["checksums"].get(key)}
    assert present <= set(hashed)


def test_rerunning_extract_repairs_damaged_shards(tiny_pair, data, pristine, cache_copy):
    missing, flipped = shard_file("hidden/01", 2, 1), shard_file("topk/indices", 2, 0)
    (cache_copy / missing).unlink()
    flip_a_byte(cache_copy / flipped)
    messages: list[str] = []
    summary = extract.run(config(tiny_pair, data, cache_copy), progress=False, echo=messages.append)
    assert summary["action"] == "repaired" and summary["groups"] == [0, 1]
    assert any(missing in message and flipped in message for message in messages)
    assert manifest(cache_copy) == manifest(pristine)
    for key in (missing, flipped):
        assert (cache_copy / key).read_bytes() == (pristine / key).read_bytes()
    assert verify_cache(cache_copy) == []
    assert len(read_everything(cache_copy)) == 4
    again = extract.run(config(tiny_pair, data, cache_copy), progress=False, echo=messages.append)
    assert again["action"] == "up to date"


# Item 6: non-finite teacher values stop extraction; verify finds them in a cache.

@pytest.fixture(scope="module")
def broken_teacher(tiny_pair, tmp_path_factory) -> Path:
    model = load_model(tiny_pair["teacher"], dtype="float32")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    out = tmp_path_factory.mktemp("nan-teacher")
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(tiny_pair["teacher"]):
        if name.startswith(("tokenizer", "special_tokens")) or name.endswith(".jinja"):
            shutil.copy(tiny_pair["teacher"] / name, out / name)
    return out


def test_a_teacher_producing_non_finite_values_stops_extraction(broken_teacher, data, tmp_path):
    cfg = extract_config(broken_teacher, data, tmp_path / "cache", "extract.layers=[1, 2]")
    with pytest.raises(CacheError) as error:
        extract.run(cfg, progress=False)
    message = str(error.value)
    assert "non-finite" in message and "hidden/02" in message and "example 'ex0" in message
    assert not (tmp_path / "cache" / "manifest.json").exists()
    process = cli("extract", "--teacher", str(broken_teacher), "--data", str(data), "--out", str(tmp_path / "cli"),
                  "--set", "runtime.dtype=float32", "--set", "extract.layers=[1, 2]", "--no-progress",
                  *(arg for setting in SMALL_LAYOUT for arg in ("--set", setting)))
    assert process.returncode == 1 and "non-finite" in process.stderr and "Traceback" not in process.stderr


def test_attribution_refuses_non_finite_scores_naming_the_example(broken_teacher, data, tiny_pair):
    from pkt_pipeline.attribution import accumulate_attribution
    from pkt_pipeline.examples import load_examples
    from pkt_pipeline.models import load_tokenizer

    examples, _ = load_examples(data, load_tokenizer(tiny_pair["teacher"]), max_length=96)
    with pytest.raises(CacheError, match=r"non-finite values \(NaN/inf\) in attribution output for example 'ex000'"):
        accumulate_attribution(load_model(broken_teacher, dtype="float32"), examples[:2], progress=False)


def rewrite_checksums(path: Path) -> None:
    """Re-record every file's checksum, as a cache written with these values would have them."""
    from pkt_pipeline.cache.store import CacheFiles

    files = CacheFiles(path)
    record = manifest(path)
    record["checksums"] = {key: files.sha256(key) if value is not None else None
                           for key, value in record["checksums"].items()}
    (path / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("key, value", [("hidden/02", 0x7FC0), ("topk/logprobs", np.nan),
                                        ("attribution/scores", np.inf)])
def test_verify_finds_non_finite_values(cache_copy, key, value):
    array = zarr.open_group(str(cache_copy), mode="r+", zarr_format=3)[key]
    if array.ndim == 1:
        data = array[:]
        data[1] = value
        array[:] = data
    else:
        block = array[130:131]
        block[0, 0] = value
        array[130:131] = block
    rewrite_checksums(cache_copy)
    problems = verify_cache(cache_copy)
    assert len(problems) == 1 and f"non-finite values in {key}" in problems[0]
    if key != "attribution/scores":
        example = open_cache(cache_copy).group_examples(1)[0]
        assert f"example {example!r}" in problems[0]
    process = cli("cache", "verify", str(cache_copy))
    assert process.returncode == 1 and "non-finite" in process.stderr


# Item 12: every path a cache names stays inside it and is a regular file.

def plant_key(path: Path, key: str, checksum: str | None = "0" * 64) -> None:
    record = manifest(path)
    record["checksums"][key] = checksum
    (path / "manifest.json").write_text(json.dumps(record))


# symlink-dev-zero runs pkt in child processes (a reader following the link would hang): 2 x ~12 s.
@pytest.mark.parametrize("kind", ["absolute", "parent", "symlink-outside",
                                  pytest.param("symlink-dev-zero", marks=pytest.mark.integration), "directory"])
def test_paths_named_by_a_manifest_stay_inside_the_cache(cache_copy, tmp_path, kind):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for pkt")
    if kind == "absolute":
        key = str(secret)
    elif kind == "parent":
        key = "../secret.txt"
    elif kind == "directory":
        key = "hidden"
    else:
        key = "hidden/evil"
        os.symlink(secret if kind == "symlink-outside" else "/dev/zero", cache_copy / key)
    plant_key(cache_copy, key)
    timeout = 60 if kind == "symlink-dev-zero" else None  # a reader following that link would never end
    verify = cli("cache", "verify", str(cache_copy), timeout=timeout)
    assert verify.returncode == 1 and f"unsafe path {key!r}" in verify.stderr, verify.stderr
    info = cli("cache", "info", str(cache_copy), timeout=timeout)
    assert info.returncode == 1 and f"unsafe path {key!r}" in info.stderr and "Traceback" not in info.stderr


def test_a_shard_replaced_by_a_link_to_dev_zero_is_refused_by_the_loader(cache_copy):
    key = shard_file("hidden/02", 2, 0)
    (cache_copy / key).unlink()
    os.symlink("/dev/zero", cache_copy / key)
    # In a child with bounded memory and time: a reader that follows the link reads zeros until it is killed.
    program = ("import sys\nfrom pkt_pipeline.loader import CacheLoader\n"
               "with CacheLoader(sys.argv[1], batch_size=4, layers=[2], shuffle_buffer=8) as loader:\n"
               "    list(loader)\n")

    def bounded_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    process = subprocess.run([sys.executable, "-c", program, str(cache_copy)], capture_output=True, text=True,
                             timeout=120, preexec_fn=bounded_memory)
    assert process.returncode == 1 and f"unsafe path {key!r}" in process.stderr, process.stderr[-2000:]


def test_paths_named_by_a_ledger_stay_inside_the_cache(cache_copy, tmp_path):
    (cache_copy / "manifest.json").unlink()
    ledger = cache_copy / "ledger" / "group-000000.json"
    entry = json.loads(ledger.read_text())
    entry["files"]["../../../../../../dev/zero"] = "0" * 64
    ledger.write_text(json.dumps(entry))
    verify = cli("cache", "verify", str(cache_copy), timeout=60)
    assert verify.returncode == 1 and "unsafe path '../../../../../../dev/zero'" in verify.stderr
