"""The sandbox as a boundary: each program below is an escape that once worked against the
Python-level guard. A program *passes* only when its escape succeeded, so every one must fail,
and the secret or marker it goes after must not show up outside."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pkt_pipeline.evaluation import sandbox
from pkt_pipeline.evaluation.sandbox import DISK_QUOTA, PROCESS_LIMIT, SANDBOX_UID, run_program

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Undoes the guard the way the found escapes did: a builtin module imported afresh comes back
# with its original functions.
REIMPORT = (
    "import sys\n"
    "for _m in ('os', 'posix', 'subprocess', '_posixsubprocess', 'socket', '_socket'):\n"
    "    sys.modules.pop(_m, None)\n"
    "import os, posix, subprocess, socket, _socket\n"
)


@pytest.fixture(autouse=True)
def strict_sandbox(monkeypatch, request):
    monkeypatch.delenv("PKT_SANDBOX_WEAK", raising=False)
    if request.node.name.startswith("test_missing_namespaces"):
        return  # runs anywhere: it takes `unshare` away itself
    if request.getfixturevalue("code_sandbox") == "weak":
        pytest.fail("the sandbox fell back to its weak mode on this machine")


def _escape_failed(program: str, *, timeout_s: float = 10.0) -> str:
    verdict = run_program(program, timeout_s=timeout_s)
    assert not verdict.passed, f"the escape worked:\n{program}"
    return verdict.detail


def test_parent_environment_is_not_readable(monkeypatch):
    secret = "pkt-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("PKT_SANDBOX_TEST_SECRET", secret)
    wanted = "b'PKT_SANDBOX_TEST_SECRET='"
    for source in (
        "data = open(f'/proc/{os.getppid()}/environ', 'rb').read()",
        "data = open('/proc/1/environ', 'rb').read()",
        f"data = open('/proc/{os.getpid()}/environ', 'rb').read()",  # this test's own process
        "import glob\ndata = b''\nfor p in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n        data += open(p, 'rb').read()\n    except OSError:\n        pass",
        "data = repr(os.environ).encode().replace(b\"': '\", b'=')",
    ):
        detail = _escape_failed(f"{REIMPORT}{source}\nassert {wanted} in data, 'no secret here'")
        assert secret not in detail
        assert any(s in detail for s in ("no secret here", "No such file", "Permission denied")), detail


def test_writes_outside_the_work_folder_fail():
    # In world-writable folders, so that only the read-only mount can be what refuses.
    tag = os.urandom(6).hex()
    markers = [Path(f"/tmp/pkt-sandbox-{tag}-{name}") for name in ("io_open", "fileio", "posix_open")]
    markers.append(Path(f"/dev/shm/pkt-sandbox-{tag}"))
    try:
        for source in (
            f"import _io\n_io.open({str(markers[0])!r}, 'w').write('x')",
            f"import io\nio.FileIO({str(markers[1])!r}, 'w').write(b'x')",
            f"{REIMPORT}fd = posix.open({str(markers[2])!r}, posix.O_CREAT | posix.O_WRONLY)",
            f"import _io\n_io.FileIO({str(markers[3])!r}, 'w').write(b'x')",
        ):
            detail = _escape_failed(source)
            assert "Read-only file system" in detail, detail
        assert not any(marker.exists() for marker in markers)
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)


def test_restored_process_creation_cannot_act_outside(tmp_path):
    marker = tmp_path / "ran"
    for source in (
        f"{REIMPORT}assert posix.system('touch {marker}') == 0",
        f"{REIMPORT}assert subprocess.run(['touch', {str(marker)!r}]).returncode == 0",
        f"{REIMPORT}pid = posix.fork()\n"
        f"if pid == 0:\n    posix.close(posix.open({str(marker)!r}, posix.O_CREAT | posix.O_WRONLY))\n    posix._exit(0)\n"
        "assert posix.waitpid(pid, 0)[1] == 0",
    ):
        detail = _escape_failed(source)
        assert detail.startswith("AssertionError"), detail  # it ran, and what it ran was refused
    assert not marker.exists()


def test_fork_bomb_is_limited():
    bomb = (
        f"{REIMPORT}import time\nchildren = 0\n"
        "while children < 400:\n"
        "    if posix.fork() == 0:\n        time.sleep(60)\n        posix._exit(0)\n"
        "    children += 1\n"
    )
    start = time.monotonic()
    detail = _escape_failed(bomb, timeout_s=20)
    assert "BlockingIOError" in detail and "Resource temporarily unavailable" in detail, detail
    assert time.monotonic() - start < 10
    # The bomb's processes died with its namespace: the next program may fork again.
    forks = f"{REIMPORT}pids = [posix.fork() or posix._exit(0) for _ in range(4)]\nfor p in pids:\n    posix.waitpid(p, 0)"
    verdict = run_program(forks)
    assert verdict.passed, verdict


def test_forked_writers_stop_at_the_disk_quota():
    writers = (
        f"{REIMPORT}pids = []\n"
        "for w in range(4):\n"
        "    pid = posix.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (1 << 20)\n"
        "        try:\n"
        "            for n in range(96):\n"
        "                with open(f'w{w}-{n // 8}', 'ab') as f:\n"
        "                    f.write(block)\n"
        "        finally:\n"
        "            posix._exit(0)\n"
        "    pids.append(pid)\n"
        "for pid in pids:\n    posix.waitpid(pid, 0)\n"
        "total = sum(os.path.getsize(name) for name in os.listdir('.'))\n"
        "assert total >= 4 * 96 << 20, f'wrote {total} bytes'\n"
    )
    detail = _escape_failed(writers, timeout_s=30)
    written = int(re.fullmatch(r"AssertionError: wrote (\d+) bytes", detail).group(1))
    assert written <= DISK_QUOTA


def test_network_stays_blocked_after_reimport():
    detail = _escape_failed(
        f"{REIMPORT}s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(3)\ns.connect(('1.1.1.1', 80))"
    )
    assert "unreachable" in detail, detail


def test_the_program_sees_its_own_small_world():
    """What a correct program finds: an unprivileged uid, a /proc of its own namespace, a read-only
    root where /run and /tmp (sockets of other programs) are empty, and a writable work folder
    bounded by the quota."""
    uid_check = (
        f"assert os.getuid() == {SANDBOX_UID}, os.getuid()\n" if sandbox.sandbox_mode() == "setuid"
        else "assert int(open('/proc/self/status').read().split('CapEff:')[1].split()[0], 16) == 0, 'caps'\n"
    )
    verdict = run_program(
        "import os\n" + uid_check +
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "assert pids == [1], pids\n"
        "assert not os.access('/', os.W_OK) and not os.access('/tmp', os.W_OK)\n"
        # /tmp holds the work folder and, when the interpreter lives there (a venv in a clone under /tmp),
        # the interpreter's folders bound back in: nothing else
        "import sys\n"
        "ours = {os.path.basename(os.getcwd())} | {os.path.realpath(p).split('/')[2] for p in"
        " (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path) if os.path.realpath(p).startswith('/tmp/')}\n"
        "assert os.listdir('/run') == [] and set(os.listdir('/tmp')) <= ours, (os.listdir('/tmp'), ours)\n"
        "open('scratch', 'w').write('x')\n"
        "st = os.statvfs('.')\n"
        f"assert st.f_blocks * st.f_frsize <= {DISK_QUOTA}, st\n"
        "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS',"
        " 'MKL_NUM_THREADS'}, sorted(os.environ)\n"
    )
    assert verdict.passed, verdict
    assert PROCESS_LIMIT >= 8


def _sandbox_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess:
    script = (
        "import sys\n"
        "from pkt_pipeline.evaluation.sandbox import SandboxUnavailable, run_program\n"
        "try:\n    print(run_program('assert 1 + 1 == 2'))\n"
        "except SandboxUnavailable as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(3)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], env={"PYTHONPATH": str(PROJECT_ROOT), **env},
        capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT,
    )


def test_missing_namespaces_fail_clearly_unless_weak_is_asked_for():
    """A machine without `unshare` (here: not on PATH) cannot build the boundary: the run stops with
    a message naming what is missing and the opt-out, and PKT_SANDBOX_WEAK=1 runs with a warning."""
    refused = _sandbox_subprocess({"PATH": "/nonexistent"})
    assert refused.returncode == 3, refused.stderr
    assert "cannot isolate model-written code" in refused.stderr
    assert "unshare not found on PATH" in refused.stderr and "PKT_SANDBOX_WEAK=1" in refused.stderr
    weak = _sandbox_subprocess({"PATH": "/nonexistent", "PKT_SANDBOX_WEAK": "1"})
    assert weak.returncode == 0, weak.stderr
    assert "passed=True" in weak.stdout
    assert "NOT a security boundary" in weak.stderr


def test_user_namespace_mode_builds_the_same_view(monkeypatch):
    """The mode a non-root pkt uses (an unprivileged user namespace whose root drops its
    capabilities), run here directly: the same read-only view, private /proc, quota and hidden
    environment. Run by root it cannot show the process limit: the kernel exempts root's uid."""
    if sandbox._run("userns", "pass", 10.0, 1024).status != "passed":
        pytest.skip("user namespaces are not available here")
    monkeypatch.setenv("PKT_SANDBOX_TEST_SECRET", "pkt-secret-userns")
    view = (
        "import glob, os\n"
        "status = open('/proc/self/status').read()\n"
        "assert all(int(status.split(f'{c}:')[1].split()[0], 16) == 0 for c in ('CapEff', 'CapPrm', 'CapBnd')), 'caps'\n"
        "assert sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1]\n"
        "environs = b''.join(open(p, 'rb').read() for p in glob.glob('/proc/[0-9]*/environ'))\n"
        "assert b'PKT_SANDBOX_TEST_SECRET' not in environs\n"
        "import _io\ntry:\n    _io.open('/tmp/pkt-sandbox-userns-marker', 'w')\nexcept OSError as exc:\n    assert exc.errno == 30, exc\n"
        "else:\n    raise AssertionError('wrote to /tmp')\n"
        "open('scratch', 'w').write('x')\n"
        f"assert os.statvfs('.').f_blocks * os.statvfs('.').f_frsize <= {DISK_QUOTA}\n"
    )
    verdict = sandbox._run("userns", view, 10.0, 1024)
    assert verdict.passed, verdict
