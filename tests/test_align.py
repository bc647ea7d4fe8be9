"""Stage two on the tiny pair: every method learns, outputs reload, runs resume, bad input is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.loader import CacheLoader
from pkt_pipeline.losses import relation_loss
from pkt_pipeline.methods import Method, available_methods, forward_student, get_method, register
from pkt_pipeline.methods.semalign.semantic_map import attributed_pairing, build_semantic_map
from pkt_pipeline.tiny_models import STUDENT_SHAPE, build_model, build_tokenizer
from stages import align
from tiny_data import extract_config

FAST = ["runtime.dtype=float32", "align.batch_size=4", "align.lr=5e-3", "align.loader.shuffle_buffer=8",
        "align.lora.r=4", "align.lora.alpha=8", "align.checkpoint_every=1000"]


def align_config(tiny_pair, cache, out, method, *extra):
    return load_config(overrides=[f"student={tiny_pair['student']}", f"align.cache={cache}", f"align.out={out}",
                                  f"align.method={method}", *FAST, *extra])


def losses_by_phase(out: Path) -> dict[str, list[float]]:
    phases: dict[str, list[float]] = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        phases.setdefault(entry["phase"], []).append(entry["loss"])
    return phases


@pytest.mark.parametrize("method", ["semalign", "kd", "lora-sft"])
def test_each_method_reduces_its_training_loss(tiny_pair, tiny_cache, tmp_path, method):
    out = tmp_path / method
    summary = align.run(align_config(tiny_pair, tiny_cache, out, method, "align.steps=24"), progress=False)
    phases = losses_by_phase(out)
    assert sum(len(v) for v in phases.values()) == 24
    if method == "semalign":
        assert list(phases) == ["layer 1", "layer 2"]
    for name, losses in phases.items():
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"{method} {name}: {losses}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == 24
    assert summary["action"] == "trained" and not (out / "checkpoint").exists()
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")


def test_semalign_logs_layer_and_kl_per_frontier_stage(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "run"
    align.run(align_config(tiny_pair, tiny_cache, out, "semalign", "align.steps=6"), progress=False)
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in entries] == ["layer 1"] * 3 + ["layer 2"] * 3
    for entry in entries:
        assert entry["loss"] == pytest.approx(entry["layer"] + entry["kl"], rel=1e-5)


@pytest.mark.parametrize("schedule, multipliers", [("constant", [1, 1, 1]), ("linear", [1, 2 / 3, 1 / 3])])
def test_each_frontier_stage_gets_its_learning_rate_schedule(tiny_pair, tiny_cache, tmp_path, schedule, multipliers):
    """A short stage decayed to 0 trains on (s+1)/2 steps' worth of lr; `constant` (the default) on s."""
    out = tmp_path / schedule
    align.run(align_config(tiny_pair, tiny_cache, out, "semalign", "align.steps=6", "align.lr=0.002",
                           f"methods.semalign.phase_schedule={schedule}"), progress=False)
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for phase in ("layer 1", "layer 2"):
        rates = [e["lr"] for e in entries if e["phase"] == phase]
        assert rates == pytest.approx([0.002 * m for m in multipliers])
    with pytest.raises(ValueError, match=r"methods\.semalign\.phase_schedule must be one of \['linear', 'constant'\], got 'cosine'"):
        align.run(align_config(tiny_pair, tiny_cache, tmp_path / "bad", "semalign",
                               "methods.semalign.phase_schedule=cosine"), progress=False)


