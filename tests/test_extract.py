"""Stage one on the tiny teacher: numerical checks against plain transformers, resume, errors."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from pkt_pipeline.cache import CacheError, open_cache, verify_cache
from pkt_pipeline.cache.layout import decode
from pkt_pipeline.examples import load_examples
from pkt_pipeline.loader import CacheLoader
from pkt_pipeline.models import load_model, load_tokenizer
from tiny_data import SMALL_LAYOUT, extract_config, write_dataset

@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Path:
    return tiny_dataset


@pytest.fixture(scope="module")
def extracted(tiny_cache) -> Path:
    return tiny_cache


def cli(*args, cwd=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pkt_pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, **kwargs)


def checksums(path: Path) -> dict[str, str]:
    return json.loads((path / "manifest.json").read_text())["checksums"]


def test_cached_activations_equal_plain_transformers(tiny_pair, dataset, extracted):
    cache = open_cache(extracted)
    model = load_model(tiny_pair["teacher"], dtype="float32")
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    examples, _ = load_examples(dataset, tokenizer, max_length=96)
    assert cache.index.column("example_id").to_pylist() == [e.example_id for e in examples]
    assert cache.layers == list(range(5))
    # The reference residual stream: hidden_states up to L-1, and h_L caught by a hook on the last
    # decoder layer (transformers' hidden_states[L] is after the final norm).
    last_layer = []
    model.model.layers[-1].register_forward_hook(lambda module, args, output: last_layer.append(output))
    for example in examples:
        ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
        last_layer.clear()
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        stream = [*out.hidden_states[:-1], last_layer[0]]
        assert cache.content_hash(example.example_id) == example.content_hash
        assert np.array_equal(cache.tokens(example.example_id), example.input_ids)
        assert np.array_equal(cache.supervised(example.example_id), example.supervised)
        assert np.array_equal(cache.answer(example.example_id), example.answer)
        for layer in range(5):
            reference = stream[layer][0]
            cached = cache.hidden(layer, example.example_id)
            assert cached.dtype == torch.bfloat16
            torch.testing.assert_close(cached.float(), reference, rtol=1.6e-2, atol=1e-2)
            if layer:
                torch.testing.assert_close(cache.delta(layer, example.example_id).float(),
                                           reference - stream[layer - 1][0], rtol=1.6e-2, atol=1e-2)
        # The normed final state is one RMSNorm of the cached h_L away.
        torch.testing.assert_close(model.model.norm(cache.hidden(4, example.example_id).float()),
                                   out.hidden_states[-1][0], rtol=3e-2, atol=3e-2)
        values, indices = cache.topk(example.example_id)
        reference_logprobs = torch.log_softmax(out.logits[0].float(), -1)
        ref_values, ref_indices = reference_logprobs.topk(64, dim=-1)
        torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
        # The same tokens, up to the order of values equal within float32 rounding.
        torch.testing.assert_close(reference_logprobs.gather(-1, indices), values, rtol=1e-5, atol=1e-5)
        assert (indices == ref_indices).float().mean() > 0.99


def test_unknown_example_and_layer_are_named(extracted):
    cache = open_cache(extracted)
    with pytest.raises(KeyError, match="example 'nope' is not in the cache"):
        cache.tokens("nope")
    with pytest.raises(CacheError, match=r"layer 9 was not captured \(hidden\); cached layers: \[0, 1, 2, 3, 4\]"):
        cache.hidden(9, "ex000")


def test_a_cache_with_a_normed_last_layer_is_refused_there(extracted, tmp_path):
    """Caches written before `capture.final_layer` hold h_L after the final norm: their last layer,
    and any delta of it, is refused with the way out; earlier layers still read. Nor do they hold
    the answer mask or contribution attribution."""
    old = tmp_path / "old"
    shutil.copytree(extracted, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["capture"]["final_layer"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    cache = open_cache(old)
    torch.testing.assert_close(cache.hidden(3, "ex000"), open_cache(extracted).hidden(3, "ex000"))
    for read in (lambda: cache.hidden(4, "ex000"), lambda: cache.delta(4, "ex000"),
                 lambda: CacheLoader(cache, batch_size=2, layers=[4], kind="delta")):
        with pytest.raises(CacheError, match=r"last layer \(4\) after the final norm.*pkt extract --overwrite"):
            read()
    shutil.rmtree(old / "answer")
    assert not open_cache(old).has_answer_mask and next(iter(CacheLoader(old, batch_size=2, layers=[3]))).answer is None
    with pytest.raises(CacheError, match="holds no answer mask .*re-extract it"):
        open_cache(old).answer("ex000")
    shutil.rmtree(old / "attribution" / "contribution")
    assert open_cache(old).attribution("output").shape == (5,)
    with pytest.raises(CacheError, match="holds no contribution attribution .*re-extract it"):
        open_cache(old).attribution("contribution")


def test_incomplete_cache_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    with pytest.raises(CacheError, match="not a complete pkt cache .*rerun `pkt extract`"):
        open_cache(tmp_path / "half")


def test_attribution_equals_independent_autograd(tiny_pair, dataset, extracted):
    """Gradient x activation (output h_l, contribution delta_l) of the teacher's answer loss, by hand with
    retain_grad on the residual stream (h_L from a hook: hidden_states[L] is normed), summed over the extract split."""
    model = load_model(tiny_pair["teacher"], dtype="float32")
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    examples, _ = load_examples(dataset.with_name("extract.jsonl"), tokenizer, max_length=96)
    last_layer = []
    model.model.layers[-1].register_forward_hook(lambda module, args, output: last_layer.append(output))
    expected = {"output": np.zeros(5), "contribution": np.zeros(5)}
    for example in examples:
        ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
        labels = torch.where(torch.from_numpy(example.supervised)[None], ids, torch.full_like(ids, -100))
        last_layer.clear()
        out = model(ids, output_hidden_states=True)
        stream = [*out.hidden_states[:-1], last_layer[0]]
        for state in stream:
            state.retain_grad()
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        loss.backward()
        expected["output"] += np.array([(h.grad * h).abs().sum().item() for h in stream])
        expected["contribution"] += np.array([(h.grad * (h - previous)).abs().sum().item()
                                              for h, previous in zip(stream, [torch.zeros_like(stream[0]), *stream])])
        model.zero_grad()
    cache = open_cache(extracted)
    for target in ("output", "contribution"):
        np.testing.assert_allclose(cache.attribution(target), expected[target], rtol=1e-5)
    assert cache.manifest.attribution.examples == 3


def test_teacher_head_and_manifest(tiny_pair, extracted):
    model = load_model(tiny_pair["teacher"], dtype="float32")
    cache = open_cache(extracted)
    head = cache.teacher_head()
    torch.testing.assert_close(head["lm_head"].float(), model.lm_head.weight.to(torch.bfloat16).float())
    torch.testing.assert_close(head["final_norm"].float(), model.model.norm.weight.to(torch.bfloat16).float())
    assert head["norm_eps"] == pytest.approx(model.config.rms_norm_eps)
    manifest = cache.manifest
    assert manifest.format_version == 1 and manifest.pkt_version
    assert manifest.teacher.num_layers == 4 and manifest.teacher.hidden_size == 64
    assert manifest.capture.final_layer == "raw"
    assert manifest.tokenizer.vocab_size == len(load_tokenizer(tiny_pair["teacher"]))
    assert manifest.counts.examples == 24 and manifest.counts.tokens == sum(cache.index.column("length").to_pylist())
    assert manifest.capture.top_k == 64 and manifest.prompt.format == "chat"
    assert len(manifest.dataset.fingerprint) == 64
    assert verify_cache(extracted) == []


def test_reads_through_fsspec_urls(extracted):
    local = open_cache(extracted)
    first = local.index.column("example_id")[0].as_py()
    via_file_url = open_cache(f"file://{extracted}")
    torch.testing.assert_close(via_file_url.hidden(2, first), local.hidden(2, first))
    memory = fsspec.filesystem("memory")
    memory.put(str(extracted), "/pkt-test-cache", recursive=True)
    via_memory = open_cache("memory://pkt-test-cache")
    torch.testing.assert_close(via_memory.hidden(3, first), local.hidden(3, first))
    assert np.array_equal(via_memory.topk(first)[1].numpy(), local.topk(first)[1].numpy())
    assert verify_cache("memory://pkt-test-cache") == []


def test_group_reads_equal_per_example_reads(extracted):
    cache = open_cache(extracted)
    groups = sorted(set(cache.index.column("group").to_pylist()))
    assert len(groups) > 1
    seen = []
    for group in groups:
        arrays, first = cache.read_group(["hidden/01", "delta/02", "tokens"], group, workers=3)
        for example_id in cache.group_examples(group):
            start, stop = cache.span(example_id)
            rows = slice(start - first, stop - first)
            assert np.array_equal(arrays["tokens"][rows], cache.tokens(example_id))
            torch.testing.assert_close(decode(arrays["hidden/01"][rows], "bfloat16"), cache.hidden(1, example_id))
            torch.testing.assert_close(decode(arrays["delta/02"][rows], "bfloat16"), cache.delta(2, example_id))
            seen.append(example_id)
    assert sorted(seen) == sorted(cache.index.column("example_id").to_pylist())
    with pytest.raises(CacheError, match="group 999 holds no examples"):
        cache.read_group(["tokens"], 999)


def test_second_run_is_a_no_op_and_other_teacher_is_refused(tiny_pair, dataset, extracted):
    from stages import extract

    before = checksums(extracted)
    config = extract_config(tiny_pair["teacher"], dataset, extracted, "extract.capture=[hidden, delta]")
    assert extract.run(config, progress=False)["action"] == "up to date"
    assert checksums(extracted) == before
    other = extract_config(tiny_pair["student"], dataset, extracted, "extract.capture=[hidden, delta]")
    with pytest.raises(CacheError, match="already holds a different cache .*teacher .*teacher.*--overwrite"):
        extract.run(other, progress=False)


def test_overwrite_replaces_another_cache(tiny_pair, dataset, tmp_path):
    from stages import extract

    out = tmp_path / "c"
    extract.run(extract_config(tiny_pair["teacher"], dataset, out, "extract.limit=4"), progress=False)
    extract.run(extract_config(tiny_pair["student"], dataset, out, "extract.limit=4", "extract.overwrite=true"), progress=False)
    assert open_cache(out).manifest.teacher.hidden_size == 32


def test_truncation_is_counted(tiny_pair, dataset, tmp_path):
    from stages import extract

    extract.run(extract_config(tiny_pair["teacher"], dataset, tmp_path / "c", "extract.max_length=40"), progress=False)
    cache = open_cache(tmp_path / "c")
    assert cache.manifest.counts.truncated == sum(cache.index.column("truncated").to_pylist()) > 0
    assert max(cache.index.column("length").to_pylist()) == 40


@pytest.mark.integration
def test_bad_inputs_give_clear_errors(tiny_pair, dataset, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--teacher", str(tmp_path / "no-model"), "--data", str(dataset)], "model not found"),
        (["--teacher", str(tiny_pair["teacher"]), "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl"),
        (["--teacher", str(tiny_pair["teacher"]), "--data", str(empty)], "has no examples"),
    ]
    for args, message in cases:
        process = cli("extract", *args, "--out", str(tmp_path / "out"), "--no-progress")
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, stderr
        assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def run_cli_extract(teacher, data, out, *extra, **popen):
    overrides = [x for pair in (("--set", o) for o in [*SMALL_LAYOUT, "runtime.dtype=float32", *extra]) for x in pair]
    return cli("extract", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--no-progress",
               *overrides, **popen)


def wait_for_ledger(out: Path, entries: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list((out / "ledger").glob("*.json"))) >= entries:
            return
        if process.poll() is not None:
            pytest.fail(f"extract ended before the ledger had {entries} entries: {process.stderr.read()}")
        time.sleep(0.02)
    pytest.fail("ledger did not fill in time")


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long")
    write_dataset(folder / "extract.jsonl", 2, seed=3)
    return write_dataset(folder / "train.jsonl", 160, seed=2)


@pytest.fixture(scope="module")
def reference_run(tiny_pair, long_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    process = run_cli_extract(tiny_pair["teacher"], long_dataset, out)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return out


@pytest.mark.integration
def test_resume_after_kill_9_is_byte_identical(tiny_pair, long_dataset, reference_run, tmp_path):
    out = tmp_path / "cache"
    process = run_cli_extract(tiny_pair["teacher"], long_dataset, out)
    wait_for_ledger(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    groups = json.loads((out / "run.json").read_text())["layout"]["groups"]
    assert len(list((out / "ledger").glob("*.json"))) < groups, "the kill came after the run had finished"
    assert not (out / "manifest.json").exists()
    resumed = run_cli_extract(tiny_pair["teacher"], long_dataset, out)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resuming" in stdout
    assert checksums(out) == checksums(reference_run)
    assert verify_cache(out) == []


@pytest.mark.integration
def test_ctrl_c_finishes_the_group_in_flight(tiny_pair, long_dataset, reference_run, tmp_path):
    out = tmp_path / "cache"
    process = run_cli_extract(tiny_pair["teacher"], long_dataset, out)
    wait_for_ledger(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun the same command to resume" in stderr
    problems = verify_cache(out)
    assert problems == ["manifest.json missing: the extraction did not finish; rerun it to resume"]
    resumed = run_cli_extract(tiny_pair["teacher"], long_dataset, out)
    assert resumed.wait(timeout=300) == 0
    assert checksums(out) == checksums(reference_run)


@pytest.mark.integration
def test_write_failure_stops_cleanly_and_resumes(tiny_pair, long_dataset, reference_run, tmp_path):
    """A file-size limit makes shard writes fail as a full disk would (Python ignores SIGXFSZ)."""
    out = tmp_path / "cache"
    shard_sizes = [p.stat().st_size for p in reference_run.rglob("*") if p.is_file() and "/c/" in str(p)]
    limit = max(shard_sizes) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    process = run_cli_extract(tiny_pair["teacher"], long_dataset, out, preexec_fn=small_files)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "failed" in stderr and "rerun the same command to resume" in stderr and "Traceback" not in stderr
    resumed = run_cli_extract(tiny_pair["teacher"], long_dataset, out)
    assert resumed.wait(timeout=300) == 0
    assert checksums(out) == checksums(reference_run)


@pytest.mark.integration
def test_verify_names_a_corrupt_or_missing_shard(reference_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(reference_run, broken)
    shard = sorted((broken / "hidden" / "02" / "c").rglob("*"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    missing = sorted((broken / "topk" / "indices" / "c").rglob("*"))
    missing = [p for p in missing if p.is_file()][0]
    missing.unlink()
    process = cli("cache", "verify", str(broken))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert f"checksum mismatch: {shard.relative_to(broken)}" in stderr
    assert f"missing file: {missing.relative_to(broken)}" in stderr
    ok = cli("cache", "verify", str(reference_run))
    assert ok.wait(timeout=120) == 0


@pytest.mark.integration
def test_cache_info_summarises(reference_run):
    process = cli("cache", "info", str(reference_run))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    for word in ("examples", "160", "tokens", "layers", "0..4 (5)", "KiB stored", "compression", "teacher head"):
        assert word in stdout


@pytest.mark.integration
def test_torchrun_matches_single_process(tiny_pair, long_dataset, reference_run, tmp_path):
    out = tmp_path / "cache"
    overrides = [x for o in [*SMALL_LAYOUT, "runtime.dtype=float32"] for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "pkt_pipeline.cli", "extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(long_dataset),
         "--out", str(out), "--no-progress", *overrides],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, multi = open_cache(reference_run), open_cache(out)
    assert sorted(multi.index.column("example_id").to_pylist()) == sorted(single.index.column("example_id").to_pylist())
    for example_id in single.index.column("example_id").to_pylist():
        assert np.array_equal(multi.tokens(example_id), single.tokens(example_id))
        for layer in multi.layers:
            torch.testing.assert_close(multi.hidden(layer, example_id), single.hidden(layer, example_id), rtol=0, atol=0)
        torch.testing.assert_close(multi.topk(example_id)[0], single.topk(example_id)[0])
    for target in ("output", "contribution"):
        np.testing.assert_allclose(multi.attribution(target), single.attribution(target), rtol=1e-6)
    assert verify_cache(out) == []


def test_length_batches_cover_every_example_once_longest_first():
    from pkt_pipeline.extraction import length_batches

    lengths = [60, 512, 75, 300, 61, 510, 64]
    batches = length_batches(lengths, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0] == [1, 5, 3] and batches[1] == [2, 6, 4]  # similar lengths share a batch


def test_the_library_and_the_benches_import_no_stage():
    """Stages orchestrate, the library computes: a bench (or a library module) timing the extraction loop
    or the cache builder must get them from the library, not from `stages/`. The CLI is the one part
    of `pkt_pipeline/` that calls the stages."""
    import ast

    root = Path(__file__).resolve().parent.parent
    files = [*sorted((root / "pkt_pipeline").rglob("*.py")), *sorted((root / "bench").glob("*.py"))]
    offenders = []
    for path in files:
        name = path.relative_to(root).as_posix()
        if name == "pkt_pipeline/cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}:{node.lineno} imports {module}" for module in modules
                          if module == "stages" or module.startswith("stages.")]
    assert offenders == []
