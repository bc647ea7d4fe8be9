"""LaTen on the tiny pair: its scores against a written-out forward, gradients into the translator
only, its published optimizer and schedule, the saved model carrying the injected deltas (a
non-vanishing edit at the published recipe), and the two stages end to end through `pkt`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.datasets import DatasetNotFound
from pkt_pipeline.examples import format_example
from pkt_pipeline.loader import ExampleMeta
from pkt_pipeline.methods import AlignContext, resolve
from pkt_pipeline.methods.laten.config import LatenExtractConfig
from pkt_pipeline.methods.laten.student import LatenBatches, NeuronInjection
from pkt_pipeline.methods.laten.teacher import ModelShape, Readout, answer_target, check_settings, locate, neuron_counts
from pkt_pipeline.models import load_model, load_tokenizer
from pkt_pipeline.training import steps_for, train
from stages import extract as extract_stage
from batch_sources import drain, protocol_gaps
from tiny_data import SMALL_LAYOUT, extract_config, write_dataset

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCATE = 3
EXTRACT_SPLIT = 5
PUBLISHED_EXTRACT_SPLIT = 20
"""Examples in the published MMLU/GSM8K extract splits: the published one-cycle schedule's length."""


@pytest.fixture(scope="module")
def laten_data(tmp_path_factory) -> Path:
    """A task folder as the transfer splits lay it out: train, extract and align."""
    folder = tmp_path_factory.mktemp("laten-data")
    write_dataset(folder / "extract.jsonl", EXTRACT_SPLIT, seed=11)
    write_dataset(folder / "align.jsonl", 20, seed=12)
    return write_dataset(folder / "train.jsonl", 12, seed=13)


@pytest.fixture(scope="module")
def laten_cache(tiny_pair, laten_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("laten-cache") / "cache"
    config = extract_config(tiny_pair["teacher"], laten_data, out, "extract.extras=[laten]",
                            f"student={tiny_pair['student']}", f"methods.laten.teacher.locate_examples={LOCATE}")
    extract_stage.run(config, progress=False, echo=lambda *_: None)
    return out


def make_method(tiny_pair, cache: Path, *overrides: str, student: Path | None = None, recipe: str = ""):
    """A LaTen method set up on a fresh float32 student, as `pkt align` builds it."""
    student = student or tiny_pair["student"]
    config = load_config(overrides=[f"student={student}", f"align.cache={cache}", "runtime.dtype=float32", *overrides],
                         recipe=recipe)
    resolved = resolve(config, "laten")
    align = resolved.align
    model = load_model(student, dtype="float32", device="cpu")
    torch.manual_seed(align.seed)
    method = resolved.method_class(AlignContext(open_cache(cache), align, load_tokenizer(student),
                                                settings=resolved.settings))
    method.setup(model)
    return method, model, align


def train_method(method, model, cfg, out: Path) -> list[dict]:
    """Train as `pkt align` does (its step budget, the method's loader); returns the per-step log."""
    from pkt_pipeline.training import read_log

    phases = method.phases(steps_for(cfg, len(method.loader(None, cfg.seed))), model.config.num_hidden_layers)
    out.mkdir()
    train(model, method, phases, lambda phase: method.loader(phase, cfg.seed), cfg, out, progress=False)
    return read_log(out)


# --- the scores, against a forward written out from the weights --------------------------------------------


def reference_internals(model, ids: list[int]) -> tuple[list[dict], torch.Tensor]:
    """Qwen2's forward from its state dict in float64: per layer its input, per-head outputs z, attention
    output, MLP activation and MLP output; and the final residual state."""
    cfg = model.config
    weights = {name: value.detach().double() for name, value in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, length = cfg.hidden_size // heads, len(ids)
    inverse = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None]
    cos, sin = angles.cos(), angles.sin()

    def rms(x, gain):
        return gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(x):
        first, second = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)

    def project(name, x, width):
        return (x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]).view(length, width, hd).transpose(0, 1)

    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    h = weights["model.embed_tokens.weight"][ids]
    layers = []
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        x = rms(h, weights[prefix + "input_layernorm.weight"])
        q = rope(project(prefix + "self_attn.q_proj", x, heads))
        k = rope(project(prefix + "self_attn.k_proj", x, kv_heads))
        v = project(prefix + "self_attn.v_proj", x, kv_heads)
        z = []
        for head in range(heads):
            group = head // (heads // kv_heads)
            scores = (q[head] @ k[group].T / math.sqrt(hd)).masked_fill(causal, float("-inf"))
            z.append(torch.softmax(scores, -1) @ v[group])
        z = torch.cat(z, -1)
        attention = z @ weights[prefix + "self_attn.o_proj.weight"].T
        middle = h + attention
        x = rms(middle, weights[prefix + "post_attention_layernorm.weight"])
        gate, up = x @ weights[prefix + "mlp.gate_proj.weight"].T, x @ weights[prefix + "mlp.up_proj.weight"].T
        activation = F.silu(gate) * up
        mlp = activation @ weights[prefix + "mlp.down_proj.weight"].T
        layers.append({"input": h, "z": z, "middle": middle, "activation": activation, "mlp": mlp,
                       "o": weights[prefix + "self_attn.o_proj.weight"],
                       "down": weights[prefix + "mlp.down_proj.weight"]})
        h = middle + mlp
    return layers, h


