"""The evaluation task registry: pkt's own tasks score exactly as before it, and a task added from
outside (a plug-in through the `pkt.tasks` entry-point group) is scored by `pkt eval` unchanged."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import PROJECT_ROOT
from eval_pin import EXPECTED, TASKS, pin_data_dir, run_cli_eval
from pkt_pipeline.evaluation.tasks import TASKS as REGISTRY
from pkt_pipeline.evaluation.tasks import Task, available_tasks, get_task, register


def assert_same(actual, expected, where: str = "") -> None:
    """Equal structure, strings and counts; floats to 1e-6 relative. Recorded on one machine, the
    numbers may differ in the last digits on another CPU's float kernels, never by more."""
    if isinstance(expected, float) and isinstance(actual, float):
        assert math.isclose(actual, expected, rel_tol=1e-6), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: keys {actual.keys()} != {expected.keys()}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual} != {expected}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"


def test_pkt_own_tasks_are_registered_in_report_order():
    assert available_tasks()[:5] == TASKS
    assert get_task("humaneval").runs_code and not get_task("dev").test_set
    with pytest.raises(ValueError, match="unknown evaluation task 'triviaqa'; registered tasks: mmlu, gsm8k"):
        get_task("triviaqa")


@pytest.mark.usefixtures("code_sandbox")
def test_every_task_scores_as_before_the_registry(tiny_pair, tmp_path):
    """`pkt eval` of the tiny student on the pinned set: metrics.json and every item record as
    recorded from the code before the registry (eba3d12; `python tests/eval_pin.py` re-records), plus the
    `continuous` list each task's metrics gained since (which values the report pairs)."""
    result = run_cli_eval(tiny_pair["student"], pin_data_dir(tmp_path / "data"), tmp_path / "eval", PROJECT_ROOT)
    expected = json.loads(EXPECTED.read_text())
    assert_same(result["metrics"], expected["metrics"], "metrics")
    for task in TASKS:
        assert_same(result["items"][task], expected["items"][task], f"items/{task}")


TOY_PLUGIN = '''
"""A toy evaluation task: does the model prefer the true word after each phrase?"""

from pkt_pipeline.evaluation.tasks import Task, register


class Phrase:
    def __init__(self, id, context, true, false):
        self.id, self.context, self.true, self.false = id, context, true, false


@register
class Toy(Task):
    name = "toy"
    continuous = ("margin",)

    def load(self, data_dir, cfg):
        return [Phrase("p0", "one two", " three", " seven"), Phrase("p1", "def add(a, b):", " return", " while"),
                Phrase("p2", "the answer is", " 4", " x")]

    def item_text(self, item):
        return item.context

    def score(self, model, tokenizer, items, cfg, progress, journal):
        from pkt_pipeline.evaluation.reference_nll import reference_nll

        def chunk_records(chunk):
            true = reference_nll(model, tokenizer, [i.context for i in chunk], [i.true for i in chunk], 4, False, "toy")
            false = reference_nll(model, tokenizer, [i.context for i in chunk], [i.false for i in chunk], 4, False, "toy")
            return [{"id": i.id, "prompt": i.context, "margin": f["nll"] - t["nll"], "correct": t["nll"] < f["nll"]}
                    for i, t, f in zip(chunk, true, false)]

        return journal.score("toy", items, self.item_id, chunk_records)
'''


