"""The typed config: files, overrides and the errors a typo gets."""

from __future__ import annotations

import pytest

from conftest import PROJECT_ROOT
from pkt_pipeline.config import ConfigError, PktConfig, load_config


def test_defaults_without_a_file():
    assert load_config() == PktConfig()


def test_shipped_configs_load():
    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), PktConfig), path


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: a/b\nassets:\n  models: [x, y]\n  dtype: float32\n")
    config = load_config(path, ["assets.models=z", "runtime.trust_remote_code=true", "assets.pins=null"])
    assert config.teacher == "a/b"
    assert config.assets.models == ["z"] and config.assets.dtype == "float32"
    assert config.runtime.trust_remote_code is True and config.assets.pins is None


def test_comma_separated_list_override():
    assert load_config(overrides=["assets.models=a, b"]).assets.models == ["a", "b"]


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("assets:\n  model_dir: x\n")
    with pytest.raises(ConfigError, match=r"unknown key 'assets.model_dir'; did you mean 'assets.models_dir'\?"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.trust_remote_code=maybe", "runtime.trust_remote_code must be bool, got 'maybe'"),
        ("assets=3", "assets must be a mapping"),
        ("teacher", "not of the form section.key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_method_sections_override_align_for_that_method_only():
    from pkt_pipeline.config import for_method

    config = load_config(overrides=["align.lr=0.001", "methods={kd: {lr: 1.0e-4, kd: {ce_weight: 0.5}}}"])
    kd = for_method(config, "kd")
    assert (kd.align.method, kd.align.lr, kd.align.kd.ce_weight) == ("kd", 1e-4, 0.5)
    semalign = for_method(config, "semalign")
    assert (semalign.align.lr, semalign.align.kd.ce_weight) == (0.001, 0.0)
    with pytest.raises(ConfigError, match=r"methods\.kd: unknown key 'align\.lrr'; did you mean 'align\.lr'"):
        load_config(overrides=["methods={kd: {lrr: 1}}"])


def test_a_method_section_can_be_a_named_variant_of_a_method():
    from pkt_pipeline.config import for_method

    config = load_config(overrides=["methods={semalign-kl-only: {method: semalign, semalign: {lambda_layer: 0.0}}}"])
    variant = for_method(config, "semalign-kl-only")
    assert (variant.align.method, variant.align.semalign.lambda_layer) == ("semalign", 0.0)
    assert for_method(config, "semalign").align.semalign.lambda_layer == 1.0
