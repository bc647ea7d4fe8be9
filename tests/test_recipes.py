"""The published recipes of Seeking and LaTen: one switch resolves every value, from one place.

The expected values are written out here, from the published code (see pkt_pipeline/recipes.py for
the file each comes from), so a changed recipe or a loader that drops part of it fails."""

from __future__ import annotations

import math

import pytest
import yaml
from click.testing import CliRunner

from conftest import PROJECT_ROOT
from pkt_pipeline.cli import main as pkt
from pkt_pipeline.config import ConfigError, load_config, to_dict
from pkt_pipeline.methods import get_method, resolve, teacher_settings
from pkt_pipeline.training import micro_batch_size_for

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"

SEEKING_ALIGN = {"lr": 3e-4, "batch_size": 64, "micro_batch_size": 8, "epochs": 3.0, "steps": 0,
                 "warmup_ratio": 0.03, "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0}
SEEKING_LORA = {"r": 16, "alpha": 16, "dropout": 0.05}
SEEKING_EXTRACT = {"seed_examples": 32, "sensitivity_tokens": "answer", "rank": 16}
LATEN_ALIGN = {"lr": 3e-4, "steps": 0, "epochs": 1.0, "micro_batch_size": 1, "max_grad_norm": math.inf}
LATEN_SETTINGS = {"align_examples": 15, "mse_weight": 1000.0, "hidden_size": 0, "init_std": 1e-5,
                  "weight_decay": 0.05, "betas": [0.9, 0.95], "schedule_steps": 0, "pct_start": 0.1,
                  "div_factor": 25.0, "final_div_factor": 1.0, "anneal_strategy": "cos", "cycle_momentum": True}
LATEN_EXTRACT = {"locate_examples": 8, "readout_vocab": 0, "readout_norm": "final", "transfer_rate": 0.1,
                 "modules": ["up_proj", "down_proj", "v_proj", "o_proj"], "seed": 42}


def assert_fields(section, expected: dict) -> None:
    resolved = {key: getattr(section, key) for key in expected}
    assert resolved == expected


def test_the_published_recipe_resolves_every_value_over_the_default_budget():
    """configs/default.yaml sets a small budget for both baselines; the switch replaces all of it."""
    budget = load_config(DEFAULT_CONFIG)
    assert (teacher_settings(budget, "seeking").seed_examples, teacher_settings(budget, "laten").locate_examples) == (12, 3)
    config = load_config(DEFAULT_CONFIG, recipe="published")

    assert_fields(teacher_settings(config, "seeking"), SEEKING_EXTRACT)
    assert_fields(teacher_settings(config, "laten"), LATEN_EXTRACT)
    seeking = resolve(config, "seeking").align
    assert_fields(seeking, SEEKING_ALIGN)
    assert_fields(seeking.lora, SEEKING_LORA)
    assert seeking.lora.alpha / seeking.lora.r == 1.0  # a LoRA scaling of 1, as published
    assert micro_batch_size_for(seeking, get_method("seeking")) == 8  # 64 examples an update, 8 a forward
    laten = resolve(config, "laten")
    assert_fields(laten.align, LATEN_ALIGN)
    assert_fields(laten.settings, LATEN_SETTINGS)
    assert micro_batch_size_for(laten.align, get_method("laten")) == 1

    # Everything else is the file's: the recipe touches only the two baselines' sections.
    for method in ("semalign", "kd", "lora-sft"):
        ours, theirs = resolve(config, method), resolve(budget, method)
        assert (ours.align, ours.settings) == (theirs.align, theirs.settings)
    changed = {section for section in ("teacher", "student", "runtime", "assets", "eval", "extract", "align")
               if getattr(config, section) != getattr(budget, section)}
    assert not changed
    assert {name for name in config.methods if config.methods[name] != budget.methods[name]} == {"seeking", "laten"}


def test_overrides_beat_the_recipe_and_the_recipe_beats_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("methods:\n  seeking: {align: {lr: 1.0e-2, steps: 5}, teacher: {seed_examples: 4}}\n")
    config = load_config(path, ["methods.seeking.align.batch_size=32", "methods.laten.teacher.readout_vocab=128"],
                         recipe="published")
    seeking = resolve(config, "seeking").align
    assert (seeking.lr, seeking.steps, teacher_settings(config, "seeking").seed_examples) == (3e-4, 0, 32)
    assert seeking.batch_size == 32 and teacher_settings(config, "laten").readout_vocab == 128


def test_pkt_config_prints_the_resolved_recipe():
    result = CliRunner().invoke(pkt, ["config", "--config", str(DEFAULT_CONFIG), "--recipe", "published"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["methods"]["seeking"]["align"]["batch_size"] == 64
    assert printed["methods"]["laten"]["betas"] == [0.9, 0.95]
    assert printed["methods"]["laten"]["teacher"]["readout_vocab"] == 0
    assert printed == to_dict(load_config(DEFAULT_CONFIG, recipe="published"))


def test_an_unknown_recipe_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'paper'; known recipes: published"):
        load_config(recipe="paper")
    result = CliRunner().invoke(pkt, ["config", "--recipe", "paper"])
    assert result.exit_code == 1 and "unknown recipe 'paper'; known recipes: published" in result.output