def one_example(tokenizer):
    row = {"messages": [{"role": "user", "content": "How many clips did Natalia sell in April?"},
                        {"role": "assistant", "content": "She sold 48 clips, so the answer is (B)."}]}
    return format_example(row, tokenizer, "chat", 96)


# float32 against float64: `final` scores keep their relative precision (see Readout.scores); `own` ones are
# differences of two float32 log-probs near log(1/384).
TOLERANCE = {"final": 1e-8, "own": 3e-6}


@pytest.mark.parametrize("readout_norm", ["final", "own"])
def test_scores_equal_a_written_out_computation(tiny_pair, readout_norm):
    model = load_model(tiny_pair["teacher"], dtype="float32", device="cpu")
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    example = one_example(tokenizer)
    target = answer_target(example, tokenizer)
    # The answer's last meaningful token: ")." and the end-of-turn token after it do not count.
    assert tokenizer.decode(example.input_ids[target:target + 1]).strip() == "B"
    assert example.supervised[target] and example.supervised[target + 1:].any()

    ids, y, p = example.input_ids.tolist(), int(example.input_ids[target]), target - 1
    layers, final = reference_internals(model, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    gain = model.model.norm.weight.detach().double()
    head = model.lm_head.weight.detach().double()
    eps = model.config.rms_norm_eps
    np.testing.assert_allclose((gain * final / torch.sqrt(final.pow(2).mean(-1, keepdim=True) + eps)) @ head.T,
                               logits, atol=1e-4)  # the written-out forward is the model's

    def log_p(state):
        scale = final[p] if readout_norm == "final" else state
        normed = gain * state / torch.sqrt(scale.pow(2).mean() + eps)
        return torch.log_softmax(head @ normed, -1)[y].item()

    shape = ModelShape.of(model.config)
    hd, group = shape.head_dim, shape.heads // shape.kv_heads
    expected = {"attention": [], "mlp": [], "mlp_neurons": [], "o": [], "v": []}
    for layer in layers:
        start, middle = layer["input"][p], layer["middle"][p]
        expected["attention"].append(log_p(middle) - log_p(start))
        expected["mlp"].append(log_p(middle + layer["mlp"][p]) - log_p(middle))
        expected["mlp_neurons"].append([log_p(middle + layer["activation"][p, i] * layer["down"][:, i]) - log_p(middle)
                                        for i in range(shape.intermediate)])
        expected["o"].append([log_p(start + layer["z"][p, n] * layer["o"][:, n]) - log_p(start)
                              for n in range(shape.heads * hd)])
        values = []
        for kv_head in range(shape.kv_heads):
            for d in range(hd):
                columns = [h * hd + d for h in range(kv_head * group, (kv_head + 1) * group)]
                values.append(log_p(start + sum(layer["z"][p, c] * layer["o"][:, c] for c in columns)) - log_p(start))
        expected["v"].append(values)

    counts = {"mlp": 7, "o": 5, "v": 3}
    found = locate(model, example.input_ids, target, shape.layers, counts, Readout(model), readout_norm)
    for sort in ("attention", "mlp"):
        np.testing.assert_allclose(found.layer_scores[sort], expected[sort], rtol=1e-4, atol=TOLERANCE[readout_norm])
        np.testing.assert_array_equal(found.layers[sort], np.arange(shape.layers))
    for kind, name in (("mlp", "mlp_neurons"), ("o", "o"), ("v", "v")):
        reference = np.asarray(expected[name])
        np.testing.assert_allclose(found.scores[kind], reference, rtol=1e-4, atol=TOLERANCE[readout_norm])
        best = np.argsort(-reference, axis=1, kind="stable")[:, :counts[kind]]
        np.testing.assert_array_equal(found.neurons[kind], best)
    assert np.abs(np.asarray(expected["mlp_neurons"])).max() > 1e-4  # the comparison is not of zeros

    # Selecting fewer layers keeps the best-scored ones, in depth order, with the same neuron scores.
    two = locate(model, example.input_ids, target, 2, counts, Readout(model), readout_norm)
    for sort in ("attention", "mlp"):
        best = np.sort(np.argsort(-np.asarray(expected[sort]), kind="stable")[:2])
        np.testing.assert_array_equal(two.layers[sort], best)
    np.testing.assert_allclose(two.scores["mlp"], np.asarray(expected["mlp_neurons"])[two.layers["mlp"]], rtol=1e-4,
                               atol=TOLERANCE[readout_norm])


def test_head_vocabulary_readout_matches_the_full_softmax(tiny_pair):
    """`readout_vocab`: exact over the likeliest tokens, first order over the rest — close to the full
    softmax, the same neurons chosen, and the full softmax again once the head covers the vocabulary."""
    model = load_model(tiny_pair["teacher"], dtype="float32", device="cpu")
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    example = one_example(tokenizer)
    target = answer_target(example, tokenizer)
    shape = ModelShape.of(model.config)
    counts = {"mlp": 7, "o": 5, "v": 3}
    full = locate(model, example.input_ids, target, shape.layers, counts, Readout(model))
    # The tiny random model's next-token distribution is nearly flat, so even 256 of 384 tokens leave ~30%
    # of the mass to the first-order tail: a harder case than a trained model's peaked one.
    readout = Readout(model, vocab=256)
    head = locate(model, example.input_ids, target, shape.layers, counts, readout)
    assert 0.1 < readout.largest_tail_mass < 0.5
    for kind in counts:
        spread = np.abs(full.scores[kind]).max()
        np.testing.assert_allclose(head.scores[kind], full.scores[kind], atol=1e-2 * spread)
        assert not np.array_equal(head.scores[kind], full.scores[kind])  # it is an approximation
        np.testing.assert_array_equal(head.neurons[kind], full.neurons[kind])
    whole = locate(model, example.input_ids, target, shape.layers, counts, Readout(model, vocab=model.config.vocab_size))
    for kind in counts:
        np.testing.assert_array_equal(whole.scores[kind], full.scores[kind])


def test_head_vocabulary_readout_refuses_the_own_norm():
    with pytest.raises(ValueError, match="readout_vocab needs readout_norm: final"):
        check_settings(LatenExtractConfig(readout_vocab=64, readout_norm="own"))


# --- stage one's cache ---------------------------------------------------------------------------------------


def test_extra_holds_the_teacher_rows_of_the_located_neurons(tiny_pair, laten_cache):
    cache = open_cache(laten_cache)
    arrays, provenance = cache.extra("laten"), cache.manifest.extras["laten"].provenance
    teacher = load_model(tiny_pair["teacher"], dtype="float32", device="cpu")
    student = ModelShape.of(AutoConfig.from_pretrained(tiny_pair["student"]))
    counts = neuron_counts(student, 0.1)
    assert provenance["counts"] == counts and len(provenance["locate"]) == LOCATE
    assert provenance["extract_examples"] == EXTRACT_SPLIT  # the published schedule's length
    assert provenance["data"]["inject"].endswith("train.jsonl") and len(provenance["align"]) == 20
    assert arrays["vectors/up_proj"].shape == (LOCATE + 1, student.layers, counts["mlp"], 64)
    assert arrays["vectors/v_proj"].shape == (LOCATE + 1, student.layers, counts["v"], 64)
    tokenizer = load_tokenizer(tiny_pair["teacher"])
    offsets = arrays["examples/offsets"]
    for e in range(LOCATE + 1):
        ids = arrays["examples/tokens"][offsets[e]:offsets[e + 1]]
        found = locate(teacher, ids, int(arrays["examples/targets"][e]), student.layers, counts, Readout(teacher))
        for kind, sort in (("mlp", "mlp"), ("o", "attention"), ("v", "attention")):
            np.testing.assert_array_equal(arrays[f"neurons/{kind}"][e], found.neurons[kind])
            np.testing.assert_array_equal(arrays[f"layers/{sort}"][e], found.layers[sort])
        for i, layer in enumerate(found.layers["mlp"].tolist()):
            block = teacher.model.layers[layer].mlp
            rows = found.neurons["mlp"][i]
            np.testing.assert_allclose(arrays["vectors/up_proj"][e, i], block.up_proj.weight[rows].detach(), atol=1e-4)
            np.testing.assert_allclose(arrays["vectors/down_proj"][e, i], block.down_proj.weight[:, rows].T.detach(),
                                       atol=1e-4)
        for i, layer in enumerate(found.layers["attention"].tolist()):
            attention = teacher.model.layers[layer].self_attn
            np.testing.assert_allclose(arrays["vectors/o_proj"][e, i],
                                       attention.o_proj.weight[:, found.neurons["o"][i]].T.detach(), atol=1e-4)
            np.testing.assert_allclose(arrays["vectors/v_proj"][e, i],
                                       attention.v_proj.weight[found.neurons["v"][i]].detach(), atol=1e-4)
        assert tokenizer.decode(ids[:1]) == "<|im_start|>"


# --- stage two ------------------------------------------------------------------------------------------------


def test_only_the_translator_gets_gradients(tiny_pair, laten_cache):
    method, model, _ = make_method(tiny_pair, laten_cache)
    phase = method.phases(LOCATE, 2)[0]
    names = set(method.trainable(model, phase))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)  # what the trainer does with `trainable`
    assert names == {f"laten.translator.nets.{m}.{i}.weight" for m in ("up_proj", "down_proj", "v_proj", "o_proj")
                     for i in (0, 2)}
    with method.loader(phase, 0) as loader:
        batch = next(iter(loader.batches(1)))
    assert len(batch.example_ids) == 16 and batch.meta[0] == ExampleMeta(position=0, role="locate", anchor=0)
    loss, parts = method.loss(model, batch, phase)
    loss.backward()
    # The published objective sums the 16 examples' losses (parts are per example).
    assert parts["lm"] > 0 and parts["mse"] > 0
    assert loss.item() == pytest.approx(16 * (parts["lm"] + 1000 * parts["mse"]))
    for name, parameter in model.named_parameters():
        if name in names:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    # The LM loss alone reaches the translator through the hooks, and only through them.
    method.settings.mse_weight = 0.0
    for hooked in (True, False):
        if not hooked:
            method.injection.detach()
        model.zero_grad(set_to_none=True)
        method.loss(model, batch, phase)[0].backward()
        reached = [p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in names]
        assert all(reached) if hooked else not any(reached)


