"""Storage-lean caches: lossy activation codecs, the quantised top-k, and `extract.layers: auto`.

Round trips are checked on the tiny teacher's real activations (read from the bf16 cache) against each
codec's stated error (`pkt_pipeline/cache/codecs.py`); a lossy cache must read back with the shapes and
dtypes a bf16 one gives, and a bf16 cache must stay exactly what it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pkt_pipeline.cache import open_cache, verify_cache
from pkt_pipeline.cache.codecs import (SCALE_BYTES, bytes_per_token, decode_rows, decode_topk, encode_rows,
                                       encode_topk, topk_formats)
from pkt_pipeline.cli import main
from pkt_pipeline.config import load_config
from pkt_pipeline.loader import CacheLoader
from stages import align, extract
from tiny_data import extract_config

FAST = ["runtime.dtype=float32", "align.batch_size=4", "align.loader.shuffle_buffer=8", "align.lora.r=4",
        "align.lora.alpha=8", "align.checkpoint_every=1000"]


def real_rows(cache_path: Path) -> torch.Tensor:
    """Every stored row of every layer and delta of the tiny bf16 cache, as float32 [N, D]."""
    cache = open_cache(cache_path)
    ids = cache.index.column("example_id").to_pylist()
    rows = [cache.hidden(layer, i) for layer in cache.layers for i in ids]
    rows += [cache.delta(layer, i) for layer in cache.layers if layer >= 1 for i in ids]
    return torch.cat(rows).float()


def with_outliers(rows: torch.Tensor) -> torch.Tensor:
    """The rows with one dimension 300x their largest value, as LLM residual streams hold ("massive activations")."""
    spiked = rows.clone()
    spiked[:, 3] = 300 * rows.abs().amax(dim=-1)
    return spiked


@pytest.mark.parametrize("spiked", [False, True])
def test_int8_rows_round_trip_within_half_a_step_of_their_scale(tiny_cache, spiked):
    rows = real_rows(tiny_cache)
    rows = with_outliers(rows) if spiked else rows
    stored = encode_rows(rows, "int8")
    assert stored.dtype == np.uint8 and stored.shape == (rows.shape[0], rows.shape[1] + SCALE_BYTES)
    back = decode_rows(stored, "int8")
    assert back.dtype == torch.bfloat16 and back.shape == rows.shape
    bound = rows.abs().amax(dim=-1, keepdim=True) / 254  # s / 2
    error = (back.float() - rows).abs()
    assert (error <= bound * (1 + 2**-7) + rows.abs() * 2**-8).all()  # + the bf16 rounding of the decoded value


@pytest.mark.parametrize("spiked", [False, True])
def test_float8_rows_round_trip_within_e4m3_precision(tiny_cache, spiked):
    rows = real_rows(tiny_cache)
    rows = with_outliers(rows) if spiked else rows
    back = decode_rows(encode_rows(rows, "float8_e4m3"), "float8_e4m3")
    assert back.dtype == torch.bfloat16 and back.shape == rows.shape
    scale = rows.abs().amax(dim=-1, keepdim=True) / 448
    bound = torch.maximum(rows.abs() * 2**-4, scale * 2**-10)  # normal: 3 mantissa bits; subnormal: half a step
    error = (back.float() - rows).abs()
    assert (error <= bound * (1 + 2**-7) + rows.abs() * 2**-8).all()
    # the exponent keeps the small dimensions that int8 flattens next to an outlier
    if spiked:
        int8 = decode_rows(encode_rows(rows, "int8"), "int8").float()
        rest = torch.ones(rows.shape[1], dtype=torch.bool)
        rest[3] = False
        assert (back.float() - rows)[:, rest].norm() < (int8 - rows)[:, rest].norm() / 4


def test_quantised_topk_round_trips_within_half_a_step_and_fits_300_bytes(tiny_cache):
    cache = open_cache(tiny_cache)
    ids = cache.index.column("example_id").to_pylist()
    values = torch.cat([cache.topk(i)[0] for i in ids])
    indices = torch.cat([cache.topk(i)[1] for i in ids])
    big_ids = indices + 151_000  # ids of a 151,936-token vocabulary need all 18 bits
    stored_values, stored_ids = encode_topk(values, big_ids, "uint8")
    back_values, back_ids = decode_topk(stored_values, stored_ids, "uint8")
    assert back_values.dtype == torch.float32 and back_ids.dtype == torch.int64 and back_values.shape == values.shape
    assert torch.equal(back_ids, big_ids)
    step = (values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)) / 255
    assert ((back_values - values).abs() <= step * (1 + 1e-4) + 1e-5).all()
    rest = -torch.expm1(torch.logsumexp(values.double(), -1))  # the mass outside the top-k, kept exact
    assert torch.allclose(-torch.expm1(torch.logsumexp(back_values.double(), -1)), rest, atol=1e-5)
    (values_shape, values_type), (ids_shape, ids_type) = topk_formats("uint8", 64)
    topk_bytes = np.prod(values_shape) * np.dtype(values_type).itemsize + np.prod(ids_shape) * np.dtype(ids_type).itemsize
    assert topk_bytes == 264 <= 300
    assert bytes_per_token("bfloat16", "exact", 1536, 1, 64) - bytes_per_token("bfloat16", "uint8", 1536, 1, 64) == 248


@pytest.fixture(scope="module")
def lossy_cache(tiny_pair, tiny_dataset, tmp_path_factory) -> Path:
    """The tiny_cache's extraction with float8 rows and the quantised top-k, stored uncompressed (so it maps)."""
    out = tmp_path_factory.mktemp("lossy") / "cache"
    extract.run(extract_config(tiny_pair["teacher"], tiny_dataset, out, "extract.capture=[hidden, delta]",
                               "extract.storage_dtype=float8_e4m3", "extract.topk_codec=uint8",
                               "extract.compressor=none"), progress=False)
    return out


