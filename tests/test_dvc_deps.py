"""Every DVC stage depends on exactly the code it runs: its declared code deps match the import
closure of the stage module its command calls.

A dependency missing from dvc.yaml means `dvc repro` keeps a stale output after that code changed;
an extra one reruns hours of work for a change that cannot touch the output. The closure is read
from the source (every `import`, also those inside functions; not those under `if TYPE_CHECKING:`,
which never run), so it follows the code without a list to keep in step by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from import_graph import import_targets

PIPELINES = ["dvc.yaml", "experiments/transfer/dvc.yaml", "experiments/transfer-xtok/dvc.yaml",
             "experiments/tuning/dvc.yaml"]
STAGE_MODULES = {"extract": "stages.extract", "align": "stages.align", "eval": "stages.evaluate",
                 "report": "stages.report", "assets": "stages.assets"}
CODE_ROOTS = ("pkt_pipeline", "stages")
# Parsing only: the CLI turns flags into config overrides (the params DVC tracks) and calls the stage;
# the package __init__ holds the version. A change there cannot change an output.
NOT_DEPS = {"pkt_pipeline/cli.py", "pkt_pipeline/__init__.py", "stages/__init__.py"}
# Imports that can refuse a run but never change its output, as (file, module) edges to leave out of the
# closure. None today: config.py no longer imports the method registry (the stages that need it do).
NOT_DEP_EDGES: set[tuple[str, str]] = set()


def module_file(module: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The project modules `path` imports, absolute names (`from pkg import module` counts the module too)."""
    package = ".".join(path.relative_to(PROJECT_ROOT).parent.parts)
    names = {name for base, item in import_targets(path, package) for name in (base, f"{base}.{item}" if item else base)}
    return {name for name in names if name.split(".")[0] in CODE_ROOTS}