def test_laten_batches_are_a_batch_source_whose_meta_says_whose_deltas_to_inject(tiny_pair, laten_cache):
    """What a member's id used to encode (`located/role:position:id`) is its `meta`: the located example
    whose deltas its step injects, its role and its position among the LaTen examples; ids are the examples'."""
    method, model, _ = make_method(tiny_pair, laten_cache)
    phase = method.phases(LOCATE, 2)[0]
    assert protocol_gaps(LatenBatches) == []
    first, again = drain(method.loader(phase, 0), LOCATE + 1)  # into the second epoch
    examples = method.examples
    for step, batch in enumerate(first):
        located = step % LOCATE
        assert batch.meta[0] == ExampleMeta(position=located, role="locate", anchor=located)
        assert all(m.role == "align" and m.anchor == located and m.position in examples.align for m in batch.meta[1:])
        assert batch.example_ids == [examples.ids[m.position] for m in batch.meta]
        assert [part.meta[0].anchor for part in batch.split(1)] == [located] * len(batch.meta)
    assert [b.meta for b in again] == [b.meta for b in first]
    with pytest.raises(ValueError, match=r"a LaTen batch names its located example in `meta`; this one has none "
                                         r"\(examples \['"):
        method.loss(model, dataclasses.replace(first[0], meta=()), phase)