def test_a_lossy_cache_reads_back_like_the_bf16_one(tiny_cache, lossy_cache):
    exact, lossy = open_cache(tiny_cache), open_cache(lossy_cache)
    assert lossy.read_path == "mmap"
    manifest = json.loads((lossy_cache / "manifest.json").read_text())
    assert manifest["capture"]["storage_dtype"] == "float8_e4m3" and manifest["capture"]["topk_codec"] == "uint8"
    assert manifest["format_version"] == 2
    assert verify_cache(lossy_cache) == []
    for example_id in exact.index.column("example_id").to_pylist()[:6]:
        for layer in exact.layers:
            want, got = exact.hidden(layer, example_id).float(), lossy.hidden(layer, example_id)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            scale = want.abs().amax(-1, keepdim=True) / 448
            assert ((got.float() - want).abs() <= torch.maximum(want.abs() * 2**-4, scale * 2**-10) * 1.01
                    + want.abs() * 2**-7).all()
        want_values, want_ids = exact.topk(example_id)
        got_values, got_ids = lossy.topk(example_id)
        assert got_values.dtype == want_values.dtype and got_ids.dtype == want_ids.dtype
        assert torch.equal(got_ids, want_ids)
        assert (got_values - want_values).abs().max() < 0.05
    head, lossy_head = exact.teacher_head(), lossy.teacher_head()
    assert torch.equal(lossy_head["lm_head"], head["lm_head"])  # the head is never stored lossy
    zarr_read = open_cache(lossy_cache, read_path="zarr")
    example_id = exact.index.column("example_id")[0].as_py()
    assert torch.equal(zarr_read.delta(2, example_id), lossy.delta(2, example_id))

    def first_batch(path):
        with CacheLoader(path, batch_size=4, layers=[2], kind="delta", seed=0) as loader:
            return next(iter(loader))

    want, got = first_batch(tiny_cache), first_batch(lossy_cache)
    assert got.teacher[2].dtype == want.teacher[2].dtype and got.teacher[2].shape == want.teacher[2].shape
    assert got.topk_logprobs.dtype == want.topk_logprobs.dtype and got.topk_indices.shape == want.topk_indices.shape
    assert torch.equal(got.topk_indices, want.topk_indices)

    result = CliRunner().invoke(main, ["cache", "info", str(lossy_cache)])
    assert result.exit_code == 0, result.output
    assert "activations float8_e4m3, top-k uint8" in result.output


def test_a_bf16_cache_is_written_and_read_as_before(tiny_cache):
    """Format version 1, no `topk_codec` key: its identity (and an older pkt's reading of it) is unchanged."""
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "topk_codec" not in manifest["capture"]
    assert "layers_rule" not in manifest
    assert "topk_codec" not in json.loads((tiny_cache / "run.json").read_text())["identity"]["capture"]
    metadata = json.loads((tiny_cache / "topk" / "logprobs" / "zarr.json").read_text())
    assert metadata["data_type"] == "float32" and metadata["shape"][1] == 64
    result = CliRunner().invoke(main, ["cache", "info", str(tiny_cache)])
    assert "activations bfloat16, top-k exact" in result.output


def test_unknown_codecs_are_refused_naming_the_key(tiny_pair, tiny_dataset, tmp_path):
    for key, value, allowed in [("storage_dtype", "int4", "'bfloat16', 'float16', 'float8_e4m3', 'int8'"),
                                ("topk_codec", "int4", "'exact', 'uint8'")]:
        config = extract_config(tiny_pair["teacher"], tiny_dataset, tmp_path / key, f"extract.{key}={value}")
        with pytest.raises(ValueError, match=rf"extract\.{key} must be one of \({allowed}\)"):
            extract.run(config, progress=False)


def auto_config(tiny_pair, tiny_dataset, out, *extra):
    return extract_config(tiny_pair["teacher"], tiny_dataset, out, f"student={tiny_pair['student']}",
                          "extract.layers=auto", "extract.limit=8", *extra)


