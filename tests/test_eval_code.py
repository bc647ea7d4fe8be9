"""The code-execution sandbox and the HumanEval / MBPP program builders."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import require_dataset
from pkt_pipeline.evaluation.code_tasks import extract_code, load_humaneval, load_mbpp
from pkt_pipeline.evaluation.sandbox import _verdict, run_program, run_programs, sandbox_mode

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _data(name: str) -> Path:
    return require_dataset(name)


@pytest.fixture(scope="module")
def humaneval():
    path = _data("humaneval")
    with gzip.open(path, "rt") as f:
        canonical = {row["task_id"]: row["canonical_solution"] for row in map(json.loads, f)}
    return load_humaneval(path), canonical


@pytest.fixture(scope="module")
def mbpp():
    path = _data("mbpp")
    with open(path) as f:
        canonical = {f"MBPP/{row['task_id']}": row["code"] for row in map(json.loads, f)}
    return path, canonical


# --- sandbox -------------------------------------------------------------------------------


@pytest.mark.usefixtures("code_sandbox")
def test_passing_and_failing_programs():
    assert run_program("assert sum(range(4)) == 6\nprint('ok')").status == "passed"
    wrong = run_program("def f(x):\n    return x + 1\nassert f(1) == 3, 'f(1) is wrong'")
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert wrong.detail == "AssertionError: f(1) is wrong"


@pytest.mark.usefixtures("code_sandbox")
def test_exiting_before_the_tests_is_not_a_pass():
    for early_exit in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):
        verdict = run_program(early_exit + "\nassert False")
        assert verdict.status == "failed" and "exited before" in verdict.detail


@pytest.mark.usefixtures("code_sandbox")
def test_infinite_loop_times_out_on_the_wall_clock():
    start = time.monotonic()
    verdict = run_program("while True:\n    pass", timeout_s=1.0)
    assert verdict.status == "timeout"
    assert time.monotonic() - start < 3.0


@pytest.mark.usefixtures("code_sandbox")
def test_memory_bomb_is_stopped():
    verdict = run_program("block = bytearray(10 * 1024**3)\nassert len(block) > 0", memory_mb=512)
    assert verdict.status == "memory" and "MemoryError" in verdict.detail
    assert run_program("assert bytearray(100 * 1024**2)[-1] == 0", memory_mb=512).passed


@pytest.mark.usefixtures("code_sandbox")
def test_sockets_cannot_be_created():
    for program in (
        "import socket\nsocket.socket()",
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)",
        "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=3)",
    ):
        verdict = run_program(program)
        assert verdict.status == "failed", program


@pytest.mark.usefixtures("code_sandbox")
def test_network_namespace_has_no_route():
    """Going around the socket guard (the C socket type) still cannot reach the network."""
    if sandbox_mode() == "weak":
        pytest.skip("unshare cannot create a network namespace on this machine")
    bypass = "import socket\ns = socket.socket.__mro__[2]()\ns.settimeout(3)\ns.connect(('1.1.1.1', 80))"
    verdict = run_program(bypass)
    assert verdict.status == "failed" and "unreachable" in verdict.detail


@pytest.mark.usefixtures("code_sandbox")
def test_process_creation_is_refused(tmp_path):
    marker = tmp_path / "ran"
    for program in (
        f"import os\nos.system('touch {marker}')",
        f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
        "import os\nwhile True:\n    os.fork()",
        "import multiprocessing as mp\nmp.Process(target=print).start()",
        "import multiprocessing as mp\nmp.set_start_method('spawn')\nmp.Process(target=print).start()",
        "import ctypes",
    ):
        start = time.monotonic()
        verdict = run_program(program, timeout_s=5)
        assert verdict.status == "failed", program
        assert time.monotonic() - start < 3, program
    assert not marker.exists()


@pytest.mark.usefixtures("code_sandbox")
def test_runner_and_files_outside_are_unharmed(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    pyproject = PROJECT_ROOT / "pyproject.toml"
    digest = hashlib.sha256(pyproject.read_bytes()).hexdigest()
    cwd = os.getcwd()
    for program in (
        f"open({str(sentinel)!r}, 'w').write('gone')",
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('gone')",
        f"import os\nos.remove({str(sentinel)!r})",
        f"import os\nfd = os.open({str(sentinel)!r}, os.O_WRONLY | os.O_TRUNC)",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"open({str(tmp_path / 'new.txt')!r}, 'x')",
        "import os\nos.kill(os.getppid(), 9)",
    ):
        assert run_program(program).status == "failed", program
    assert sentinel.read_text() == "keep me" and not (tmp_path / "new.txt").exists()
    assert hashlib.sha256(pyproject.read_bytes()).hexdigest() == digest
    assert os.getcwd() == cwd


@pytest.mark.usefixtures("code_sandbox")
def test_work_directory_is_private_writable_and_removed():
    verdict = run_program(
        "import os\nopen('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
        "assert sorted(os.listdir('.')) == ['program.py', 'scratch.txt'], os.listdir('.')\n"
        "assert 'PYTHONPATH' not in os.environ and 'HTTPS_PROXY' not in os.environ\n"
        "raise SystemError(os.getcwd())"
    )
    assert verdict.status == "failed" and verdict.detail.startswith("SystemError: ")
    workdir = Path(verdict.detail.removeprefix("SystemError: "))
    assert workdir.name.startswith("pkt-sandbox-") and not workdir.exists()


@pytest.mark.usefixtures("code_sandbox")
def test_output_is_bounded_and_detail_capped():
    verdict = run_program("print('x' * 50_000_000)\nraise ValueError('y' * 2_000)")
    assert verdict.status == "failed" and verdict.detail.startswith("ValueError: yyy")
    assert len(verdict.detail) <= 300


@pytest.mark.usefixtures("code_sandbox")
def test_verdict_mapping_of_exit_statuses():
    assert _verdict(0, False, True, "", 10).status == "passed"
    assert _verdict(0, False, False, "", 10).status == "failed"
    assert _verdict(1, False, False, "Traceback\nNameError: x", 10) == _verdict(1, False, False, "NameError: x\n\n", 10)
    assert _verdict(-signal.SIGKILL, True, False, "", 10).status == "timeout"
    assert _verdict(-signal.SIGXCPU, False, False, "", 10).status == "timeout"
    assert _verdict(1, False, False, "MemoryError", 10).status == "memory"
    crashed = _verdict(-signal.SIGSEGV, False, False, "", 10)
    assert crashed.status == "error" and "SIGSEGV" in crashed.detail
    assert _verdict(128 + signal.SIGSEGV, False, False, "", 10).status == "error"


@pytest.mark.usefixtures("code_sandbox")
def test_run_programs_keeps_input_order():
    sources = [f"assert {i} % 2 == 0" for i in range(6)]
    verdicts = run_programs(sources, workers=2, progress=False)
    assert [v.passed for v in verdicts] == [i % 2 == 0 for i in range(6)]


# --- problems and programs -------------------------------------------------------------------


@pytest.mark.usefixtures("code_sandbox")
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    problems, canonical = humaneval
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    chosen = problems[:3] + [problems[10], problems[38]]  # 10 and 38 call helpers from their prompts
    programs = [p.test_program(canonical[p.task_id]) for p in chosen]
    assert all(v.passed for v in run_programs(programs, progress=False))
    wrong = run_program(problems[0].test_program("    return False\n"))
    assert wrong.status == "failed"


@pytest.mark.usefixtures("code_sandbox")
def test_humaneval_whole_function_answers(humaneval):
    problems, canonical = humaneval
    problem = problems[10]  # make_palindrome calls the is_palindrome helper defined in the prompt
    body = canonical[problem.task_id]
    signature = next(line for line in problem.prompt_text.splitlines() if line.startswith("def make_palindrome"))
    answer = f"Here is the function:\n\n```python\n{signature}\n{body}```\nIt appends the reversed prefix."
    program = problem.test_program(extract_code(answer, problem.prompt_text))
    assert program.count("def make_palindrome") == 1 and "def is_palindrome" in program
    assert run_program(program).passed
    echoed = extract_code(problem.prompt_text + body, problem.prompt_text)
    assert echoed == body and run_program(problem.test_program(echoed)).passed


@pytest.mark.usefixtures("code_sandbox")
def test_mbpp_canonical_solutions_pass(mbpp):
    path, canonical = mbpp
    problems = load_mbpp(path)
    assert len(problems) == 500 and (problems[0].task_id, problems[-1].task_id) == ("MBPP/11", "MBPP/510")
    chosen = load_mbpp(path, [11, 12, 13, 14, 367])  # 367 has test_setup_code that uses the solution's class
    assert [p.entry_point for p in chosen] == ["remove_Occ", "sort_matrix", "count_common", "find_Volume", "is_tree_balanced"]
    assert chosen[0].prompt_text == (
        '"""\nWrite a python function to remove first and last occurrence of a given character from the string.\n'
        'assert remove_Occ("hello","l") == "heo"\n"""\n'
    )
    verdicts = run_programs([p.test_program(canonical[p.task_id]) for p in chosen], progress=False)
    assert all(v.passed for v in verdicts), verdicts
    assert run_program(chosen[0].test_program("def remove_Occ(s, ch):\n    return s")).status == "failed"


def test_extract_code_variants():
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("Sure!\n```python\nx = 1\n```\nand\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # cut off before the closing fence
    assert extract_code("    return a + b\n", prompt="def add(a, b):\n") == "    return a + b\n"


def test_missing_data_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "HumanEval.jsonl.gz")):
        load_humaneval(tmp_path / "HumanEval.jsonl.gz")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mbpp.jsonl")):
        load_mbpp(tmp_path / "mbpp.jsonl")


def test_mbpp_missing_task_ids_are_named(mbpp):
    path, _ = mbpp
    with pytest.raises(ValueError, match=r"\[975, 976\]"):
        load_mbpp(path, [11, 975, 976])


def test_a_benchmark_row_missing_a_field_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    row = {"task_id": 11, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""}
    path.write_text(json.dumps(row) + "\n\n" + json.dumps({k: v for k, v in row.items() if k != "test_setup_code"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3: this MBPP row lacks test_setup_code \(every row needs"):
        load_mbpp(path, [11])