def test_micro_batches_give_the_whole_batch_gradient(tiny_pair, laten_cache):
    """LaTen's default of one example per forward (the published loop) sums to the same update."""
    from pkt_pipeline.training import _accumulate_gradients

    method, model, _ = make_method(tiny_pair, laten_cache)
    phase = method.phases(LOCATE, 2)[0]
    names = set(method.trainable(model, phase))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    with method.loader(phase, 0) as loader:
        batch = next(iter(loader.batches(1)))
    grads, losses = [], []
    for size in (0, 1, 5):
        model.zero_grad(set_to_none=True)
        loss, parts = _accumulate_gradients(model, method, batch, phase, size)
        losses.append((loss, parts))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n in names})
    assert len(batch.split(1)) == 16 and len(batch.split(5)) == 4
    for loss, parts in losses[1:]:
        assert loss == pytest.approx(losses[0][0], rel=1e-5)
        assert parts == pytest.approx(losses[0][1], rel=1e-5)
    for other in grads[1:]:
        for name in names:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-10)


def one_cycle(peak: float, total: int, step: int, pct_start: float = 0.1, div: float = 25.0,
              final_div: float = 1.0) -> float:
    """torch's one-cycle rate (cos) at `step`, written out: half-cosine from peak/div up to peak, reached at
    step pct_start * total - 1, then half-cosine down to peak / (div * final_div) at the last step."""
    start, end, turn = peak / div, peak / (div * final_div), pct_start * total - 1
    if step <= turn:
        return peak + (start - peak) * (1 + math.cos(math.pi * step / turn)) / 2
    return end + (peak - end) * (1 + math.cos(math.pi * (step - turn) / (total - 1 - turn))) / 2