def test_auto_layers_follow_the_proportional_pairing_with_predecessors_for_deltas(tiny_pair, tiny_dataset, tmp_path):
    """Tiny teacher 4 layers, student 2: p(1) = 2, p(2) = 4; SemAlign v2 aligns deltas, derived from h_p and h_(p-1)."""
    out = tmp_path / "auto"
    config = auto_config(tiny_pair, tiny_dataset, out, "methods.semalign.pairing=proportional",
                         "methods.semalign.layers=[1]", "methods.kd={}")
    extract.run(config, progress=False)
    cache = open_cache(out)
    assert cache.layers == [1, 2]
    rule = cache.manifest.layers_rule
    assert rule["student_layers"] == 2 and rule["teacher_layers"] == 4 and rule["student"] == str(tiny_pair["student"])
    assert rule["methods"]["semalign"]["layers"] == [1, 2] and rule["methods"]["kd"]["layers"] == []
    assert "proportional" in rule["methods"]["semalign"]["rule"]
    result = CliRunner().invoke(main, ["cache", "info", str(out)])
    assert "1..2 (2) (auto: for kd, semalign and a student of 2 layers" in result.output

    # the cache serves the layer it was made for, and refuses one it lacks, naming the layers
    align_args = [f"student={tiny_pair['student']}", f"align.cache={out}", "align.method=semalign", "align.steps=2",
                  "methods.semalign.pairing=proportional", *FAST]
    align.run(load_config(overrides=[*align_args, f"align.out={tmp_path / 'ok'}", "methods.semalign.layers=[1]"]),
              progress=False)
    with pytest.raises(ValueError, match=r"the cache lacks layers \[3, 4\] \(cached: \[1, 2\]\)"):
        align.run(load_config(overrides=[*align_args, f"align.out={tmp_path / 'no'}", "methods.semalign.layers=[2]"]),
                  progress=False)


def test_auto_layers_keep_the_attributed_pairings_window(tiny_pair, tiny_dataset, tmp_path):
    """Attributed pairing picks by the cache's own attribution, within +-window of p(k): the whole window is kept;
    a captured delta needs no predecessor."""
    from pkt_pipeline.methods import auto_layers

    config = auto_config(tiny_pair, tiny_dataset, tmp_path / "x", "methods.semalign.layers=[1]",
                         "methods.semalign.pairing_window=1", "extract.capture=[delta]")
    layers, rule = auto_layers(config, 4, 2, ("delta",))
    assert layers == (1, 2, 3) and "+- 1" in rule["methods"]["semalign"]["rule"]
    assert auto_layers(config, 4, 2, ("hidden",))[0] == (0, 1, 2, 3)
    critical = load_config(overrides=["methods.semalign.critical_layers=1", "methods.semalign.objective=v1"])
    assert auto_layers(critical, 4, 2, ("hidden",))[0] == (1, 2, 3, 4)
    kd_only = load_config(overrides=["align.method=kd"])
    assert auto_layers(kd_only, 4, 2, ("hidden",))[0] == ()


def test_auto_layers_name_a_student_it_cannot_read(tiny_pair, tiny_dataset, tmp_path):
    config = auto_config(tiny_pair, tiny_dataset, tmp_path / "x", f"student={tmp_path / 'no-such-student'}")
    with pytest.raises(Exception, match=r"extract\.layers: auto reads the student's depth: .*no-such-student"):
        extract.run(config, progress=False)


@pytest.mark.parametrize("codec", ["bfloat16", "int8"])
def test_the_dry_run_estimate_matches_a_real_extraction(tiny_pair, tiny_dataset, tmp_path, codec):
    """Uncompressed, the estimate is the bytes written but the shard indices and zarr.json files (within 3% at
    the tiny width); it loads no weights and writes nothing."""
    from pkt_pipeline.cache import cache_info

    out = tmp_path / "cache"
    config = extract_config(tiny_pair["teacher"], tiny_dataset, out, "extract.compressor=none", "extract.limit=12",
                            f"extract.storage_dtype={codec}", "extract.topk_codec=uint8")
    plan = extract.estimate(config)
    assert not out.exists()
    assert plan["layers"] == [0, 1, 2, 3, 4] and plan["parameters"] > 0 and plan["seconds"] > 0
    extract.run(config, progress=False)
    info = cache_info(out)
    assert plan["tokens"] == info["tokens"] and plan["examples"] == info["examples"]
    assert plan["activation_bytes_raw"] == pytest.approx(info["activation_bytes"], rel=0.03)

    result = CliRunner().invoke(main, ["extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(tiny_dataset),
                                       "--out", str(tmp_path / "dry"), "--dry-run", "--set", "extract.limit=12", "--set", "extract.max_length=96",
                                       "--set", "runtime.dtype=float32"])
    assert result.exit_code == 0, result.output
    assert f"{plan['tokens']:,} tokens (exact)" in result.output and "GiB raw" in result.output
    assert "GFLOP/s" in result.output and not (tmp_path / "dry").exists()
