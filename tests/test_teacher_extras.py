"""`pkt extract --with NAME`: a registered teacher extra runs with the teacher loaded, its arrays
land in the cache with provenance in the manifest, and it can be added to a complete cache later."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pkt_pipeline.cache import CacheError, open_cache, verify_cache
from pkt_pipeline.config import ConfigError
from pkt_pipeline.models import load_model
from pkt_pipeline.methods import REGISTRY, ExtraOutput, TeacherExtra, register
from stages import extract as extract_stage
from tiny_data import extract_config


@dataclass
class WeightNormsSettings:
    rows: int = 5
    """Embedding rows to store."""


class WeightNorms(TeacherExtra):
    """A small real extra: the norm of every decoder layer's down projection, and a 2-D array."""

    name = "test-weight-norms"

    def compute(self, teacher, tokenizer, config, data_path, progress):
        norms = np.array([layer.mlp.down_proj.weight.norm().item() for layer in teacher.model.layers], np.float32)
        rows = teacher.model.embed_tokens.weight[: self.settings.rows].detach().numpy()
        return ExtraOutput({"down_norms": norms, "nested/embedding_rows": rows},
                           {"data": str(data_path), "layers": len(norms)})

    def inputs(self, config):
        return {"rows": self.settings.rows}


@pytest.fixture(autouse=True)
def registered():
    register(WeightNorms.name, teacher=WeightNorms, teacher_config=WeightNormsSettings)
    yield
    REGISTRY.pop(WeightNorms.name, None)


def expected(teacher_path) -> tuple[np.ndarray, np.ndarray]:
    model = load_model(teacher_path, dtype="float32")
    norms = np.array([layer.mlp.down_proj.weight.norm().item() for layer in model.model.layers], np.float32)
    return norms, model.model.embed_tokens.weight[:5].detach().numpy()


def test_extra_is_written_with_provenance(tiny_pair, tiny_dataset, tmp_path):
    out = tmp_path / "cache"
    config = extract_config(tiny_pair["teacher"], tiny_dataset, out, f"extract.extras=[{WeightNorms.name}]")
    extract_stage.run(config, progress=False, echo=lambda *_: None)
    cache = open_cache(out)
    arrays = cache.extra(WeightNorms.name)
    norms, rows = expected(tiny_pair["teacher"])
    np.testing.assert_allclose(arrays["down_norms"], norms, rtol=1e-6)
    np.testing.assert_array_equal(arrays["nested/embedding_rows"], rows)
    assert cache.manifest.extras[WeightNorms.name].provenance["layers"] == len(norms)
    assert verify_cache(out) == []


def test_extra_is_added_to_a_complete_cache_without_reextracting(tiny_pair, tiny_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    before = open_cache(out).manifest.checksums
    with pytest.raises(CacheError, match=f"pkt extract --with {WeightNorms.name}"):
        open_cache(out).extra(WeightNorms.name)

    config = extract_config(tiny_pair["teacher"], Path(open_cache(out).manifest.dataset.path), out,
                            "extract.capture=[hidden, delta]", f"extract.extras=[{WeightNorms.name}]")
    summary = extract_stage.run(config, progress=False, echo=lambda *_: None)
    assert summary["action"] == "extras added"
    after = open_cache(out).manifest
    assert {k: v for k, v in after.checksums.items() if not k.startswith("extras/")} == before
    assert after.attribution == open_cache(tiny_cache).manifest.attribution
    np.testing.assert_allclose(open_cache(out).extra(WeightNorms.name)["down_norms"], expected(tiny_pair["teacher"])[0],
                               rtol=1e-6)
    assert verify_cache(out) == []
    assert extract_stage.run(config, progress=False, echo=lambda *_: None)["action"] == "up to date"


def test_unknown_extra_is_refused_before_the_teacher_loads(tiny_pair, tiny_dataset, tmp_path):
    config = extract_config(tiny_pair["teacher"], tiny_dataset, tmp_path / "cache", "extract.extras=[no-such-extra]")
    with pytest.raises(ValueError, match="unknown teacher extra 'no-such-extra' for `pkt extract --with`"):
        extract_stage.run(config, progress=False, echo=lambda *_: None)
    assert not (tmp_path / "cache").exists()


def test_a_plugin_extra_reads_its_settings_from_its_methods_section(tiny_pair, tiny_dataset, tmp_path):
    """An extra registered with a `teacher_config` gets it from `methods.<name>.teacher`, validated like any
    section, and a changed setting recomputes it."""
    out = tmp_path / "cache"
    name = WeightNorms.name
    config = extract_config(tiny_pair["teacher"], tiny_dataset, out, f"extract.extras=[{name}]",
                            f"methods.{name}.teacher.rows=3")
    extract_stage.run(config, progress=False, echo=lambda *_: None)
    _, rows = expected(tiny_pair["teacher"])
    np.testing.assert_array_equal(open_cache(out).extra(name)["nested/embedding_rows"], rows[:3])
    assert open_cache(out).manifest.extras[name].inputs == {"rows": 3}
    with pytest.raises(ConfigError, match=rf"^unknown key 'methods\.{name}\.teacher\.row'; did you mean "
                                          rf"'methods\.{name}\.teacher\.rows'\?$"):
        extract_stage.run(extract_config(tiny_pair["teacher"], tiny_dataset, out, f"extract.extras=[{name}]",
                                         f"methods.{name}.teacher.row=3"), progress=False, echo=lambda *_: None)
    with pytest.raises(ConfigError, match=rf"^methods\.{name}: unknown key 'rows'; {name} is a teacher extra only, "
                                          rf"whose settings go under methods\.{name}\.teacher$"):
        extract_stage.run(extract_config(tiny_pair["teacher"], tiny_dataset, out, f"extract.extras=[{name}]",
                                         f"methods.{name}.rows=3"), progress=False, echo=lambda *_: None)