def test_the_optimizer_and_schedule_are_the_published_ones(tiny_pair, laten_cache, tmp_path):
    """AdamW with weight decay 0.05 and betas (0.9, 0.95), and torch's one-cycle schedule over one step per
    extract example, each value read from `align.laten`; the trainer logs the schedule's rates."""
    method, model, cfg = make_method(tiny_pair, laten_cache, "align.lr=0.002", "align.checkpoint_every=1000")
    params = list(method.injection.translator.parameters())
    optimizer = method.optimizer(params)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["weight_decay"] == 0.05 and optimizer.defaults["betas"] == (0.9, 0.95)
    scheduler = method.scheduler(optimizer, method.phases(LOCATE, 2)[0])
    assert type(scheduler) is torch.optim.lr_scheduler.OneCycleLR
    assert scheduler.total_steps == EXTRACT_SPLIT  # the extract split's size, not the 3 located
    trained = train_method(method, model, cfg, tmp_path / "run")
    expected = [one_cycle(0.002, EXTRACT_SPLIT, step) for step in range(LOCATE)]
    assert [entry["lr"] for entry in trained] == pytest.approx(expected)

    other, _, _ = make_method(tiny_pair, laten_cache, "methods.laten.weight_decay=0.1", "methods.laten.betas=[0.8, 0.99]",
                              "methods.laten.schedule_steps=20", "methods.laten.div_factor=10", "align.lr=0.001")
    optimizer = other.optimizer(params)
    assert optimizer.defaults["weight_decay"] == 0.1 and optimizer.defaults["betas"] == (0.8, 0.99)
    scheduler = other.scheduler(optimizer, other.phases(LOCATE, 2)[0])
    assert scheduler.total_steps == 20
    rates, beta1 = [], []
    for _ in range(3):
        rates.append(scheduler.get_last_lr()[0])
        beta1.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    # The published shape on 20 steps: the peak/div start, the peak at step 1, then the cosine fall; beta1
    # cycles against it between torch's 0.95 and 0.85, whatever beta1 was configured (as published).
    assert rates == pytest.approx([1e-4, 1e-3, one_cycle(1e-3, 20, 2, div=10)])
    assert beta1[:2] == pytest.approx([0.95, 0.85]) and optimizer.param_groups[0]["betas"][1] == 0.99
    other.settings.cycle_momentum = False
    optimizer = other.optimizer(params)
    other.scheduler(optimizer, other.phases(LOCATE, 2)[0])
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99)


def test_bad_schedule_settings_are_refused_naming_the_key(tiny_pair, laten_cache):
    with pytest.raises(ValueError, match=r"methods\.laten\.anneal_strategy must be one of \['cos', 'linear'\], "
                                         r"got 'square'"):
        make_method(tiny_pair, laten_cache, "methods.laten.anneal_strategy=square")
    with pytest.raises(ValueError, match=r"methods\.laten\.betas must be two numbers in \[0, 1\), got \[0\.9\]"):
        make_method(tiny_pair, laten_cache, "methods.laten.betas=[0.9]")
    method, _, _ = make_method(tiny_pair, laten_cache, "align.steps=8")
    with pytest.raises(ValueError, match="one-cycle schedule spans 5 steps but this run takes 8"):
        method.scheduler(method.optimizer(list(method.injection.translator.parameters())), method.phases(8, 2)[0])


