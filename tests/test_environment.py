"""The environment pkt installs (a CPU torch never drags CUDA packages along), and the rule that keeps
tests from silently never running: in CI (`CI=true`) a test whose data is missing fails."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT


def test_cpu_torch_comes_without_cuda_packages():
    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, which legitimately brings "
                    "nvidia-* packages")
    nvidia = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
    assert nvidia == [], f"CPU torch {torch.__version__} but CUDA packages installed: {nvidia}"


def test_constraints_pin_torch_without_a_local_label():
    lines = (PROJECT_ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
    assert not [line for line in lines if line.lower().startswith("nvidia")]


def pytest_run(*args: str, ci: bool, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """pytest in a child, with CI=true or without CI, importing this suite's conftest."""
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "true"
    paths = [str(p) for p in (extra_path, PROJECT_ROOT / "tests", PROJECT_ROOT) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_a_test_whose_shared_data_is_missing_fails_in_ci_and_skips_visibly_elsewhere(tmp_path):
    missing = tmp_path / "shared" / "data" / "gsm8k" / "test.jsonl"
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"from pathlib import Path\n\nfrom conftest import require_file\n\n\n"
                     f"def test_reads_the_data():\n    require_file(Path({str(missing)!r}))\n")
    failed = pytest_run(str(probe), "--rootdir", str(tmp_path), ci=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 failed" in failed.stdout
    assert (f"{missing} is absent (CI=true: a test that needs ../shared data fails there instead of "
            "skipping, so it cannot silently never run)") in failed.stdout
    skipped = pytest_run(str(probe), "--rootdir", str(tmp_path), ci=False)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout and f"{missing} is absent" in skipped.stdout


def test_ci_runs_the_suite_with_ci_true():
    """CI runs the README's `make test` first, then the integration tests it leaves out, the second even
    when the first failed, and fails if either did."""
    script = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    assert "export CI=true" in script
    assert (script.index("export CI=true") < script.index("make test || status=$?")
            < script.index("make test-integration || status=$?") < script.index("exit $status"))


def make(target: str, *pytest_args: str) -> subprocess.CompletedProcess:
    """A Makefile target run for real, with this interpreter standing in for `.venv` (`-o` keeps make
    from building it) and the pytest arguments passed on through PYTEST_ADDOPTS."""
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PYTEST_ADDOPTS"] = " ".join(["-p", "no:cacheprovider", *pytest_args])
    return subprocess.run(["make", "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}", target],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_make_test_leaves_the_integration_tests_to_make_test_integration():
    here = "tests/test_environment.py::"
    marked = here + test_a_test_whose_shared_data_is_missing_fails_in_ci_and_skips_visibly_elsewhere.__name__
    plain = here + test_ci_runs_the_suite_with_ci_true.__name__
    default = make("test", "--collect-only", "-q", "tests/test_environment.py")
    integration = make("test-integration", "--collect-only", "-q", "tests/test_environment.py")
    assert default.returncode == 0 and integration.returncode == 0, default.stderr + integration.stderr
    assert plain in default.stdout and marked not in default.stdout
    assert marked in integration.stdout and plain not in integration.stdout


def test_make_test_fails_when_it_selects_no_test():
    """A file of integration tests alone leaves `make test` nothing to run: pytest's exit 5 is a failure."""
    result = make("test", "--collect-only", "-q", "tests/test_pipeline.py")
    assert result.returncode != 0
    assert "make test: pytest collected no tests, which counts as a failure" in result.stderr


def test_the_cpu_check_skips_visibly_on_a_cuda_build(tmp_path):
    """On a CUDA build the check does not apply: it says so as a skip, not as a silent pass. (The build is
    stood in for by its version attribute, since this machine has the CPU one.)"""
    (tmp_path / "cuda_build.py").write_text('import torch\n\ntorch.version.cuda = "12.8"\n')
    result = pytest_run(f"{Path(__file__)}::test_cpu_torch_comes_without_cuda_packages", "-p", "cuda_build",
                        ci=False, extra_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "is a CUDA 12.8 build, which legitimately brings nvidia-* packages" in result.stdout