def import_closure(module: str) -> set[str]:
    """Repository-relative files of `module` and everything it imports from the project, transitively
    (a submodule's import also runs its packages' __init__)."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                source = path.relative_to(PROJECT_ROOT).as_posix()
                pending.extend(imported for imported in imported_modules(path)
                               if not any(source == edge_from and (imported == edge_to or imported.startswith(edge_to + "."))
                                          for edge_from, edge_to in NOT_DEP_EDGES))
    return {path.relative_to(PROJECT_ROOT).as_posix() for path in seen} - NOT_DEPS


def resolved_stages() -> list[tuple[str, str, list[str]]]:
    """(stage name, cmd, code deps) of every stage of every pipeline, as DVC itself resolves them."""
    from dvc.repo import Repo

    stages = []
    with Repo(str(PROJECT_ROOT)) as repo:
        for pipeline in PIPELINES:
            for stage in repo.stage.collect(str(PROJECT_ROOT / pipeline)):
                deps = [Path(dep.def_path) for dep in stage.deps if not dep.def_path.endswith((".yaml", ".json"))]
                base = Path(stage.wdir).resolve()
                code = [(base / dep).resolve().relative_to(PROJECT_ROOT).as_posix() for dep in deps]
                stages.append((f"{pipeline}:{stage.addressing.split(':')[-1]}", stage.cmd,
                               [dep for dep in code if dep.split("/")[0] in CODE_ROOTS]))
    return stages


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


STAGES = resolved_stages()


@pytest.mark.parametrize("name, cmd, deps", STAGES, ids=[name for name, _, _ in STAGES])
def test_code_deps_are_the_import_closure_of_the_stage(name, cmd, deps):
    words = cmd.split()
    assert words[0] == "pkt" and words[1] in STAGE_MODULES, f"{name}: a stage runs one `pkt` command, got {cmd!r}"
    closure = import_closure(STAGE_MODULES[words[1]])
    undeclared = sorted(file for file in closure if not covered(file, deps))
    unused = sorted(dep for dep in deps if not any(covered(file, [dep]) for file in closure))
    assert not undeclared, f"{name} runs code it does not depend on: add {undeclared} to its deps"
    assert not unused, f"{name} depends on code it never imports: drop {unused} from its deps"


def test_the_closure_follows_imports_inside_functions():
    """`stages/align.py` imports peft's LoRA wrapper lazily; the evaluation sandbox is imported by
    `stages/evaluate.py` inside a function only: both must count."""
    assert "pkt_pipeline/evaluation/sandbox.py" in import_closure("stages.evaluate")
    assert "pkt_pipeline/training.py" in import_closure("stages.align")
    assert "stages/align.py" not in import_closure("stages.evaluate")


@pytest.mark.parametrize("config", ["configs/default.yaml", "configs/tiny.yaml"])
def test_every_param_the_default_pipeline_tracks_is_written_in_its_configs(config):
    """DVC refuses a stage whose params key is missing from the file. The extract stage tracks the teacher
    extras' own sections (`methods.<extra>.teacher`), which every default config therefore writes out (the
    tiny pipeline runs from configs/tiny.yaml copied over configs/default.yaml)."""
    import yaml

    raw = yaml.safe_load((PROJECT_ROOT / config).read_text())
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    (tracked,) = [entry["configs/default.yaml"] for entry in stages["extract"]["params"]]
    assert {"methods.seeking.teacher", "methods.laten.teacher"} <= set(tracked)
    for key in tracked:
        node = raw
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{config} lacks {key}, which dvc.yaml's extract tracks"
            node = node[part]


def tracked_keys(config: dict, key: str) -> None:
    node = config
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"lacks {key}"
        node = node[part]


def xtok_stages() -> dict:
    import yaml

    return yaml.safe_load((PROJECT_ROOT / "experiments/transfer-xtok/dvc.yaml").read_text())


@pytest.mark.parametrize("bench", xtok_stages()["vars"][2]["teacher_evals"])
def test_the_cross_tokenizer_bench_reuses_a_teacher_evaluation_of_the_same_model_and_items(bench):
    """The cross-tokenizer report reads a same-tokenizer bench's teacher evaluation instead of running its own: that
    is right only for the same teacher and the same `eval` section (which items, how scored), which DVC cannot see
    across the two files. The pair is the one the pipeline's `vars` name, and every param a stage tracks is written."""
    import yaml

    pipeline = xtok_stages()
    reference = pipeline["vars"][2]["teacher_evals"][bench]["teacher_bench"]
    ours = yaml.safe_load((PROJECT_ROOT / f"configs/transfer/{bench}.yaml").read_text())
    theirs = yaml.safe_load((PROJECT_ROOT / f"configs/transfer/{reference}.yaml").read_text())
    default = yaml.safe_load((PROJECT_ROOT / "configs/default.yaml").read_text())
    assert ours["eval"] == theirs["eval"], f"{bench}'s eval section must be {reference}'s, whose teacher scores it reads"
    assert ours["teacher"] == theirs["teacher"] == default["teacher"], "the reused evaluation is of another teacher"
    pair = yaml.safe_load((PROJECT_ROOT / "configs/transfer/mmlu-xtok.yaml").read_text())
    assert ours["student"] == pair["student"] != theirs["student"], "the pipeline's vars name another student"
    assert set(ours["methods"]) == set(pipeline["vars"][3]["methods"])
    for name, stage in pipeline["stages"].items():
        for entry in stage.get("params", []):
            for key in next(iter(entry.values())):
                for method in pipeline["vars"][3]["methods"]:
                    tracked_keys(ours, key.replace("${item.method}", method))
    assert f"experiments/transfer/{reference}/eval/teacher" in [
        dep.replace("${item.teacher_bench}", reference) for dep in pipeline["stages"]["report"]["do"]["deps"]]


def test_the_cross_tokenizer_control_is_lora_sft_on_the_students_own_tokens():
    """lora-sft trains on the cached token ids, which are not the student's here; its section in the cross-tokenizer
    configs is ULD with the distillation term off, i.e. LoRA + cross-entropy on the student's tokens of the same texts."""
    import yaml

    for bench in xtok_stages()["vars"][2]["teacher_evals"]:
        config = yaml.safe_load((PROJECT_ROOT / f"configs/transfer/{bench}.yaml").read_text())
        assert config["methods"]["lora-sft"] == {"method": "uld", "distill_weight": 0.0}