@pytest.fixture(scope="module")
def recipe_cache(tiny_pair, tmp_path_factory) -> Path:
    """Stage one at the published recipe, on a task laid out as the published MMLU splits (20 extract examples)."""
    folder = tmp_path_factory.mktemp("laten-recipe")
    write_dataset(folder / "extract.jsonl", PUBLISHED_EXTRACT_SPLIT, seed=21)
    write_dataset(folder / "align.jsonl", 16, seed=22)
    data = write_dataset(folder / "train.jsonl", 4, seed=23)
    out = folder / "cache"
    config = load_config(overrides=[f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student']}",
                                    f"extract.data={data}", f"extract.out={out}", "runtime.dtype=float32",
                                    *SMALL_LAYOUT, "extract.extras=[laten]"], recipe="published")
    extract_stage.run(config, progress=False, echo=lambda *_: None)
    return out


def test_a_run_at_the_published_recipe_makes_a_non_vanishing_edit(tiny_pair, recipe_cache, tmp_path):
    """Eight translator steps (the evaluated checkpoint) of 16 examples on the 20-step schedule: every edited
    weight moves by at least 1e-6 of its norm. That is 8x float32's relative spacing (1.2e-7), so the saved
    float32 weights carry the edit, and at least 100x the edit of the untrained translator (N(0, 1e-5)
    weights: ~1e-9 relative), which is what a translator that never learned — no gradient, hooks not
    firing — would leave. (Measured: 8e-6 to 6e-5; the tiny width keeps it small, see
    pkt_pipeline/methods/laten.py.)"""
    provenance = open_cache(recipe_cache).manifest.extras["laten"].provenance
    assert provenance["settings"]["readout_vocab"] == 0 and provenance["extract_examples"] == PUBLISHED_EXTRACT_SPLIT
    method, model, cfg = make_method(tiny_pair, recipe_cache, "align.checkpoint_every=1000", recipe="published")
    assert (method.examples.steps, method.schedule_length(), method.step_examples) == (8, 20, 16)
    original = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("laten.")}
    untrained, neurons = method.injected_deltas()

    trained = train_method(method, model, cfg, tmp_path / "run")
    assert [entry["lr"] for entry in trained] == pytest.approx([one_cycle(3e-4, 20, k) for k in range(8)])
    assert all(math.isfinite(entry["loss"]) for entry in trained)
    state = method.finalize(model).state_dict()
    for module, delta in untrained.items():
        parent = "mlp" if module in ("up_proj", "down_proj") else "self_attn"
        for layer in range(delta.shape[0]):
            name = f"model.layers.{layer}.{parent}.{module}.weight"
            scale = original[name].norm()
            change = ((state[name] - original[name]).norm() / scale).item()
            start = (delta[layer].norm() / scale).item()  # the neurons are distinct: this is the edit's norm
            assert change >= 1e-6 and change >= 100 * start, (name, change, start)


