"""Seeking on the tiny pair: the sensitivity (on the answers only, as published), block search and SVD
factors against independent computations, an unchanged start model, and `pkt extract --with seeking` +
`pkt align --method seeking`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, Qwen2Config

from pkt_pipeline.cache import open_cache, verify_cache
from pkt_pipeline.cli import main as pkt
from pkt_pipeline.config import load_config
from pkt_pipeline.examples import load_examples
from pkt_pipeline.methods import AlignContext, build_extra, teacher_settings
from pkt_pipeline.methods.seeking.student import Seeking, lora_modules
from pkt_pipeline.methods.seeking.teacher import (SeekingExtra, best_subblock, lora_factors, seed_examples, select_layers,
                                                  sensitivity)
from pkt_pipeline.models import load_model, load_tokenizer, with_lora
from pkt_pipeline.tiny_models import STUDENT_SHAPE, TEACHER_SHAPE
from tiny_data import SMALL_LAYOUT

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
FAST = ["runtime.dtype=float32", "align.batch_size=4", "align.lr=5e-3", "align.loader.shuffle_buffer=8",
        "align.lora.r=4", "align.lora.alpha=8", "align.checkpoint_every=1000"]
"""r=4, alpha=8: a LoRA scaling of 2, so a factor forgotten in the initialisation would show."""


def run_pkt(*args: str):
    return CliRunner().invoke(pkt, [*args, "--no-progress"], catch_exceptions=False)


def module_weight(model, layer: int, module: str) -> torch.Tensor:
    decoder_layer = model.model.layers[layer]
    parent = decoder_layer.mlp if module in ("up_proj", "down_proj") else decoder_layer.self_attn
    return getattr(parent, module).weight


def cache_settings(tiny_pair, tiny_dataset, out) -> list[str]:
    """`pkt extract` arguments matching the `tiny_cache` fixture's settings, for the tiny student."""
    sets = ["runtime.dtype=float32", *SMALL_LAYOUT, "extract.capture=[hidden, delta]",
            f"student={tiny_pair['student']}"]
    return ["extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(tiny_dataset), "--out", str(out),
            *itertools.chain.from_iterable(("--set", s) for s in sets)]


@pytest.fixture(scope="module")
def seeking_cache(tiny_pair, tiny_dataset, tiny_cache, tmp_path_factory):
    """The tiny cache with the seeking extra added by the real command, and that command's output."""
    out = tmp_path_factory.mktemp("seeking") / "cache"
    shutil.copytree(tiny_cache, out)
    result = run_pkt(*cache_settings(tiny_pair, tiny_dataset, out), "--with", "seeking")
    return out, result



def reference_sensitivity(teacher, examples) -> dict[tuple[int, str], torch.Tensor]:
    """|W * dL/dW| summed over `examples`, per (layer, module), by plain autograd on the supervised tokens."""
    expected: dict[tuple[int, str], torch.Tensor] = {}
    for example in examples:
        ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
        labels = torch.where(torch.from_numpy(example.supervised)[None], ids, -100)
        teacher.zero_grad(set_to_none=True)
        teacher(input_ids=ids, labels=labels).loss.backward()
        for layer, module in itertools.product(range(TEACHER_SHAPE.layers), MODULES):
            weight = module_weight(teacher, layer, module)
            expected[(layer, module)] = expected.get((layer, module), 0) + (weight * weight.grad).abs().detach()
    teacher.zero_grad(set_to_none=True)
    return expected

def test_sensitivity_matches_a_plain_autograd_loop(tiny_pair, tiny_dataset):
    teacher = load_model(tiny_pair["teacher"], dtype="float32")
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    examples, _ = load_examples(tiny_dataset, tokenizer, limit=4)
    assert all(not e.supervised.all() for e in examples)  # prompts are unsupervised: the mask matters
    nothing = dataclasses.replace(examples[0], supervised=np.zeros_like(examples[0].supervised))

    held = module_weight(teacher, 1, "o_proj")
    held.grad = torch.ones_like(held)  # a gradient left from elsewhere must neither count nor be lost
    sentinel = held.grad

    result = sensitivity(teacher, [*examples, nothing])

    assert held.grad is sentinel
    held.grad = None

    expected = reference_sensitivity(teacher, examples)

    assert (result.examples, result.skipped) == (4, 1)
    assert set(result.scores) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result.scores[key], value.detach(), rtol=1e-4, atol=1e-9)
    # the call leaves the model as it found it: every parameter trainable again, no gradient of its own
    assert all(p.requires_grad and p.grad is None for p in teacher.parameters())


