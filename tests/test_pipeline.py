"""The DVC pipeline end to end on the tiny pair, in a scratch git repository (a real `dvc repro`).

Checks what users rely on: the whole pipeline runs and ends in a report; a second `dvc repro` does
nothing; changing one method's parameter reruns only that method's align and evaluate stages and
the report; a cache pushed to a DVC remote from one clone is pulled into another and verifies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_dataset

pytestmark = pytest.mark.integration  # a whole `dvc repro` of the tiny pipeline, three rounds

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sh(*args: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict]:
    shared = require_dataset("transfer-splits").parent  # the tiny pipeline needs the MMLU transfer split ...
    require_dataset("mmlu")  # ... and test set
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    # The default pipeline only: experiments/ holds other pipelines, whose locked outputs are not here to push.
    files = [name for name in tracked.stdout.splitlines() if not name.startswith("experiments/")]
    for name in [*files, "dvc.yaml", "configs/tiny.yaml", ".dvc/config", ".dvcignore"]:
        source = PROJECT_ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    shutil.copy2(repo / "configs" / "tiny.yaml", repo / "configs" / "default.yaml")
    env = {**os.environ, "PKT_SHARED_DATA": str(shared), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "pkt test", "GIT_AUTHOR_EMAIL": "test@pkt.invalid",
           "GIT_COMMITTER_NAME": "pkt test", "GIT_COMMITTER_EMAIL": "test@pkt.invalid"}
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "scratch copy", cwd=repo, env=env)
    return repo, env


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_tiny_pipeline_runs_reruns_only_what_changed_and_shares_the_cache(scratch, tmp_path):
    repo, env = scratch
    first = sh("dvc", "repro", cwd=repo, env=env)
    methods = ("semalign", "kd", "lora-sft", "seeking", "laten")
    assert set(ran_stages(first)) == {"assets", "extract", "evaluate@teacher", "evaluate@student", "report",
                                      *(f"align@{m}" for m in methods), *(f"evaluate@{m}" for m in methods)}
    table = (repo / "report" / "report.md").read_text()
    for row in ("| teacher |", "| student |", *(f"| {m} |" for m in methods), *(f"| align {m} |" for m in methods)):
        assert row in table
    assert (repo / "report" / "scores.png").read_bytes().startswith(b"\x89PNG")

    assert ran_stages(sh("dvc", "repro", cwd=repo, env=env)) == []

    config = repo / "configs" / "default.yaml"
    config.write_text(config.read_text().replace("  kd: {}", "  kd: {ce_weight: 0.5, align: {lr: 1.0e-2}}"))
    assert ran_stages(sh("dvc", "repro", cwd=repo, env=env)) == ["align@kd", "evaluate@kd", "report"]

    sh("dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=repo, env=env)
    sh("dvc", "push", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "run", cwd=repo, env=env)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    sh("dvc", "pull", "cache/default", cwd=clone, env=env)
    assert "cache/default: ok" in sh(sys.executable, "-m", "pkt_pipeline.cli", "cache", "verify", "cache/default",
                                      cwd=clone, env=env)