def test_a_plugin_task_is_scored_by_pkt_eval_without_touching_the_stage(tiny_pair, tmp_path):
    """A package that declares a `pkt.tasks` entry point (here a dist-info folder on the path, as pip
    installs one) adds a task; `pkt eval --tasks mmlu,toy` scores it next to MMLU, its records and metrics
    (accuracy and its own continuous value) written as for pkt's own."""
    plugin = tmp_path / "plugin"
    (plugin / "toy_pkt_task").mkdir(parents=True)
    (plugin / "toy_pkt_task" / "__init__.py").write_text(textwrap.dedent(TOY_PLUGIN))
    info = plugin / "toy_pkt_task-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-pkt-task\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pkt.tasks]\ntoy = toy_pkt_task\n")
    data = pin_data_dir(tmp_path / "data")
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(plugin)])}
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "eval", str(tiny_pair["student"]),
                             "--tasks", "mmlu,toy", "--out", str(out), "--limit", "2", "--no-progress",
                             "--set", f"assets.data_dir={data}", "--set", "runtime.dtype=float32"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "items" / "toy.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", "p2"] and metrics["toy"]["n"] == 3
    assert metrics["toy"]["score"] == sum(r["correct"] for r in records) / 3
    assert metrics["toy"]["margin"] == pytest.approx(sum(r["margin"] for r in records) / 3)
    assert metrics["toy"]["margin_n"] == 3 and metrics["toy"]["dropped"] == 0
    assert metrics["mmlu"]["n"] == 2 and metrics["mmlu"]["dropped"] == 1
    assert "toy " in result.stdout and "margin" in result.stdout

    # `pkt report` lists the plug-in task beside MMLU, with its own continuous value paired item by item.
    for name in ("student", "kd"):
        shutil.copytree(out, tmp_path / "evals" / name)
    report = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "report", "--eval-dir", str(tmp_path / "evals"),
                             "--out", str(tmp_path / "report")], capture_output=True, text=True, env=env, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["tasks"] == ["mmlu", "toy"]
    kd = next(row for row in written["rows"] if row["name"] == "kd")
    assert kd["scores"]["toy"]["margin"]["delta"] == 0.0 and kd["scores"]["toy"]["margin"]["n"] == 3
    assert "### toy" in (tmp_path / "report" / "report.md").read_text()


def test_eval_refuses_an_unknown_task_naming_the_registered_ones(tiny_pair):
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "eval", str(tiny_pair["student"]),
                             "--tasks", "mmlu,triviaqa"], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "eval.tasks must be a non-empty subset of ('mmlu', 'gsm8k', 'humaneval', 'mbpp', 'dev')" in result.stderr
    assert "unknown: ['triviaqa']" in result.stderr


def test_eval_without_a_model_says_which_key_names_it(tmp_path):
    from pkt_pipeline.config import ConfigError, load_config
    from stages import evaluate

    with pytest.raises(ConfigError, match=r"eval.model is empty: name the model to score \(pkt eval MODEL\)"):
        evaluate.run(load_config(overrides=[f"eval.out={tmp_path}"]), progress=False)


def test_a_task_registered_twice_under_one_name_is_refused():
    class Other(Task):
        name = "mmlu"

    with pytest.raises(ValueError, match="task 'mmlu' is already registered by pkt_pipeline.evaluation.tasks"):
        register(Other)
    assert REGISTRY["mmlu"] is not Other


EVALUATION_MODULES = ["pkt_pipeline.evaluation." + name for name in (
    "batching", "code_tasks", "decontamination", "dev", "generation", "gsm8k", "journal", "mmlu", "reference_nll",
    "sandbox", "stats", "tasks")] + ["stages.evaluate", "stages.report", "stages.assets"]


def test_public_signatures_annotate_model_tokenizer_and_echo():
    """A reader (and a type checker) sees what `model`, `tokenizer` and `echo` are: a transformers
    model and tokenizer, a `str -> None` callable."""
    import importlib
    import inspect

    expected = {"model": "PreTrainedModel", "tokenizer": "PreTrainedTokenizerBase", "echo": "Callable[[str], None]"}
    missing = []
    for name in EVALUATION_MODULES:
        module = importlib.import_module(name)
        functions = [(f"{name}.{key}", value) for key, value in vars(module).items()
                     if inspect.isfunction(value) and value.__module__ == name and not key.startswith("_")]
        functions += [(f"{name}.{cls.__name__}.{key}", value) for cls in vars(module).values()
                      if inspect.isclass(cls) and cls.__module__ == name and not cls.__name__.startswith("_")
                      for key, value in vars(cls).items() if inspect.isfunction(value) and not key.startswith("_")]
        for where, function in functions:
            for parameter in inspect.signature(function).parameters.values():
                annotation = parameter.annotation
                if parameter.name in expected and annotation is inspect.Parameter.empty:
                    missing.append(f"{where}({parameter.name})")
                elif parameter.name in expected and name != "pkt_pipeline.evaluation.stats":  # stats' `model` is a run's values
                    assert annotation == expected[parameter.name], f"{where}({parameter.name}: {annotation})"
    assert not missing, f"unannotated: {missing}"
