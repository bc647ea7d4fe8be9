"""The typed manifest (`pkt_pipeline.cache.layout.Manifest`): it reads every manifest pkt has written,
writes back the same bytes, keeps what a newer writer added, and refuses a damaged one by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkt_pipeline.cache import CacheError, cache_info, open_cache
from pkt_pipeline.cache.layout import Capture, ExtraEntry, Manifest

FIXTURE = Path(__file__).parent / "fixtures" / "manifest-v1-eba3d12.json"
"""manifest.json exactly as pkt wrote it at commit eba3d12, before the manifest was typed: the tiny
teacher, layers 1-2 (hidden + delta), 3 examples, with the seeking extra."""


def as_written(record: dict) -> str:
    """The bytes `CacheFiles.write_json` writes for a record."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def edit_manifest(path: Path, edit) -> Path:
    record = json.loads((path / "manifest.json").read_text())
    edit(record)
    (path / "manifest.json").write_text(as_written(record))
    return path / "manifest.json"


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    return copy


def test_the_manifest_of_a_fresh_cache_round_trips_byte_for_byte(tiny_cache):
    text = (tiny_cache / "manifest.json").read_text()
    manifest = open_cache(tiny_cache).manifest
    assert isinstance(manifest, Manifest)
    assert as_written(manifest.to_json()) == text
    assert Manifest.from_json(json.loads(text)) == manifest
    assert manifest.capture.kinds == ("hidden", "delta") and manifest.capture.layers == (0, 1, 2, 3, 4)
    assert manifest.capture.final_layer == "raw" and manifest.teacher.num_layers == 4
    assert manifest.layout.shard_tokens == 128 and manifest.counts.examples == 24
    with pytest.raises(AttributeError):
        manifest.capture.top_k = 1  # frozen: a reader cannot change what the cache says it holds


def test_a_manifest_written_before_it_was_typed_reads_and_writes_back_the_same_bytes():
    text = FIXTURE.read_text()
    manifest = Manifest.from_json(json.loads(text))
    assert as_written(manifest.to_json()) == text
    assert manifest.capture == Capture(layers=(1, 2), kinds=("hidden", "delta"), top_k=64, storage_dtype="bfloat16",
                                       compressor="zstd", compression_level=3, final_layer="raw")
    assert manifest.counts.examples == 3 and manifest.tokenizer.vocab_size == 384
    assert manifest.extras["seeking"].inputs["seeking"]["seed_examples"] == 2
    assert manifest.extras["seeking"].provenance["rank"] == 16
    assert manifest.identity["layout"] == {"chunk_tokens": 32, "groups": 3, "shard_tokens": 128}
    assert manifest.other == {}


def test_a_cache_from_before_final_layer_extras_and_vocabulary_hash_opens(cache_copy):
    """The keys pkt added over time are optional: a cache written before them still opens and reads."""
    def age(record: dict) -> None:
        del record["capture"]["final_layer"], record["extras"], record["tokenizer"]["vocabulary_sha256"]
    old = json.loads(edit_manifest(cache_copy, age).read_text())
    cache = open_cache(cache_copy)
    assert cache.manifest.capture.final_layer is None and cache.manifest.extras == {}
    assert cache.manifest.tokenizer.vocabulary_sha256 is None
    assert cache.manifest.to_json() == old  # nothing is invented for the missing keys
    example = cache.index.column("example_id")[0].as_py()
    assert cache.hidden(2, example).shape[-1] == 64
    with pytest.raises(CacheError, match="after the final norm"):
        cache.hidden(4, example)
    assert cache_info(cache_copy)["extras"] == {}


def test_keys_of_a_newer_writer_are_kept_not_dropped(cache_copy):
    def add(record: dict) -> None:
        record["provenance_chain"] = ["a", "b"]
        record["capture"]["residual_scale"] = 0.5
    edit_manifest(cache_copy, add)
    manifest = open_cache(cache_copy).manifest
    assert manifest.other == {"provenance_chain": ["a", "b"]}
    assert manifest.capture.other == {"residual_scale": 0.5}
    assert as_written(manifest.to_json()) == (cache_copy / "manifest.json").read_text()


def test_a_manifest_without_capture_is_refused_naming_the_cache_and_the_key(cache_copy):
    path = edit_manifest(cache_copy, lambda record: record.pop("capture"))
    message = f"{path} is not a valid pkt manifest: key 'capture' is missing"
    with pytest.raises(CacheError, match=re.escape(message)):
        open_cache(cache_copy)
    with pytest.raises(CacheError, match=re.escape(message)):
        cache_info(cache_copy)
    from pkt_pipeline.cli import main

    result = CliRunner().invoke(main, ["cache", "info", str(cache_copy)])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("key, value, problem", [
    ("capture.top_k", "64", "key 'capture.top_k' should be an integer, not '64'"),
    ("capture.kinds", "hidden", "key 'capture.kinds' should be a list, not 'hidden'"),
    ("teacher", None, "key 'teacher' should be an object, not None"),
    ("extras.seeking", [], "key 'extras.seeking' should be an object, not []"),
])
def test_a_manifest_with_a_wrong_type_is_refused_naming_the_key(cache_copy, key, value, problem):
    def damage(record: dict) -> None:
        *parents, last = key.split(".")
        node = record
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    path = edit_manifest(cache_copy, damage)
    with pytest.raises(CacheError, match=re.escape(f"{path} is not a valid pkt manifest: {problem}")):
        open_cache(cache_copy)


def test_a_newer_format_version_is_refused(cache_copy):
    path = edit_manifest(cache_copy, lambda record: record.update(format_version=3))
    message = f"{path} is format version 3 of pkt-activation-cache; this pkt reads version 2: upgrade pkt to read it"
    with pytest.raises(CacheError, match=re.escape(message)):
        open_cache(cache_copy)


def test_extra_entries_keep_their_provenance_whole():
    entry = ExtraEntry.from_json({"rank": 4, "inputs": {"lora_r": 4}}, "extras.x")
    assert entry.inputs == {"lora_r": 4} and entry.provenance == {"rank": 4, "inputs": {"lora_r": 4}}
    assert ExtraEntry.from_json({"rank": 4}, "extras.x").inputs is None  # made before inputs were recorded
