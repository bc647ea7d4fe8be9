"""The memory-mapped read path: an uncompressed local cache read as views of its shard files equals
zarr's decoding reads array for array; the path is chosen by itself; damage is still refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.cache.mmap import MappedArray, read_shard_index, shard_layout
from pkt_pipeline.cache.store import shard_file
from pkt_pipeline.cache.verify import token_major_arrays
from pkt_pipeline.loader import CacheLoader
from tiny_data import SMALL_LAYOUT, write_dataset


def pkt(*args: str) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from pkt_pipeline.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def extract(tiny_pair, data: Path, out: Path, compressor: str) -> Path:
    overrides = [x for o in [*SMALL_LAYOUT, "runtime.dtype=float32", f"extract.compressor={compressor}",
                             "extract.capture=[hidden, delta]"] for x in ("--set", o)]
    result = pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(data), "--out", str(out),
                 "--no-progress", *overrides)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def caches(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """The same 20 examples extracted by `pkt extract` twice: uncompressed and zstd."""
    folder = tmp_path_factory.mktemp("mmap")
    data = write_dataset(folder / "train.jsonl", 20, seed=3)
    return {name: extract(tiny_pair, data, folder / name, name) for name in ("none", "zstd")}


def batches(cache) -> list:
    with CacheLoader(cache, batch_size=3, layers=[0, 2, 4], kind="hidden", shuffle_buffer=6, seed=5) as loader:
        hidden = list(loader)
    with CacheLoader(cache, batch_size=3, layers=[1, 3], kind="delta", shuffle_buffer=6, seed=5) as loader:
        return hidden + list(loader)


def test_mmap_reads_equal_zarr_reads_array_for_array(caches):
    mapped, decoded = open_cache(caches["none"]), open_cache(caches["none"], read_path="zarr")
    assert (mapped.read_path, decoded.read_path) == ("mmap", "zarr")
    keys = token_major_arrays(mapped.manifest)
    assert {"tokens", "supervised", "answer", "hidden/04", "delta/01", "topk/indices", "topk/logprobs"} <= set(keys)
    views = 0
    for group in range(mapped.manifest.layout.groups):
        ours, first = mapped.read_group(keys, group)
        reference, reference_first = decoded.read_group(keys, group)
        assert first == reference_first
        for key in keys:
            assert ours[key].dtype == reference[key].dtype and ours[key].shape == reference[key].shape, key
            np.testing.assert_array_equal(ours[key], reference[key], err_msg=f"{key}, group {group}")
            views += isinstance(ours[key], np.memmap) and not ours[key].flags.writeable
    assert views >= mapped.manifest.layout.groups * 10  # the float arrays at least are views of the files

    for example_id in mapped.index.column("example_id").to_pylist():
        for layer in mapped.layers:
            assert torch.equal(mapped.hidden(layer, example_id), decoded.hidden(layer, example_id))
        assert torch.equal(mapped.delta(2, example_id), decoded.delta(2, example_id))
        for ours, reference in zip(mapped.topk(example_id), decoded.topk(example_id)):
            assert torch.equal(ours, reference)
        for read in ("tokens", "supervised", "answer"):
            ours = getattr(mapped, read)(example_id)
            np.testing.assert_array_equal(ours, getattr(decoded, read)(example_id))
            assert ours.flags.writeable and not isinstance(ours, np.memmap)  # its own array, as zarr gives


def test_the_loader_gives_the_same_batches_on_either_path(caches):
    ours, reference = batches(open_cache(caches["none"])), batches(open_cache(caches["none"], read_path="zarr"))
    assert len(ours) == len(reference) > 0
    for a, b in zip(ours, reference):
        assert a.example_ids == b.example_ids
        for name in ("input_ids", "attention_mask", "supervised", "topk_logprobs", "topk_indices", "answer"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.teacher.keys() == b.teacher.keys()
        for layer in a.teacher:
            assert a.teacher[layer].dtype == torch.bfloat16 and torch.equal(a.teacher[layer], b.teacher[layer])


def test_the_read_path_is_chosen_automatically_and_shown_by_cache_info(caches, tmp_path):
    assert open_cache(caches["none"]).read_path == "mmap"
    compressed = open_cache(caches["zstd"])
    assert compressed.read_path == "zarr" and "compressed (zstd)" in compressed.read_path_reason
    memory = fsspec.filesystem("memory")
    memory.put(str(caches["none"]), "/pkt-mmap-test", recursive=True)
    remote = open_cache("memory://pkt-mmap-test")
    assert remote.read_path == "zarr" and "not on a local filesystem (memory)" in remote.read_path_reason
    assert open_cache(caches["none"], read_path="zarr").read_path == "zarr"

    with pytest.raises(CacheError, match=r"cannot be memory-mapped: answer is compressed \(zstd\)"):
        open_cache(caches["zstd"], read_path="mmap").read_group(["tokens"], 0)
    with pytest.raises(ValueError, match="read_path must be one of"):
        open_cache(caches["none"], read_path="mapped")

    info = pkt("cache", "info", str(caches["none"]))
    assert info.returncode == 0 and "reads        mmap (uncompressed shards on a local filesystem" in info.stdout
    info = pkt("cache", "info", str(caches["zstd"]))
    assert info.returncode == 0 and "reads        zarr (answer is compressed (zstd)" in info.stdout


def test_a_damaged_shard_is_refused_on_the_mmap_path(caches, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(caches["none"], copy)
    key = shard_file("hidden/02", 2, 1)
    data = bytearray((copy / key).read_bytes())
    data[len(data) // 3] ^= 0x40  # a flipped bit in an uncompressed value: it would still read
    (copy / key).write_bytes(bytes(data))
    cache = open_cache(copy)
    assert cache.read_path == "mmap"
    with pytest.raises(CacheError) as error:
        batches(cache)
    assert f"checksum mismatch: {key}" in str(error.value) and "rerun `pkt extract`" in str(error.value)


def test_a_damaged_shard_index_fails_its_crc32c(caches, tmp_path):
    key = shard_file("hidden/02", 2, 0)
    copy = tmp_path / "shard"
    data = bytearray((caches["none"] / key).read_bytes())
    data[-10] ^= 0x01  # inside the index at the file's end, before its crc32c
    copy.write_bytes(bytes(data))
    layout = shard_layout("hidden/02", json.loads((caches["none"] / "hidden/02/zarr.json").read_text()))
    assert read_shard_index(str(caches["none"] / key), layout).shape == (layout.chunks, 2)
    with pytest.raises(CacheError, match=f"{copy} is damaged: its shard index fails its crc32c"):
        read_shard_index(str(copy), layout)
    copy.write_bytes(bytes(data[:40]))
    with pytest.raises(CacheError, match=f"{copy} is damaged: 40 bytes, shorter than its shard index"):
        read_shard_index(str(copy), layout)


@pytest.mark.parametrize("location, index_codecs", [("start", [BytesCodec()]), ("end", [BytesCodec(), Crc32cCodec()])])
def test_mapped_rows_follow_the_shard_index_as_zarr_writes_it(tmp_path, location, index_codecs):
    """Any zarr v3 sharded array: index at either end, with or without crc32c, absent (all-fill) chunks."""
    sharding = ShardingCodec(chunk_shape=(8, 3), codecs=[BytesCodec()], index_codecs=index_codecs,
                             index_location=location)
    array = zarr.create_array(zarr.storage.LocalStore(tmp_path), name="x", shape=(64, 3), chunks=(32, 3),
                              dtype="float32", serializer=sharding, compressors=None, filters=None, fill_value=-1.5)
    values = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    values[8:16] = -1.5  # a chunk of fill value only: zarr leaves it out of the shard
    array[:] = values
    layout = shard_layout("x", json.loads((tmp_path / "x" / "zarr.json").read_text()))
    mapped = MappedArray("x", layout)
    assert (read_shard_index(str(tmp_path / "x/c/0/0"), layout)[1] == 2**64 - 1).all()
    for group, start, stop in [(0, 0, 32), (0, 3, 21), (0, 16, 30), (1, 32, 64), (1, 40, 41), (1, 50, 50)]:
        rows = mapped.rows(str(tmp_path / f"x/c/{group}/0"), group, start, stop)
        np.testing.assert_array_equal(rows, array[start:stop], err_msg=f"rows {start}:{stop}")
    assert isinstance(mapped.rows(str(tmp_path / "x/c/1/0"), 1, 33, 60), np.memmap)
    np.testing.assert_array_equal(mapped.rows(None, 1, 32, 40), np.full((8, 3), -1.5, np.float32))
    with pytest.raises(ValueError, match=r"rows \[30, 40\) of x are not inside group 0"):
        mapped.rows(str(tmp_path / "x/c/0/0"), 0, 30, 40)