def test_output_losses_can_see_the_answer_tokens_alone(tiny_pair, tiny_dataset, tmp_path):
    """A train_on_inputs cache supervises every token; `answer` scores the reply tokens only."""
    from pkt_pipeline.models import load_model

    from stages import extract

    every_token = tmp_path / "every-token"
    extract.run(extract_config(tiny_pair["teacher"], tiny_dataset, every_token, "extract.train_on_inputs=true",
                               "extract.limit=8"), progress=False)
    cache = open_cache(every_token)
    batch = next(iter(CacheLoader(cache, batch_size=3, topk=False)))
    model = load_model(tiny_pair["student"], dtype="float32")
    every, answers = (forward_student(model, batch, tokens=tokens) for tokens in ("supervised", "answer"))
    expected = [int(token) for row, example_id in enumerate(batch.example_ids)
                for token, is_answer in zip(cache.tokens(example_id)[1:], cache.answer(example_id)[1:]) if is_answer]
    assert answers.targets.tolist() == expected
    assert 0 < len(expected) < len(every.targets) == int(batch.attention_mask[:, 1:].sum())
    summary = align.run(align_config(tiny_pair, every_token, tmp_path / "kd", "kd", "align.steps=2",
                                     "align.output_tokens=answer"), progress=False)
    assert summary["action"] == "trained"
    with pytest.raises(ValueError, match=r"methods\.semalign\.layer_tokens must be one of \['supervised', 'answer'\], got 'reply'"):
        align.run(align_config(tiny_pair, every_token, tmp_path / "bad", "semalign", "methods.semalign.layer_tokens=reply"),
                  progress=False)


