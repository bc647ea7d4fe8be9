"""The streaming cache loader against the per-example read API, and its order, resume and failure rules."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest
import torch

from pkt_pipeline.cache import CacheError, CacheFiles, open_cache
from pkt_pipeline.loader import Batch, CacheLoader, ExampleMeta

from batch_sources import drain, protocol_gaps

SMALL = {"batch_size": 3, "shuffle_buffer": 8}


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return open_cache(tiny_cache)


@pytest.fixture
def memory_copy(tiny_cache):
    """A copy of the tiny cache in fsspec's in-memory filesystem, removed afterwards."""
    memory = fsspec.filesystem("memory")
    root = f"/pkt-loader-{uuid.uuid4().hex[:8]}"
    memory.put(str(tiny_cache), root, recursive=True)
    yield memory, root
    memory.rm(root, recursive=True)


def ids_of(cache) -> list[str]:
    return cache.index.column("example_id").to_pylist()


def groups_of(cache, example_ids) -> list[int]:
    group = dict(zip(ids_of(cache), cache.index.column("group").to_pylist()))
    return [group[e] for e in example_ids]


def order(loader: CacheLoader, steps: int) -> list[list[str]]:
    with loader:
        return [batch.example_ids for batch in loader.batches(steps)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pkt-cache-reader"]


def wait_for_no_reader(seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not reader_threads(), "the reader thread outlived its consumer"


def counting_read_group(cache) -> list[int]:
    """Spy on one Cache instance: record the group of every read_group call, read the real data."""
    calls: list[int] = []
    real = cache.read_group

    def read_group(keys, group, workers=4):
        calls.append(group)
        return real(keys, group, workers)

    cache.read_group = read_group
    return calls


def assert_rows_equal_cache(batch: Batch, cache, layers, kind: str, topk: bool = True) -> None:
    """Every row of the batch equals the per-example reads of its id, and padding is zero."""
    width = batch.input_ids.shape[1]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64 and batch.supervised.dtype == torch.bool
    lengths = [len(cache.tokens(e)) for e in batch.example_ids]
    assert width == max(lengths)
    for row, (example_id, n) in enumerate(zip(batch.example_ids, lengths)):
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert np.array_equal(batch.input_ids[row, :n].numpy(), cache.tokens(example_id))
        assert np.array_equal(batch.supervised[row, :n].numpy(), cache.supervised(example_id))
        assert not batch.input_ids[row, n:].any() and not batch.supervised[row, n:].any()
        for layer in layers:
            reference = cache.hidden(layer, example_id) if kind == "hidden" else cache.delta(layer, example_id)
            assert batch.teacher[layer].dtype == torch.bfloat16
            assert torch.equal(batch.teacher[layer][row, :n], reference)
            assert not batch.teacher[layer][row, n:].any()
        if topk:
            values, indices = cache.topk(example_id)
            assert torch.equal(batch.topk_logprobs[row, :n], values)
            assert torch.equal(batch.topk_indices[row, :n], indices)
            assert not batch.topk_logprobs[row, n:].any() and not batch.topk_indices[row, n:].any()
    assert set(batch.teacher) == set(layers)
    assert batch.tokens == sum(lengths)


@pytest.mark.parametrize("kind, layers, batch_size", [("hidden", [1, 3], 3), ("delta", [2, 4], 5)])
def test_one_epoch_yields_every_example_once_with_its_cached_rows(cache, kind, layers, batch_size):
    loader = CacheLoader(cache, batch_size=batch_size, layers=layers, kind=kind, shuffle_buffer=8)
    with loader:
        batches = list(loader)
    seen = [e for batch in batches for e in batch.example_ids]
    assert sorted(seen) == sorted(ids_of(cache))
    assert len(batches) == len(loader) == -(-len(seen) // batch_size)
    # A buffer that does not divide into batches holds its remainder back: only one batch is short.
    assert sorted(len(b.example_ids) for b in batches)[1:] == [batch_size] * (len(batches) - 1)
    for batch in batches:
        assert_rows_equal_cache(batch, cache, layers, kind)


def test_drop_last_and_no_topk(cache):
    loader = CacheLoader(cache, batch_size=5, layers=[0], topk=False, shuffle_buffer=8, drop_last=True)
    with loader:
        batches = list(loader)
    assert len(batches) == len(loader) == 24 // 5
    assert all(len(b.example_ids) == 5 and b.topk_logprobs is None and b.topk_indices is None for b in batches)
    for batch in batches:
        assert_rows_equal_cache(batch, cache, [0], "hidden", topk=False)


def test_fsspec_memory_copy_yields_the_same_batches(cache, memory_copy):
    _, root = memory_copy
    local = order_and_tensors(CacheLoader(cache, layers=[2], **SMALL))
    remote = order_and_tensors(CacheLoader(f"memory://{root}", layers=[2], **SMALL))
    assert [b.example_ids for b in remote] == [b.example_ids for b in local]
    for a, b in zip(local, remote):
        assert_same_batch(a, b, [2])


def test_delta_is_derived_from_hidden_when_not_stored(cache, memory_copy):
    memory, root = memory_copy
    manifest = json.loads(memory.cat_file(f"{root}/manifest.json"))
    manifest["capture"]["kinds"] = ["hidden"]
    memory.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
    loader = CacheLoader(f"memory://{root}", batch_size=4, layers=[1, 4], kind="delta", topk=False, shuffle_buffer=8)
    with loader:
        batches = list(loader)
    for batch in batches:
        for row, example_id in enumerate(batch.example_ids):
            n = int(batch.attention_mask[row].sum())
            for layer in (1, 4):
                by_hand = (cache.hidden(layer, example_id).float() - cache.hidden(layer - 1, example_id).float())
                assert torch.equal(batch.teacher[layer][row, :n], by_hand.to(torch.bfloat16))
                # the stored delta was rounded once from float32; the derived one from two rounded states
                stored = cache.delta(layer, example_id).float()
                torch.testing.assert_close(batch.teacher[layer][row, :n].float(), stored, atol=0.02, rtol=0.01)
                assert not batch.teacher[layer][row, n:].any()
    with pytest.raises(ValueError, match="layers >= 1"):
        CacheLoader(f"memory://{root}", batch_size=4, layers=[0], kind="delta", **{"shuffle_buffer": 8})


def test_length_bucketing_pads_less_than_walk_order_batches(cache):
    def padding(shuffle_buffer: int, seed: int) -> float:
        loader = CacheLoader(cache, batch_size=4, topk=False, shuffle_buffer=shuffle_buffer, seed=seed)
        with loader:
            return float(np.mean([1 - b.attention_mask.float().mean().item() for b in loader]))

    bucketed = np.mean([padding(8, seed) for seed in range(4)])
    unbucketed = np.mean([padding(4, seed) for seed in range(4)])
    assert bucketed < 0.8 * unbucketed, (bucketed, unbucketed)
    # One buffer holding the whole cache: the batches are disjoint intervals of the sorted lengths.
    loader = CacheLoader(cache, batch_size=4, topk=False, shuffle_buffer=24)
    with loader:
        spans = [(int(b.attention_mask.sum(1).min()), int(b.attention_mask.sum(1).max())) for b in loader]
    for i, (low, high) in enumerate(spans):
        assert all(high <= other_low or other_high <= low for other_low, other_high in spans[i + 1:]), spans
    assert spans != sorted(spans), "the buffer's batches were not shuffled"


def test_epochs_walk_shuffled_groups_one_after_another(cache):
    # Batches of one example from a buffer of one are the walk itself: groups in runs, in a seeded order.
    def group_walk(seed: int) -> list[int]:
        ids = [e for batch in order(CacheLoader(cache, batch_size=1, shuffle_buffer=1, topk=False, seed=seed), 24)
               for e in batch]
        walk = groups_of(cache, ids)
        runs = [g for i, g in enumerate(walk) if i == 0 or walk[i - 1] != g]
        assert sorted(runs) == sorted(set(walk)), walk
        return runs

    assert group_walk(0) != sorted(group_walk(0))
    assert group_walk(0) != group_walk(1)


def test_seeds_and_epochs_change_the_order_and_same_seed_repeats_it(cache):
    per_epoch = len(CacheLoader(cache, topk=False, **SMALL))
    first = order(CacheLoader(cache, topk=False, seed=3, **SMALL), 2 * per_epoch)
    again = order(CacheLoader(cache, topk=False, seed=3, **SMALL), 2 * per_epoch)
    other = order(CacheLoader(cache, topk=False, seed=4, **SMALL), 2 * per_epoch)
    assert first == again
    assert first != other
    epoch0, epoch1 = first[:per_epoch], first[per_epoch:]
    assert epoch0 != epoch1
    for epoch in (epoch0, epoch1):
        assert sorted(e for batch in epoch for e in batch) == sorted(ids_of(cache))


def order_and_tensors(loader: CacheLoader, steps: int | None = None) -> list[Batch]:
    with loader:
        return list(loader if steps is None else loader.batches(steps))


def assert_same_batch(a: Batch, b: Batch, layers) -> None:
    assert a.example_ids == b.example_ids
    for name in ("input_ids", "attention_mask", "supervised", "topk_logprobs", "topk_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for layer in layers:
        assert torch.equal(a.teacher[layer], b.teacher[layer])


def test_exact_resume_mid_epoch_and_across_the_epoch_boundary_with_other_layers(cache, tiny_cache):
    original = CacheLoader(cache, layers=[1, 2], seed=7, **SMALL)
    per_epoch = len(original)
    states, batches = [original.state_dict()], []
    with original:
        for batch in original.batches(per_epoch + 3):
            batches.append(batch)
            states.append(json.loads(json.dumps(original.state_dict())))  # as a checkpoint stores it
    assert (states[3]["epoch"], states[3]["batches_done"]) == (0, 3)
    assert (states[per_epoch]["epoch"], states[per_epoch]["batches_done"]) == (1, 0)
    for done in (3, per_epoch - 1, per_epoch, per_epoch + 1):
        resumed = CacheLoader(open_cache(tiny_cache), layers=[2, 4], seed=7, **SMALL)
        resumed.load_state_dict(states[done])
        for expected, got in zip(batches[done:done + 2], order_and_tensors(resumed, 2), strict=True):
            assert_same_batch(expected, got, [2])
        assert resumed.state_dict() == states[done + 2]

    # Skipping reads nothing: the rest of epoch 0 reads exactly the groups its own examples live in.
    spied = open_cache(tiny_cache)
    calls = counting_read_group(spied)
    resumed = CacheLoader(spied, layers=[2], seed=7, **SMALL)
    resumed.load_state_dict(states[3])
    rest = order_and_tensors(resumed)
    assert [b.example_ids for b in rest] == [b.example_ids for b in batches[3:per_epoch]]
    needed = set(groups_of(cache, [e for b in rest for e in b.example_ids]))
    assert sorted(calls) == sorted(needed)
    assert len(needed) < cache.manifest.layout.groups
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches_done"] == 0


def test_refuses_foreign_positions_bad_examples_and_uncached_layers(cache):
    state = CacheLoader(cache, **SMALL).state_dict()
    with pytest.raises(ValueError, match=r"another plan \(seed 0 -> 1\)"):
        CacheLoader(cache, seed=1, **SMALL).load_state_dict(state)
    with pytest.raises(ValueError, match=r"another plan \(batch_size 3 -> 4\)"):
        CacheLoader(cache, batch_size=4, shuffle_buffer=8).load_state_dict(state)
    half = {e: cache.content_hash(e) for e in ids_of(cache)[::2]}
    with pytest.raises(ValueError, match=r"another plan \(examples 24 -> 12\)"):
        CacheLoader(cache, examples=half, **SMALL).load_state_dict(state)
    with pytest.raises(ValueError, match=r"another plan \(the cached examples differ"):
        CacheLoader(cache, **SMALL).load_state_dict({**state, "fingerprint": "0" * 64})

    first = ids_of(cache)[0]
    wrong = {first: "deadbeef", ids_of(cache)[1]: cache.content_hash(ids_of(cache)[1])}
    cached_hash = cache.content_hash(first)
    with pytest.raises(CacheError, match=rf"'{first}' \(expected hash deadbeef, the cache has {cached_hash}\)"):
        CacheLoader(cache, examples=wrong, **SMALL)
    with pytest.raises(CacheError, match=r"'nope' \(expected hash abc, the cache has no such example\)"):
        CacheLoader(cache, examples={"nope": "abc"}, **SMALL)
    with pytest.raises(CacheError, match=r"layer 7 was not captured .*cached layers: \[0, 1, 2, 3, 4\]"):
        CacheLoader(cache, layers=[1, 7], **SMALL)
    with pytest.raises(ValueError, match=r"shuffle_buffer \(2\) must hold at least one batch"):
        CacheLoader(cache, batch_size=3, shuffle_buffer=2)


def test_examples_restrict_the_epoch_by_id_and_hash(cache):
    chosen = {e: cache.content_hash(e) for e in ids_of(cache)[1::3]}
    loader = CacheLoader(cache, examples=chosen, layers=[3], **SMALL)
    with loader:
        batches = list(loader)
    assert sorted(e for b in batches for e in b.example_ids) == sorted(chosen)
    assert len(batches) == len(loader) == -(-len(chosen) // 3)
    for batch in batches:
        assert_rows_equal_cache(batch, cache, [3], "hidden")


def test_each_group_is_read_once_per_epoch_and_reads_stay_ahead_by_a_window(tiny_cache):
    spied = open_cache(tiny_cache)
    calls = counting_read_group(spied)
    groups = sorted(set(spied.index.column("group").to_pylist()))
    loader = CacheLoader(spied, layers=[1, 2, 3], **SMALL)
    order_and_tensors(loader, 2 * len(loader))
    assert len(calls) == 2 * len(groups)
    assert sorted(calls[:len(groups)]) == groups and sorted(calls[len(groups):]) == groups

    calls.clear()
    windowed = CacheLoader(spied, batch_size=2, shuffle_buffer=4, prefetch=1, topk=False)
    with windowed:
        next(iter(windowed))
        time.sleep(0.3)  # let the reader run as far ahead as its queue lets it
        assert 0 < len(calls) < len(groups) / 2, calls


def test_reader_error_reaches_the_consumer_naming_the_file(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    loader = CacheLoader(copy, layers=[1], **SMALL)
    for shard in (copy / "hidden" / "01" / "c").glob("*/0"):
        shard.write_bytes(b"not a shard" * 8)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: order_and_tensors(loader))
        with pytest.raises(CacheError, match=r"checksum mismatch: hidden/01/c/\d+/0"):
            future.result(timeout=30)
    wait_for_no_reader()
    # Recorded as written (checksums match the garbage): zarr's own error is the one to reach the consumer.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["checksums"] = {key: CacheFiles(copy).sha256(key) if value else value
                             for key, value in manifest["checksums"].items()}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loader = CacheLoader(copy, layers=[1], **SMALL)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: order_and_tensors(loader))
        with pytest.raises(CacheError, match=r"cannot read group \d+ .*ValueError") as caught:
            future.result(timeout=30)
    group = re.search(r"cannot read group (\d+)", str(caught.value)).group(1)
    assert f"hidden/01/c/{group}/0" in str(caught.value)
    wait_for_no_reader()


def test_reader_thread_stops_with_its_consumer_and_the_position_survives(cache):
    reference = order(CacheLoader(cache, topk=False, **SMALL), 3)
    loader = CacheLoader(cache, topk=False, prefetch=1, **SMALL)
    batches = loader.batches(5)
    assert next(batches).example_ids == reference[0]
    assert reader_threads()
    batches.close()
    wait_for_no_reader()

    with loader:
        rest = iter(loader)
        assert next(rest).example_ids == reference[1]
    wait_for_no_reader()
    with pytest.raises(RuntimeError, match="closed while iterating"):
        next(rest)
    assert loader.state_dict()["batches_done"] == 2
    assert next(iter(loader)).example_ids == reference[2]
    loader.close()
    wait_for_no_reader()


def test_the_cache_loader_is_a_batch_source_and_its_meta_names_each_row(cache):
    """The trainer's Protocol, checked structurally; `meta` gives each row's position among the loader's
    examples (row order), carried through `split` and `to` with its row."""
    assert protocol_gaps(CacheLoader) == []
    first, again = drain(CacheLoader(cache, layers=[1], topk=False, **SMALL), 4)
    assert [b.example_ids for b in again] == [b.example_ids for b in first]
    in_row_order = sorted(ids_of(cache), key=dict(zip(ids_of(cache), cache.index.column("offset").to_pylist())).get)
    for batch in first:
        assert [in_row_order[m.position] for m in batch.meta] == batch.example_ids
        assert {(m.role, m.anchor) for m in batch.meta} == {("train", None)}
        parts = batch.to("cpu").split(2)
        assert [m for part in parts for m in part.meta] == list(batch.meta)
        assert all(len(part.meta) == len(part.example_ids) for part in parts)


def test_a_batch_refuses_meta_that_does_not_match_its_rows():
    ids = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"a batch of 2 examples got meta for 1 \(one per example, or none\)"):
        Batch(["a", "b"], ids, ids, ids.bool(), {}, None, None, meta=(ExampleMeta(0),))
    assert Batch(["a", "b"], ids, ids, ids.bool(), {}, None, None).split(1)[1].meta == ()
