"""The command line a newcomer meets: help texts and clean errors, through the real `pkt` entry point."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest


def pkt(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_top_level_help_lists_commands_and_a_first_experiment():
    result = pkt("--help")
    assert result.returncode == 0
    for word in ("assets", "config", "A typical experiment", "dvc repro"):
        assert word in result.stdout


@pytest.mark.parametrize("command", [["assets"], ["assets", "fetch"], ["assets", "list"], ["config"]])
def test_every_command_has_help(command):
    result = pkt(*command, "--help")
    assert result.returncode == 0
    assert "Usage: " in result.stdout and len(result.stdout.splitlines()) > 4


def test_assets_list_shows_the_pinned_pair():
    result = pkt("assets", "list")
    assert "qwen2.5-coder-1.5b-instruct" in result.stdout and "qwen2.5-coder-0.5b-instruct" in result.stdout


def test_config_errors_are_one_clear_line(tmp_path):
    result = pkt("config", "--set", "assets.nope=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: defaults: unknown key 'assets.nope'"


@pytest.mark.integration
def test_verbose_shows_the_traceback_of_an_error_and_the_default_stays_one_line(tmp_path):
    """`pkt -v` (global, before the command) prints the traceback behind a user-facing error, for a
    bug report; without it the error is the one line alone. Either way the exit status is 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  limit: -3\n")
    quiet = pkt("eval", "some-model", "--config", str(bad), cwd=tmp_path)
    loud = pkt("-v", "eval", "some-model", "--config", str(bad), cwd=tmp_path)
    message = f"Error: {bad}: eval.limit must be >= 0, got -3"
    assert quiet.returncode == loud.returncode == 1
    assert quiet.stderr.strip() == message
    assert loud.stderr.startswith("Traceback (most recent call last):") and loud.stderr.rstrip().endswith(message)
    assert "pkt_pipeline/config.py" in loud.stderr and "ConfigError: " in loud.stderr


def test_config_prints_the_resolved_values():
    result = pkt("config", "--set", "runtime.device=cpu")
    assert result.returncode == 0 and "device: cpu" in result.stdout


def test_config_checks_every_method_section(tmp_path):
    result = pkt("config", "--set", "methods={semalign: {lamda_layer: 0}}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: unknown key 'methods.semalign.lamda_layer'; "
                                     "did you mean 'methods.semalign.lambda_layer'?")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("align.max_grad_norm=-1", "Error: defaults: align.max_grad_norm must be > 0 (or .inf), got -1.0"),
        ("methods={kdd: {lr: 0.001}}", "Error: methods.kdd: 'kdd' is not a registered method (did you mean 'kd'?)"),
        ("methods={kd: {lr: 0.001}}", "Error: methods.kd.lr is a shared align key: write methods.kd.align.lr"),
        ("align.semalign.layers=[2]", "Error: defaults: align.semalign moved: write methods.semalign.<key>"),
    ],
)
def test_a_bad_number_or_method_section_exits_1_with_one_line(tmp_path, override, message):
    result = pkt("align", "--cache", str(tmp_path / "none"), "--set", override, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["assets", "extract", "align", "evaluate", "report"])
def test_every_stage_has_the_one_run_signature(name):
    """`cli.run_stage` calls each stage as `run(config, progress=..., echo=...)` (stages/__init__.py)."""
    parameters = inspect.signature(importlib.import_module(f"stages.{name}").run).parameters
    assert list(parameters) == ["config", "progress", "echo"]
    assert parameters["progress"].default is True and parameters["echo"].default is print