def test_only_the_frontier_layer_trains(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "frontier"
    config = align_config(tiny_pair, tiny_cache, out, "semalign", "align.steps=4", "align.checkpoint_every=2")
    align.run(config, progress=False)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    # peft initialises lora_B to zero: a layer that trained has non-zero lora_B
    trained = {name.split("layers.")[1].split(".")[0] for name, value in adapter.items()
               if "lora_B" in name and value.abs().sum() > 0}
    assert trained == {"0", "1"}

    out_one = tmp_path / "one-layer"
    align.run(align_config(tiny_pair, tiny_cache, out_one, "semalign", "align.steps=4", "methods.semalign.layers=[2]"),
              progress=False)
    adapter = load_file(out_one / "adapter" / "adapter_model.safetensors")
    assert {name.split("layers.")[1].split(".")[0] for name, value in adapter.items()
            if "lora_B" in name and value.abs().sum() > 0} == {"1"}


@pytest.mark.parametrize("options", [
    ["methods.semalign.objective=v1"],
    ["methods.semalign.layer_loss=fisher"],
    ["methods.semalign.recompose=transpose", "methods.semalign.map_space=post_norm", "methods.semalign.pairing=proportional",
     "methods.semalign.supervise=hidden", "methods.semalign.kl_mode=renormalise", "methods.semalign.kl_temperature=2.0"],
], ids=["v1", "fisher", "transpose-postnorm-proportional-hidden"])
def test_semalign_options_train(tiny_pair, tiny_cache, tmp_path, options):
    out = tmp_path / "options"
    align.run(align_config(tiny_pair, tiny_cache, out, "semalign", "align.steps=12", *options), progress=False)
    phases = losses_by_phase(out)
    for name, losses in phases.items():
        assert all(torch.isfinite(torch.tensor(losses))), losses
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(value.abs().sum() > 0 for name, value in adapter.items() if "lora_B" in name)
    if "methods.semalign.objective=v1" in options:
        assert list(phases) == ["v1"]
        assert set(json.loads((out / "train_log.jsonl").read_text().splitlines()[0])) >= {"layer", "label_cos"}


def test_full_layer_training_leaves_other_layers_untouched(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "full"
    align.run(align_config(tiny_pair, tiny_cache, out, "semalign", "align.steps=4", "methods.semalign.trainable=full",
                           "methods.semalign.layers=[2]"), progress=False)
    assert not (out / "adapter").exists()
    before = load_file(Path(tiny_pair["student"]) / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed), changed


def test_output_reloads_merged_and_as_adapter_and_generates(tiny_pair, tiny_cache, tmp_path):
    from peft import PeftModel

    out = tmp_path / "kd"
    align.run(align_config(tiny_pair, tiny_cache, out, "kd", "align.steps=6"), progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    untrained_logits = base(torch.tensor([[5, 6, 7, 8]])).logits
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged(torch.tensor([[5, 6, 7, 8]])).logits, untrained_logits)
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_report_map_writes_pairing_fidelity_and_cka(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "report"
    summary = align.run(align_config(tiny_pair, tiny_cache, out, "semalign", "align.steps=8", "align.report_map=true"),
                        progress=False)
    report = json.loads((out / "map_report.json").read_text())
    assert report == summary["report"]
    assert summary["report_lines"][0].split() == ["student", "teacher", "fidelity", "CKA", "before", "CKA", "after"]
    assert len(summary["report_lines"]) == 1 + len(report["pairs"])
    cache = open_cache(tiny_cache)
    assert report["pairs"] == dict(zip(["1", "2"], attributed_pairing(cache.attribution("contribution"), 2, window=2,
                                                                      distinct=True)))
    with pytest.raises(ValueError, match=r"^align\.report_map \(--report-map\): kd writes no report$"):
        align.run(align_config(tiny_pair, tiny_cache, tmp_path / "kd", "kd", "align.report_map=true"), progress=False)
    assert not (tmp_path / "kd").exists()
    by_output = align.run(align_config(tiny_pair, tiny_cache, tmp_path / "by-output", "semalign", "align.steps=2",
                                       "methods.semalign.pairing_score=output"), progress=False)
    assert by_output["metrics"]["pairs"] == dict(zip(["1", "2"], attributed_pairing(cache.attribution("output"), 2,
                                                                                    window=2, distinct=True)))
    for key in ("fidelity", "cka_before", "cka_after"):
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in report[key].values()), report[key]
    assert report["cka_before"] != report["cka_after"]


def test_teacher_equal_to_student_gives_identity_map_and_zero_relation_loss(tiny_pair, tmp_path, tiny_dataset):
    from stages import extract

    cache_dir = tmp_path / "self-cache"
    extract.run(extract_config(tiny_pair["student"], tiny_dataset, cache_dir, "extract.capture=[hidden, delta]"),
                progress=False)
    cache = open_cache(cache_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"]).eval()
    semantic_map = build_semantic_map(cache.teacher_head(), student.get_output_embeddings().weight.detach(),
                                      cache.manifest.tokenizer.vocab_size, recompose="lstsq")
    scale = semantic_map.matrix.diagonal().mean()
    torch.testing.assert_close(semantic_map.matrix / scale, torch.eye(STUDENT_SHAPE.hidden), atol=2e-3, rtol=0)
    loader = CacheLoader(cache, batch_size=4, layers=[1, 2], kind="delta", topk=False, shuffle_buffer=8)
    batch = next(iter(loader))
    with torch.no_grad():
        out = forward_student(student, batch, hidden_states=True)
    mask = batch.supervised & batch.attention_mask.bool()
    for layer in (1, 2):
        own = out.hidden_states[layer] - out.hidden_states[layer - 1]
        assert relation_loss(own, semantic_map.apply(batch.teacher[layer]), mask).item() < 1e-3
    loader.close()


def test_student_with_another_vocabulary_is_refused(tiny_pair, tiny_cache, tmp_path):
    tokenizer = build_tokenizer(vocab_size=320)
    model = build_model(STUDENT_SHAPE, len(tokenizer), 3, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    config = load_config(overrides=[f"student={tmp_path / 'other'}", f"align.cache={tiny_cache}",
                                    f"align.out={tmp_path / 'out'}", *FAST])
    with pytest.raises(CacheError) as error:
        align.run(config, progress=False)
    message = str(error.value)
    assert "does not match the cache" in message and "320 tokens" in message and "384 tokens" in message
    assert str(tmp_path / "other") in message and str(tiny_pair["teacher"]) in message
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_with_clear_errors(tiny_pair, tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'semalgin'; registered methods: .*semalign"):
        align.run(align_config(tiny_pair, tiny_cache, tmp_path / "a", "semalgin"), progress=False)
    with pytest.raises(CacheError, match="no cache at"):
        align.run(align_config(tiny_pair, tmp_path / "nowhere", tmp_path / "b", "kd"), progress=False)
    with pytest.raises(ValueError, match=r"outside this student's layers 1\.\.2"):
        align.run(align_config(tiny_pair, tiny_cache, tmp_path / "c", "semalign", "methods.semalign.layers=[3]"),
                  progress=False)
    done = tmp_path / "d"
    align.run(align_config(tiny_pair, tiny_cache, done, "lora-sft", "align.steps=2"), progress=False)
    assert align.run(align_config(tiny_pair, tiny_cache, done, "lora-sft", "align.steps=2"),
                     progress=False)["action"] == "up to date"
    with pytest.raises(ValueError, match="holds another run .*align"):
        align.run(align_config(tiny_pair, tiny_cache, done, "kd", "align.steps=2"), progress=False)


def test_a_registered_plugin_trains_and_a_nan_loss_stops_cleanly(tiny_pair, tiny_cache, tmp_path):
    from pkt_pipeline.training import NonFiniteLoss

    from nan_method import NanAtThirdStep

    register("test-nan", method=NanAtThirdStep)
    assert "test-nan" in available_methods() and get_method("test-nan") is NanAtThirdStep
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"the loss is nan at step 3 .*last checkpoint is intact"):
        align.run(align_config(tiny_pair, tiny_cache, out, "test-nan", "align.steps=5", "align.checkpoint_every=2"),
                  progress=False)
    assert (out / "checkpoint" / "state.json").exists() and not (out / "metrics.json").exists()
    with pytest.raises(ValueError, match="method 'kd' is already registered by pkt_pipeline.methods.kd.student"):
        register("kd", method=type("Other", (Method,), {}))


def cli_align(tiny_pair, cache, out, *extra) -> subprocess.Popen:
    overrides = [x for o in [*FAST, "align.checkpoint_every=2", "align.steps=16", *extra] for x in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "pkt_pipeline.cli", "align", "--cache", str(cache), "--student",
                             str(tiny_pair["student"]), "--method", "semalign", "--out", str(out), "--no-progress",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    log = out / "train_log.jsonl"
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= steps and (out / "checkpoint" / "state.json").exists():
            return
        if process.poll() is not None:
            pytest.fail(f"align ended before step {steps}: {process.stderr.read()}")
        time.sleep(0.02)
    pytest.fail("align did not reach the step in time")


@pytest.mark.integration
def test_resume_after_kill_9_matches_an_uninterrupted_run(tiny_pair, tiny_cache, tmp_path):
    reference = cli_align(tiny_pair, tiny_cache, tmp_path / "reference")
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr

    out = tmp_path / "killed"
    process = cli_align(tiny_pair, tiny_cache, out)
    wait_for_steps(out, 11, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "metrics.json").exists(), "the kill came after the run had finished"
    resumed = cli_align(tiny_pair, tiny_cache, out, "align.overwrite=true")  # as the DVC stages call it
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resuming" in stdout

    def log(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (path / "train_log.jsonl").read_text().splitlines()]

    assert log(out) == log(tmp_path / "reference")
    expected = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    for name, value in load_file(out / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0)


def _interrupted_run(tiny_pair, tiny_cache, out: Path) -> str:
    """A long align stopped by Ctrl-C after its second logged step; its stderr."""
    process = cli_align(tiny_pair, tiny_cache, out, "align.steps=200", "align.checkpoint_every=1000")
    _wait_for_log(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    return stderr


@pytest.mark.integration
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "interrupted"
    assert "checkpoint saved" in _interrupted_run(tiny_pair, tiny_cache, out)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["position"]["global_step"] == len((out / "train_log.jsonl").read_text().splitlines())


@pytest.mark.integration
def test_a_kill_between_the_checkpoint_renames_resumes_from_the_previous_checkpoint(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "swapping"
    _interrupted_run(tiny_pair, tiny_cache, out)
    step = json.loads((out / "checkpoint" / "state.json").read_text())["position"]["global_step"]
    # What a kill between the save's two renames leaves: the old checkpoint moved aside, the new one unfinished.
    (out / "checkpoint").rename(out / "checkpoint.previous")
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "trained.safetensors").write_bytes(b"half written")
    resumed = cli_align(tiny_pair, tiny_cache, out, "align.steps=200", "align.checkpoint_every=1000")
    _wait_for_log(out, step + 1, resumed)
    resumed.send_signal(signal.SIGINT)
    stdout, stderr = resumed.communicate(timeout=120)
    assert f"at step {step} " in stdout, stdout
    assert (out / "checkpoint" / "state.json").exists() and not (out / "checkpoint.previous").exists()


def _wait_for_log(out: Path, lines: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = out / "train_log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= lines:
            return
        if process.poll() is not None:
            pytest.fail(f"align ended early: {process.stderr.read()}")
        time.sleep(0.02)
    pytest.fail("no progress in time")


def test_list_methods_and_help():
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "align", "--list-methods"],
                            capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"semalign", "kd", "lora-sft"} <= set(names)
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "align", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--cache" in result.stdout and "--report-map" in result.stdout