def test_the_extra_scores_the_answer_tokens_only_even_when_the_cache_supervises_all(tiny_pair, tiny_dataset):
    """Published: the sensitivity's loss covers the replies (`loss_on_output=True`). With every token
    supervised in the cache (`extract.train_on_inputs`, as for MMLU), the extra's layer sensitivity must
    equal a plain autograd loop over the answer tokens, and differ from one over every token."""
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    teacher = load_model(tiny_pair["teacher"], dtype="float32")

    def settings(config):
        return teacher_settings(config, "seeking")

    def config(*extra: str):
        return load_config(overrides=[f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student']}",
                                      "extract.train_on_inputs=true", "methods.seeking.teacher.seed_examples=3", *extra])

    answers, _ = load_examples(tiny_dataset, tokenizer, limit=3)
    every, _ = load_examples(tiny_dataset, tokenizer, train_on_inputs=True, limit=3)
    assert all(e.supervised.all() for e in every) and not any(e.supervised.all() for e in answers)
    chosen = seed_examples(config(), settings(config()), tiny_dataset, tokenizer)
    assert [e.supervised.tolist() for e in chosen] == [e.supervised.tolist() for e in answers]
    supervised = config("methods.seeking.teacher.sensitivity_tokens=supervised")
    chosen = seed_examples(supervised, settings(supervised), tiny_dataset, tokenizer)
    assert [e.supervised.tolist() for e in chosen] == [e.supervised.tolist() for e in every]

    def layer_totals(examples) -> np.ndarray:
        totals = np.zeros(TEACHER_SHAPE.layers)
        for (layer, _), value in reference_sensitivity(teacher, examples).items():
            totals[layer] += value.sum().item()
        return totals

    output = build_extra(config(), "seeking").compute(teacher, tokenizer, config(), tiny_dataset, progress=False)
    assert output.provenance["sensitivity_tokens"] == "answer" and output.provenance["seed_examples"] == 3
    scored = np.asarray(output.provenance["layer_sensitivity"])
    np.testing.assert_allclose(scored, layer_totals(answers), rtol=1e-4)
    assert not np.allclose(scored, layer_totals(every), rtol=1e-2)

    with pytest.raises(ValueError, match=r"methods\.seeking\.teacher\.sensitivity_tokens must be one of "
                                         r"\['answer', 'supervised'\], got 'prompt'"):
        prompt = config("methods.seeking.teacher.sensitivity_tokens=prompt")
        SeekingExtra(settings(prompt)).compute(teacher, tokenizer, prompt, tiny_dataset, progress=False)


def test_best_subblock_equals_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 9, 3, 4), (5, 5, 5, 5), (6, 8, 1, 1), (10, 4, 2, 4), (1, 6, 1, 3), (12, 11, 6, 2)]
    for height, width, rows, cols in shapes:
        for signed in (False, True):
            scores = torch.rand(height, width, generator=generator)
            scores = scores - 0.5 if signed else scores
            sums = {(r, c): scores[r:r + rows, c:c + cols].double().sum().item()
                    for r in range(height - rows + 1) for c in range(width - cols + 1)}
            best = max(sums, key=sums.get)
            block = best_subblock(scores, rows, cols)
            assert (block.row, block.col) == best, (height, width, rows, cols, signed)
            assert block.total == pytest.approx(sums[best], rel=1e-9, abs=1e-12)
            assert block.of(scores).shape == (rows, cols)
    with pytest.raises(ValueError, match="must not be larger than the teacher's"):
        best_subblock(torch.rand(4, 5), 5, 2)


def test_layers_are_the_most_sensitive_in_depth_order():
    assert select_layers([5.0, 1.0, 7.0, 3.0], 2) == [0, 2]
    assert select_layers([1.0, 9.0, 2.0, 8.0, 3.0], 3) == [1, 3, 4]
    assert select_layers([2.0, 2.0, 2.0], 2) == [0, 1]  # ties: the shallower layer
    with pytest.raises(ValueError, match="must not be deeper than the teacher"):
        select_layers([1.0, 2.0], 3)


