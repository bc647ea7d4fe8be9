"""Run model-written programs (HumanEval / MBPP checks) in a limited child process.

Each program runs in a fresh `python -I` child (no PYTHON* variables, no user site) inside a new,
empty temporary working directory that is deleted afterwards, with stdin at /dev/null, an
environment reduced to PATH/HOME/TMPDIR/LANG and single-threaded BLAS, and:

- limits: RLIMIT_AS and RLIMIT_DATA (memory_mb; a large allocation raises MemoryError),
  RLIMIT_CPU (the timeout plus a second), RLIMIT_FSIZE (16 MiB per written file), no core dumps;
- a wall-clock timeout that SIGKILLs the whole process group (the child starts its own session);
  the group is killed after every run, so nothing the program left behind survives it;
- stdout and stderr read concurrently and only their last 8 KiB kept, so a program that prints
  gigabytes costs no memory here;
- no network: when `unshare` works on this machine (probed once per process) the child runs in new
  network and PID namespaces, so it sees only a down loopback device and everything it started dies
  with it; in every case the child's socket constructors raise PermissionError;
- a reliability guard, installed after the harness has done its own imports: process creation
  (fork, exec*, spawn*, posix_spawn, os.system, os.popen, subprocess, multiprocessing's fork_exec),
  signalling (kill, killpg), file removal / renaming / permission and ownership changes,
  chdir/chroot, setuid & co., shutil.rmtree/move/chown and `help` raise PermissionError, and
  `ctypes`, `resource`, `psutil`, `joblib`, `tkinter`, `ipdb` cannot be imported;
- writes (open / io.open / os.open with a write flag) are refused outside the working directory;
- a program passes only when it exits 0 *and* the harness reached its end, so `sys.exit(0)` or
  `os._exit(0)` before the asserts counts as a failure.

What is NOT protected. This stops accidents (a wrong loop, a stray `os.remove`, a test that hits
the network), not a determined attacker: the guard is plain Python and can be undone from inside
(e.g. through `object.__subclasses__()` or by reaching the original classes); the process runs as
the same user as us, so when that user is root it could still write anywhere by going around the
guard, and RLIMIT_NPROC is not set because the kernel ignores it for root; reading files is
allowed everywhere. Without `unshare` there is no network namespace and no PID namespace, so only
the socket guard and the process-group kill remain. Inside the PID namespace the program is its
own init, so a signal it raises at itself with the default action is ignored (faults the kernel
raises, such as a real segfault, still kill it). For untrusted code use a container or VM.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "memory", "error"]

FILE_SIZE_LIMIT = 16 << 20
OUTPUT_TAIL = 8 << 10
DETAIL_CHARS = 300

# Runs in the child before the program. `_PKT` (limits and nonce) is prepended by run_program.
_GUARD = r'''
import builtins, faulthandler, io, os, posix, resource, shutil, socket, subprocess, sys
import _posixsubprocess, _socket

_memory, _cpu, _fsize, _nonce = _PKT
for _limit, _soft, _hard in (
    (resource.RLIMIT_AS, _memory, _memory), (resource.RLIMIT_DATA, _memory, _memory),
    (resource.RLIMIT_CPU, _cpu, _cpu + 1), (resource.RLIMIT_FSIZE, _fsize, _fsize),
    (resource.RLIMIT_CORE, 0, 0),
):
    resource.setrlimit(_limit, (_soft, _hard))
faulthandler.disable()

with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
_write, _root = os.write, os.path.realpath(os.getcwd())


def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the pkt sandbox")
    return refused


def _check_write(path):
    if isinstance(path, int):
        return
    real = os.path.realpath(os.fsdecode(path))
    if real != _root and not real.startswith(_root + os.sep):
        raise PermissionError(f"writing {real} (outside the working directory) is disabled in the pkt sandbox")


_real_open, _real_os_open = builtins.open, os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _open(file, mode="r", *args, **kwargs):
    if set(str(mode)) & set("wax+"):
        _check_write(file)
    return _real_open(file, mode, *args, **kwargs)


def _os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE_FLAGS:
        if dir_fd is not None:
            raise PermissionError("os.open with dir_fd for writing is disabled in the pkt sandbox")
        _check_write(path)
    return _real_os_open(path, flags, mode)


builtins.open = io.open = _open
os.open = posix.open = _os_open

for _name in (
    "system", "popen", "fork", "forkpty", "kill", "killpg",
    "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate",
    "link", "symlink", "mkfifo", "mknod", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
    "chflags", "lchflags", "chroot", "chdir", "fchdir", "setuid", "seteuid", "setreuid", "setresuid",
    "setgid", "setegid", "setregid", "setresgid", "setgroups", "setsid", "setpgid", "setpgrp",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "plock",
):
    for _module in (os, posix):
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse(f"os.{_name}"))
for _name in ("rmtree", "move", "chown"):
    setattr(shutil, _name, _refuse(f"shutil.{_name}"))
subprocess.Popen = _refuse("subprocess")
_posixsubprocess.fork_exec = _refuse("_posixsubprocess.fork_exec")
builtins.help = _refuse("help")


class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the pkt sandbox")


socket.socket = socket.SocketType = _socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, _name, _refuse(f"socket.{_name}"))
for _name in ("ctypes", "_ctypes", "resource", "psutil", "joblib", "tkinter", "ipdb"):
    sys.modules[_name] = None

exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.flush()
_write(1, ("\n" + _nonce + "\n").encode())
'''


@dataclass(frozen=True)
class Verdict:
    """Outcome of one program: `status` is one of passed, failed, timeout, memory, error."""

    passed: bool
    status: Status
    detail: str = ""


@functools.lru_cache(maxsize=1)
def namespace_command() -> tuple[str, ...]:
    """The `unshare` prefix that gives the child no network (and its own PID space), or () when none works.

    Probed once per process by running a trivial child, because whether namespaces may be created
    depends on the machine (root or not, container seccomp profile, sysctls), not on the code.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        log.warning("unshare not found: sandboxed programs keep the network namespace (socket guard only)")
        return ()
    base = (unshare,) if os.geteuid() == 0 else (unshare, "--map-root-user")
    for extra in (("--net", "--pid", "--fork", "--kill-child"), ("--net",)):
        command = (*base, *extra)
        try:
            probe = subprocess.run(
                [*command, sys.executable, "-I", "-c", "pass"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            log.info("sandboxed programs run under %s", " ".join(command))
            return command
    log.warning("unshare cannot create namespaces here: sandboxed programs rely on the socket guard only")
    return ()


def _child_env(workdir: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    # Thread pools of BLAS libraries reserve address space per thread and would eat RLIMIT_AS.
    env.update({var: "1" for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


class _Tail(threading.Thread):
    """Drains a pipe, keeping only its last `cap` bytes, so the child never blocks on a full pipe."""

    def __init__(self, stream, cap: int = OUTPUT_TAIL):
        super().__init__(daemon=True)
        self.stream, self.cap, self.data = stream, cap, bytearray()
        self.start()

    def run(self) -> None:
        fd = self.stream.fileno()
        while chunk := os.read(fd, 1 << 16):
            self.data += chunk
            if len(self.data) > 2 * self.cap:
                del self.data[: -self.cap]

    def text(self) -> str:
        self.join(timeout=2.0)
        return bytes(self.data[-self.cap :]).decode("utf-8", errors="replace")


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """True when `pid` exited within the time. It is left a zombie so its process-group id cannot be
    reused by an unrelated process before we kill the group."""
    deadline, pause = time.monotonic() + timeout_s, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)
    return True


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:DETAIL_CHARS] if lines else ""


def _verdict(returncode: int, timed_out: bool, finished: bool, stderr: str, timeout_s: float) -> Verdict:
    last = _last_line(stderr)
    if timed_out:
        return Verdict(False, "timeout", f"no result after {timeout_s:g} s wall clock")
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return Verdict(False, "timeout", "CPU-time limit exceeded")
    if "MemoryError" in last or "Cannot allocate memory" in last:
        return Verdict(False, "memory", last)
    if returncode == 0 and finished:
        return Verdict(True, "passed")
    if returncode == 0:
        return Verdict(False, "failed", "program exited before its tests finished")
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        # SIGKILL that we did not send: the CPU hard limit, or the kernel's OOM killer.
        return Verdict(False, "error", f"killed by {name}" + (f"; {last}" if last else ""))
    return Verdict(False, "failed", last or f"exit status {returncode}")


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Verdict:
    """Run `source` as a Python program in the sandbox; passed means it exited cleanly."""
    nonce = secrets.token_hex(16)
    limits = (memory_mb << 20, math.ceil(timeout_s) + 1, FILE_SIZE_LIMIT, nonce)
    with tempfile.TemporaryDirectory(prefix="pkt-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        command = [*namespace_command(), sys.executable, "-I", "-c", f"_PKT = {limits!r}\n{_GUARD}"]
        try:
            proc = subprocess.Popen(
                command, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as exc:
            return Verdict(False, "error", f"could not start the sandbox: {exc}"[:DETAIL_CHARS])
        stdout, stderr = _Tail(proc.stdout), _Tail(proc.stderr)
        try:
            timed_out = not _wait_unreaped(proc.pid, timeout_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            returncode = proc.wait()
        out, err = stdout.text(), stderr.text()
        proc.stdout.close()
        proc.stderr.close()
    return _verdict(returncode, timed_out, nonce in out, err, timeout_s)


def run_programs(
    sources: Iterable[str],
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    progress: bool = True,
    desc: str = "running programs",
) -> list[Verdict]:
    """`run_program` over many sources on a thread pool; verdicts come back in input order."""
    sources = list(sources)
    namespace_command()  # probe once, before the threads race to do it
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_program, s, timeout_s, memory_mb) for s in sources]
        for future in tqdm(futures, desc=desc, unit="prog", disable=not progress):
            future.result()
    return [future.result() for future in futures]