def test_saved_model_carries_the_injected_deltas(tiny_pair, laten_cache, tmp_path):
    method, model, cfg = make_method(tiny_pair, laten_cache, "align.lr=0.05", "align.checkpoint_every=1000")
    original = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("laten.")}
    train_method(method, model, cfg, tmp_path / "run")
    student_state = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("laten.")}
    assert all(torch.equal(student_state[name], original[name]) for name in original)  # training left them alone

    deltas, neurons = method.injected_deltas()
    ids = torch.tensor([method.examples.tokens[method.examples.inject].tolist()])
    with torch.no_grad():
        method.injection.activate(deltas, neurons)
        hooked = model(ids).logits
        method.injection.deactivate()
        plain = model(ids).logits
    model = method.finalize(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    state = reloaded.state_dict()
    assert set(state) == set(original)

    edited = set()
    for module, delta in deltas.items():
        parent = "mlp" if module in ("up_proj", "down_proj") else "self_attn"
        for layer in range(delta.shape[0]):
            name = f"model.layers.{layer}.{parent}.{module}.weight"
            expected = torch.zeros_like(original[name])
            if module in ("up_proj", "v_proj"):
                expected[neurons[module][layer]] = delta[layer]
            else:
                expected[:, neurons[module][layer]] = delta[layer].T
            torch.testing.assert_close(state[name] - original[name], expected, atol=1e-6, rtol=0)
            assert expected.abs().max() > 1e-5, name  # well above the tolerance: a real edit
            edited.add(name)
    for name in set(original) - edited:
        assert torch.equal(state[name], original[name]), name
    with torch.no_grad():
        saved_logits = reloaded(ids).logits
    torch.testing.assert_close(saved_logits, hooked, atol=1e-5, rtol=1e-5)  # hooks and weights are one edit
    assert (saved_logits - plain).abs().max() > 1e-3


def test_a_cache_without_the_extra_or_another_student_is_refused(tiny_pair, tiny_cache, laten_cache):
    with pytest.raises(CacheError, match="has no 'laten' teacher extra .*`pkt extract --with laten`"):
        make_method(tiny_pair, tiny_cache)
    with pytest.raises(ValueError, match=r"located for a student shaped .*'layers': 2.*this student is shaped "
                                         r".*'layers': 4.*pkt extract --with laten"):
        make_method(tiny_pair, laten_cache, student=tiny_pair["teacher"])


# --- both stages through the command line -------------------------------------------------------------------


def pkt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.integration
def test_extract_with_laten_then_align_end_to_end(tiny_pair, laten_data, tmp_path):
    settings = [f"--set={item}" for item in [*SMALL_LAYOUT, "runtime.dtype=float32", f"student={tiny_pair['student']}",
                                             "methods.laten.teacher.locate_examples=2"]]
    result = pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(laten_data), "--out", "cache",
                 "--with", "laten", "--no-progress", *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = pkt("align", "--cache", "cache", "--student", str(tiny_pair["student"]), "--method", "laten", "--out",
                 "run", "--no-progress", "--set=runtime.dtype=float32", "--set=align.lr=0.05", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trained laten" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["phases"]["laten"]["last"]) >= {"lm", "mse"}
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoint").exists()

    # The saved model is the student with exactly the injection example's neuron rows/columns changed.
    method, student, _ = make_method(tiny_pair, tmp_path / "cache")
    neurons = method.student_neurons[method.examples.inject]
    before = {name: value for name, value in student.state_dict().items() if not name.startswith("laten.")}
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.{layer}.{parent}.{module}.weight" for layer in range(2)
                       for module, parent in (("up_proj", "mlp"), ("down_proj", "mlp"), ("v_proj", "self_attn"),
                                              ("o_proj", "self_attn"))}
    for name in changed:
        layer, module = int(name.split(".")[2]), name.split(".")[4]
        difference = (after[name] - before[name]).abs()
        moved = difference.sum(1) if module in ("up_proj", "v_proj") else difference.sum(0)
        assert set(torch.nonzero(moved).flatten().tolist()) == set(neurons[module][layer].tolist()), name


def test_a_task_without_an_align_split_is_refused_naming_the_key(tiny_pair, tmp_path):
    write_dataset(tmp_path / "extract.jsonl", 3)
    data = write_dataset(tmp_path / "train.jsonl", 4)
    config = extract_config(tiny_pair["teacher"], data, tmp_path / "cache", "extract.extras=[laten]",
                            f"student={tiny_pair['student']}")
    message = (f"methods.laten.teacher.align_data defaults to the task's align split, but there is no align.jsonl "
               f"beside {data}; set methods.laten.teacher.align_data")
    with pytest.raises(DatasetNotFound, match=re.escape(message)):
        extract_stage.run(config, progress=False, echo=lambda *_: None)
    with pytest.raises(CacheError, match="not a complete pkt cache"):
        open_cache(tmp_path / "cache")  # nothing half-made is taken for a finished cache


def test_injection_hooks_equal_editing_the_weights(tiny_pair, laten_cache):
    """With sizeable deltas on every module kind, the hooked forward is the forward of W + delta."""
    method, model, _ = make_method(tiny_pair, laten_cache)
    with torch.no_grad():
        for parameter in method.injection.translator.parameters():
            parameter.normal_(0, 0.3)
    deltas, neurons = method.injected_deltas()
    ids = torch.tensor([method.examples.tokens[0].tolist()])
    with torch.no_grad():
        method.injection.activate(deltas, neurons)
        hooked = model(ids).logits
        method.injection.detach()
        plain = model(ids).logits
        NeuronInjection.bake(model, deltas, neurons)
        baked = model(ids).logits
    torch.testing.assert_close(hooked, baked, atol=1e-5, rtol=1e-5)
    assert (hooked - plain).abs().max() > 1e-2