def test_lora_factors_are_the_truncated_svd_and_reproduce_the_block_at_full_rank():
    block = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    b, a = lora_factors(block, 7)
    assert b.shape == (12, 7) and a.shape == (7, 7)
    torch.testing.assert_close(b @ a, block, rtol=0, atol=1e-5)
    b3, a3 = lora_factors(block, 3)
    u, s, vh = np.linalg.svd(block.double().numpy(), full_matrices=False)
    torch.testing.assert_close((b3 @ a3).double(), torch.from_numpy(u[:, :3] * s[:3] @ vh[:3]), rtol=0, atol=1e-5)
    # A = V_r^T has orthonormal rows and B = U_r S_r carries the singular values
    torch.testing.assert_close(a3 @ a3.T, torch.eye(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(b3.norm(dim=0).double(), torch.from_numpy(s[:3]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="rank 8 must lie in 1..7"):
        lora_factors(block, 8)


def test_start_model_is_the_student_and_its_lora_the_teachers_block(tiny_pair, seeking_cache):
    cache_dir, _ = seeking_cache
    cache = open_cache(cache_dir)
    config = load_config(overrides=[f"student={tiny_pair['student']}", f"align.cache={cache_dir}",
                                    "align.method=seeking", *FAST])
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 64, 120]])
    with torch.no_grad():
        before = load_model(tiny_pair["student"], dtype="float32")(ids).logits
    torch.manual_seed(0)
    model = with_lora(load_model(tiny_pair["student"], dtype="float32"), config.align.lora)
    method = Seeking(AlignContext(cache, config.align, load_tokenizer(tiny_pair["student"])))
    method.setup(model)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    # The adapter's update is the rank-4 SVD of the teacher block the provenance names.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32)
    provenance = cache.manifest.extras["seeking"].provenance
    layers = lora_modules(model)
    assert set(layers) == set(itertools.product(range(STUDENT_SHAPE.layers), MODULES))
    for (layer, module), lora in layers.items():
        block = provenance["blocks"][f"layers.{layer}.{module}"]
        weight = module_weight(teacher, block["teacher_layer"], module).detach()
        rows, cols = block["shape"]
        b, a = lora_factors(weight[block["row"]:block["row"] + rows, block["col"]:block["col"] + cols], 4)
        update = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        assert lora.scaling["default"] == 2.0
        torch.testing.assert_close(update.detach(), b @ a, rtol=0, atol=1e-5)
        assert update.abs().max() > 0.01


