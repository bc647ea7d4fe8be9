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


def checked(*overrides: str) -> PktConfig:
    """A config as a stage sees it: loaded, then every `methods` section validated by the methods package."""
    from pkt_pipeline.methods import check_sections

    config = load_config(overrides=list(overrides))
    check_sections(config)
    return config


def test_method_sections_override_align_for_that_method_only():
    from pkt_pipeline.methods import resolve

    config = checked("align.lr=0.001", "methods={kd: {ce_weight: 0.5, align: {lr: 1.0e-4}}}")
    kd = resolve(config, "kd")
    assert (kd.align.method, kd.align.lr, kd.settings.ce_weight) == ("kd", 1e-4, 0.5)
    semalign = resolve(config, "semalign")
    assert (semalign.align.lr, semalign.settings.kl_mode) == (0.001, "rest")
    assert resolve(config, "lora-sft").settings is None
    with pytest.raises(ConfigError, match=r"^unknown key 'methods\.kd\.align\.lrr'; did you mean 'methods\.kd\.align\.lr'\?$"):
        checked("methods={kd: {align: {lrr: 1}}}")


def test_a_method_section_can_be_a_named_variant_of_a_method():
    from pkt_pipeline.methods import resolve

    config = checked("methods={semalign-kl-only: {method: semalign, lambda_layer: 0.0}}")
    variant = resolve(config, "semalign-kl-only")
    assert (variant.method, variant.align.method, variant.settings.lambda_layer) == ("semalign", "semalign", 0.0)
    assert resolve(config, "semalign").settings.lambda_layer == 1.0


