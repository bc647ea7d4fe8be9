"""A method written in one folder (tests/toy_method) and installed as a plug-in trains through `pkt align`
with settings of its own from `methods.toy`, and no stage knows about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration  # each test runs several `pkt align` processes with the plug-in installed

TESTS = Path(__file__).parent
FAST = ["runtime.dtype=float32", "align.batch_size=4", "align.lr=5e-3", "align.loader.shuffle_buffer=8",
        "align.lora.r=4", "align.lora.alpha=8", "align.steps=3"]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding an installed distribution's metadata whose `pkt.methods` entry point is the toy method,
    as `pip install` of a package declaring `[project.entry-points."pkt.methods"] toy = "toy_method"` leaves it."""
    site = tmp_path_factory.mktemp("site")
    info = site / "pkt_toy_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pkt-toy-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pkt.methods]\ntoy = toy_method\n")
    return site


def pkt(plugin_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(TESTS), str(PROJECT_ROOT)])}
    return subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def align(plugin_path, tiny_pair, tiny_cache, out, method, *settings) -> subprocess.CompletedProcess:
    overrides = [x for setting in [*FAST, *settings] for x in ("--set", setting)]
    return pkt(plugin_path, "align", "--cache", str(tiny_cache), "--student", str(tiny_pair["student"]),
               "--method", method, "--out", str(out), "--no-progress", *overrides)


def test_a_plugin_method_in_one_folder_trains_with_its_own_settings(plugin_path, tiny_pair, tiny_cache, tmp_path):
    listed = pkt(plugin_path, "align", "--list-methods")
    assert listed.returncode == 0, listed.stderr
    assert "toy          The toy method: label-smoothed cross-entropy" in listed.stdout

    out = tmp_path / "toy"
    result = align(plugin_path, tiny_pair, tiny_cache, out, "toy", "methods.toy.label_smoothing=0.25")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["method"] == "toy"
    assert (out / "model" / "config.json").is_file() and (out / "adapter").is_dir()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    for entry in log:  # the setting reached the loss: F.cross_entropy's smoothing, checked against its definition
        assert entry["label_smoothing"] == 0.25
        assert entry["loss"] == pytest.approx(0.75 * entry["ce"] + 0.25 * entry["uniform"], rel=1e-5)
    assert json.loads((out / "run.json").read_text())["settings"] == {"label_smoothing": 0.25}
    # the settings are part of the run's identity, as the align budget is: another value is another run
    other = align(plugin_path, tiny_pair, tiny_cache, out, "toy", "methods.toy.label_smoothing=0.1")
    assert other.returncode == 1
    assert f"Error: {out} holds another run (it differs in settings); choose another --out" in other.stderr


def test_a_plugin_methods_settings_are_validated_and_its_variants_train(plugin_path, tiny_pair, tiny_cache, tmp_path):
    typo = align(plugin_path, tiny_pair, tiny_cache, tmp_path / "typo", "toy", "methods.toy.label_smothing=0.1")
    assert typo.returncode == 1
    assert ("Error: unknown key 'methods.toy.label_smothing'; did you mean 'methods.toy.label_smoothing'?"
            in typo.stderr), typo.stderr
    out_of_range = align(plugin_path, tiny_pair, tiny_cache, tmp_path / "range", "toy", "methods.toy.label_smoothing=1")
    assert "Error: methods.toy.label_smoothing must be in [0, 1), got 1.0" in out_of_range.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "range").exists()

    out = tmp_path / "variant"
    variant = align(plugin_path, tiny_pair, tiny_cache, out, "toy-half",
                    "methods={toy-half: {method: toy, label_smoothing: 0.5, align: {steps: 2}}}")
    assert variant.returncode == 0, variant.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["method"], metrics["variant"], metrics["steps"]) == ("toy", "toy-half", 2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["label_smoothing"] for entry in log] == [0.5, 0.5]