def test_extract_then_align_end_to_end(tiny_pair, seeking_cache, tmp_path):
    from peft import PeftModel

    cache_dir, extracted = seeking_cache
    assert extracted.exit_code == 0, extracted.output
    assert f"added seeking to {cache_dir}" in extracted.output
    assert verify_cache(cache_dir) == []
    provenance = open_cache(cache_dir).manifest.extras["seeking"].provenance
    chosen = provenance["teacher_layers"]
    assert len(chosen) == STUDENT_SHAPE.layers and chosen == sorted(chosen) and set(chosen) <= set(range(4))
    totals = provenance["layer_sensitivity"]
    assert min(totals[i] for i in chosen) >= max(totals[i] for i in range(4) if i not in chosen)
    assert provenance["rank"] == 16 and provenance["seed_examples"] == 24 and provenance["modules"] == list(MODULES)
    assert provenance["sensitivity_tokens"] == "answer"
    assert provenance["student"]["shapes"]["up_proj"] == [STUDENT_SHAPE.intermediate, STUDENT_SHAPE.hidden]
    factors = open_cache(cache_dir).extra("seeking")
    assert factors["layers.1.down_proj.lora_B"].shape == (STUDENT_SHAPE.hidden, 16)
    assert factors["layers.1.down_proj.lora_A"].shape == (16, STUDENT_SHAPE.intermediate)

    common = ["--cache", str(cache_dir), "--student", str(tiny_pair["student"]),
              *itertools.chain.from_iterable(("--set", s) for s in FAST)]
    out = tmp_path / "seeking"
    trained = run_pkt("align", *common, "--method", "seeking", "--out", str(out), "--set", "align.steps=16")
    assert trained.exit_code == 0, trained.output
    assert "trained seeking" in trained.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 16 and {e["phase"] for e in log} == {"seeking"}
    assert sum(e["loss"] for e in log[-3:]) < sum(e["loss"] for e in log[:3])

    # Same start model as lora-sft, same first batch: the same first loss.
    sft = tmp_path / "sft"
    assert run_pkt("align", *common, "--method", "lora-sft", "--out", str(sft), "--set", "align.steps=1").exit_code == 0
    first_sft = json.loads((sft / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert log[0]["loss"] == pytest.approx(first_sft, rel=1e-5)

    # The saved adapter is right for the original student: it equals the merged model.
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 16)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    with torch.no_grad():
        untrained = student(ids).logits
        with_adapter = PeftModel.from_pretrained(student, out / "adapter")(ids).logits
        merged_logits = merged(ids).logits
    torch.testing.assert_close(with_adapter, merged_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged_logits, untrained, atol=1e-3)


def test_align_at_the_published_recipe(tiny_pair, seeking_cache, tmp_path):
    """`--recipe published`: batches of 64 (the 24 cached examples: one a pass) cut into micro-batches of 8,
    3 passes, 3% warm-up then linear decay from 3e-4, LoRA r = alpha = 16 with dropout 0.05."""
    cache_dir, extracted = seeking_cache
    assert extracted.exit_code == 0, extracted.output
    out = tmp_path / "seeking"
    result = run_pkt("align", "--cache", str(cache_dir), "--student", str(tiny_pair["student"]), "--method", "seeking",
                     "--out", str(out), "--recipe", "published", "--set", "runtime.dtype=float32")
    assert result.exit_code == 0, result.output
    assert "3 steps in 1 phase(s) over 24 cached examples, batch 64, 8 example(s) per forward" in result.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # ceil(0.03 x 3) = 1 warm-up step (from 0, as transformers' schedule), then linear decay to 0.
    assert [entry["lr"] for entry in log] == pytest.approx([0.0, 3e-4, 1.5e-4])
    recorded = json.loads((out / "run.json").read_text())["align"]
    assert (recorded["lr"], recorded["batch_size"], recorded["micro_batch_size"]) == (3e-4, 64, 8)
    assert recorded["epochs"] == 3
    assert (recorded["warmup_ratio"], recorded["lora"]["r"], recorded["lora"]["alpha"]) == (0.03, 16, 16)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # The saved adapter folds the start in at rank 2r with alpha doubled: the same scaling of 1.
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (32, 32, 0.05)


def test_bad_inputs_are_refused_with_clear_errors(tiny_pair, tiny_dataset, tiny_cache, seeking_cache, tmp_path):
    common = ["--student", str(tiny_pair["student"]), "--method", "seeking",
              *itertools.chain.from_iterable(("--set", s) for s in FAST)]
    missing = run_pkt("align", "--cache", str(tiny_cache), *common, "--out", str(tmp_path / "a"))
    assert missing.exit_code == 1
    assert "has no 'seeking' teacher extra" in missing.output and "pkt extract --with seeking" in missing.output

    too_wide = run_pkt("align", "--cache", str(seeking_cache[0]), *common, "--out", str(tmp_path / "b"),
                       "--set", "align.lora.r=32")
    assert too_wide.exit_code == 1
    assert "align.lora.r is 32 but the cache's seeking factors have rank 16" in too_wide.output
    assert "methods.seeking.teacher.rank=32" in too_wide.output

    deep = tmp_path / "deep-student"
    Qwen2Config(vocab_size=384, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64).save_pretrained(deep)  # stage one reads only the student's config
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    refused = run_pkt(*cache_settings(tiny_pair, tiny_dataset, cache), "--with", "seeking", "--set", f"student={deep}")
    assert refused.exit_code == 1
    assert "the student has 6 layers, the teacher 4" in refused.output and "must not be deeper" in refused.output
    assert "seeking" not in open_cache(cache).manifest.extras


def test_a_changed_extra_setting_recomputes_the_extra(tiny_pair, tiny_dataset, seeking_cache, tmp_path):
    """The extra's inputs (its `methods.seeking.teacher` section, the student and LoRA shape it factors for) are
    recorded; a rerun with other inputs computes the extra again instead of saying "nothing to do"."""
    out = tmp_path / "cache"
    shutil.copytree(seeking_cache[0], out)
    command = [*cache_settings(tiny_pair, tiny_dataset, out), "--with", "seeking"]
    inputs = open_cache(out).manifest.extras["seeking"].inputs
    assert inputs["student"] == str(tiny_pair["student"]) and inputs["lora_r"] == 16
    assert "nothing to do" in run_pkt(*command).output

    changed = run_pkt(*command, "--set", "methods.seeking.teacher.seed_examples=3", "--set", "methods.seeking.teacher.rank=4")
    assert changed.exit_code == 0, changed.output
    assert "recomputing the teacher extra seeking: its settings changed (seeking)" in changed.output
    manifest = open_cache(out).manifest
    assert manifest.extras["seeking"].provenance["rank"] == 4 and manifest.extras["seeking"].provenance["seed_examples"] == 3
    assert verify_cache(out) == []
    assert "nothing to do" in run_pkt(*command, "--set", "methods.seeking.teacher.seed_examples=3",
                                      "--set", "methods.seeking.teacher.rank=4").output