def test_config_module_leaves_method_sections_raw():
    """config.py imports no method: a section is a plain mapping until the methods package reads it."""
    config = load_config(overrides=["methods={semalign: {lambda_layer: 0.5}}"])
    assert config.methods == {"semalign": {"lambda_layer": 0.5}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("align.semalign.layers=[2]", r"align\.semalign moved: write methods\.semalign\.<key>"),
        ("align.kd.mode=renormalise", r"align\.kd moved: write methods\.kd\.<key> \(SemAlign's output term: "
                                      r"methods\.semalign\.kl_mode, kl_temperature\)"),
        ("align.laten.align_examples=3", r"align\.laten moved: write methods\.laten\.<key>"),
        ("align.diagnostic_examples=4", r"align\.diagnostic_examples moved: write methods\.semalign\.diagnostic_examples"),
        ("extract.laten.locate_examples=2", r"extract\.laten moved: write methods\.laten\.teacher\.<key>"),
        ("extract.seeking.rank=4", r"extract\.seeking moved: write methods\.seeking\.teacher\.<key>"),
    ],
)
def test_keys_of_the_old_layout_name_their_new_place(override, message):
    with pytest.raises(ConfigError, match=f"^defaults: {message}$"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{semalign: {semalign: {lambda_layer: 0.0}}}",
         r"^methods\.semalign\.semalign moved: write its keys directly under methods\.semalign$"),
        ("{semalign-kl-only: {method: semalign, semalign: {lambda_layer: 0.0}}}",
         r"^methods\.semalign-kl-only\.semalign moved: write its keys directly under methods\.semalign-kl-only$"),
        ("{semalign: {kd: {mode: renormalise}}}",
         r"^methods\.semalign\.kd moved: write its keys directly under methods\.semalign \(SemAlign's output term: "
         r"kl_mode, kl_temperature\)$"),
        ("{kd: {lr: 1.0e-4}}", r"^methods\.kd\.lr is a shared align key: write methods\.kd\.align\.lr$"),
        ("{laten: {steps: 0}}", r"^methods\.laten\.steps is a shared align key: write methods\.laten\.align\.steps$"),
        ("{lora-sft: {ce_weight: 1.0}}",
         r"^methods\.lora-sft: unknown key 'ce_weight'; lora-sft has no settings of its own \(overrides of the shared "
         r"budget go under methods\.lora-sft\.align\)$"),
        ("{semalign: {lamda_layer: 0.0}}",
         r"^unknown key 'methods\.semalign\.lamda_layer'; did you mean 'methods\.semalign\.lambda_layer'\?$"),
        ("{kd: {teacher: {rank: 4}}}", r"^methods\.kd\.teacher: only a teacher extra's own section holds teacher "
                                       r"settings \(methods\.laten\.teacher, methods\.seeking\.teacher"),
        ("{seeking: {teacher: {rnk: 4}}}",
         r"^unknown key 'methods\.seeking\.teacher\.rnk'; did you mean 'methods\.seeking\.teacher\.rank'\?$"),
    ],
)
def test_a_method_section_in_the_old_shape_or_with_a_typo_is_refused(section, message):
    load_config(overrides=[f"methods={section}"])  # config.py leaves the sections to the methods package
    with pytest.raises(ConfigError, match=message):
        checked(f"methods={section}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("align.max_grad_norm=-1", r"align\.max_grad_norm must be > 0 \(or \.inf\), got -1\.0"),
        ("align.max_grad_norm=.nan", r"align\.max_grad_norm must be > 0 \(or \.inf\), got nan"),
        ("align.steps=-5", r"align\.steps must be >= 0, got -5"),
        ("align.epochs=0", r"align\.epochs must be > 0, got 0\.0"),
        ("align.epochs=-1.5", r"align\.epochs must be > 0, got -1\.5"),
        ("align.warmup_steps=-1", r"align\.warmup_steps must be >= 0, got -1"),
        ("align.micro_batch_size=-2", r"align\.micro_batch_size must be >= 0, got -2"),
        ("align.checkpoint_every=0", r"align\.checkpoint_every must be >= 1, got 0"),
        ("align.lr=0", r"align\.lr must be > 0, got 0\.0"),
        ("align.batch_size=0", r"align\.batch_size must be >= 1, got 0"),
        ("align.warmup_ratio=1", r"align\.warmup_ratio must be in \[0, 1\), got 1\.0"),
        ("align.warmup_ratio=-0.1", r"align\.warmup_ratio must be in \[0, 1\), got -0\.1"),
        ("align.weight_decay=-0.01", r"align\.weight_decay must be >= 0, got -0\.01"),
        ("align.seed=-1", r"align\.seed must be >= 0, got -1"),
        ("align.lora.r=0", r"align\.lora\.r must be >= 1, got 0"),
        ("align.lora.dropout=1.0", r"align\.lora\.dropout must be in \[0, 1\), got 1\.0"),
        ("methods.semalign.lambda_layer=-1", r"methods\.semalign\.lambda_layer must be >= 0, got -1\.0"),
        ("methods.semalign.lambda_out=-0.5", r"methods\.semalign\.lambda_out must be >= 0, got -0\.5"),
        ("methods.semalign.layers=[1, 0]", r"methods\.semalign\.layers must be >= 1, got \[1, 0\]"),
        ("methods.semalign.kl_temperature=0", r"methods\.semalign\.kl_temperature must be > 0, got 0\.0"),
        ("methods.kd.temperature=0", r"methods\.kd\.temperature must be > 0, got 0\.0"),
        ("methods.laten.betas=[0.9, 1.0]", r"methods\.laten\.betas must be in \[0, 1\), got \[0\.9, 1\.0\]"),
        ("methods.laten.betas=[0.9]", r"methods\.laten\.betas must be two numbers in \[0, 1\), got \[0\.9\]"),
        ("methods.laten.pct_start=1", r"methods\.laten\.pct_start must be in \[0, 1\), got 1\.0"),
        ("align.loader.prefetch=0", r"align\.loader\.prefetch must be >= 1, got 0"),
        ("extract.chunk_tokens=0", r"extract\.chunk_tokens must be >= 1, got 0"),
        ("extract.top_k=0", r"extract\.top_k must be >= 1, got 0"),
        ("extract.max_length=1", r"extract\.max_length must be >= 2, got 1"),
        ("extract.limit=-3", r"extract\.limit must be >= 0, got -3"),
        ("extract.layers=[0, -1]", r"extract\.layers must be >= 0, got \[0, -1\]"),
        ("methods.laten.teacher.transfer_rate=0",
         r"methods\.laten\.teacher\.transfer_rate must be in \(0, 1\], got 0\.0"),
        ("methods.seeking.teacher.rank=-1", r"methods\.seeking\.teacher\.rank must be >= 0, got -1"),
        ("eval.limit=-1", r"eval\.limit must be >= 0, got -1"),
        ("eval.nll_limit=-1", r"eval\.nll_limit must be >= 0, got -1"),
        ("eval.timeout_s=0", r"eval\.timeout_s must be > 0, got 0\.0"),
        ("eval.workers=0", r"eval\.workers must be >= 1, got 0"),
        # a method's section is checked by the same rules, named by its dotted path
        ("methods={kd: {align: {max_grad_norm: -1}}}",
         r"methods\.kd\.align\.max_grad_norm must be > 0 \(or \.inf\), got -1\.0"),
        ("methods={kd: {ce_weight: -1}}", r"methods\.kd\.ce_weight must be >= 0, got -1\.0"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^defaults: {message}$" if not override.startswith("methods") else f"^{message}$"):
        checked(override)


@pytest.mark.parametrize(
    "override",
    ["align.max_grad_norm=.inf", "align.steps=0", "align.warmup_ratio=0", "align.micro_batch_size=0",
     "methods.semalign.lambda_layer=0", "eval.nll_limit=null", "extract.limit=0", "methods.laten.betas=[0, 0.999]"],
)
def test_the_edges_of_each_range_load(override):
    checked(override)


def test_a_file_value_out_of_range_names_the_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("align:\n  checkpoint_every: 0\n")
    with pytest.raises(ConfigError, match=f"^{path}: align.checkpoint_every must be >= 1, got 0$"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods={kdd: {align: {lr: 1.0e-4}}}",
         # other tests register methods of their own: the built-in ones must be listed, others may follow
         r"^methods\.kdd: 'kdd' is not a registered method \(did you mean 'kd'\?\); registered: alm, kd, laten, lora-sft, "
         r"seeking, semalign\b.*\. A variant of a method names it: `methods: \{kdd: \{method: NAME, \.\.\.\}\}`$"),
        ("methods={kl-only: {method: semalgn}}",
         r"^methods\.kl-only\.method: 'semalgn' is not a registered method \(did you mean 'semalign'\?\)"),
        ("methods={laten-x: {method: laten, teacher: {seed: 1}}}",
         r"^methods\.laten-x\.teacher: only a teacher extra's own section holds teacher settings"),
    ],
)
def test_a_method_section_must_name_a_registered_method(override, message):
    with pytest.raises(ConfigError, match=message):
        checked(override)


def test_a_fixed_choice_setting_is_refused_when_the_config_loads_listing_its_choices():
    """Settings with a fixed set of values are typed `Literal[...]`: checked on loading (every method's
    section, before any model loads) and on construction, with the choices named."""
    from pkt_pipeline.methods import check_sections
    from pkt_pipeline.methods.laten.config import LatenExtractConfig
    from pkt_pipeline.methods.semalign.config import SemAlignConfig

    with pytest.raises(ConfigError, match=r"methods\.semalign\.recompose must be one of \['transpose', 'lstsq'\], "
                                          r"got 'pinv'"):
        check_sections(load_config(None, ["methods.semalign.recompose=pinv"]))
    with pytest.raises(ConfigError, match=r"methods\.laten\.teacher\.storage_dtype must be one of "
                                          r"\['float16', 'float32'\], got 'int8'"):
        check_sections(load_config(None, ["methods.laten.teacher.storage_dtype=int8"]))
    with pytest.raises(ConfigError, match=r"objective must be one of \['v2', 'v1'\], got 'v3'"):
        SemAlignConfig(objective="v3")
    assert SemAlignConfig(objective="v1").objective == "v1"
    assert LatenExtractConfig(readout_norm="own").readout_norm == "own"
