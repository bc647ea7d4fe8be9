"""Run model-written programs (HumanEval / MBPP checks) in an isolated child process.

The boundary is the kernel's, not Python's. Each program runs under util-linux `unshare` in new
mount, PID, network, IPC and UTS namespaces, where the child, before it runs any of the program:

- makes every mount read-only (and nosuid) in its private mount table, and mounts a tmpfs of
  DISK_QUOTA bytes as its work folder, the only writable place (all its processes share the quota);
- mounts a /proc of its own PID namespace, so no other process (nor its environment) is visible;
- runs as SANDBOX_UID (nobody) when we are root, with no supplementary groups, so it holds no
  capability and reads only what any user may read; when we are not root it runs in an
  unprivileged user namespace and drops every capability it has there (bounding set included);
  no_new_privs is set either way, so no setuid binary gives anything back;
- gets RLIMIT_NPROC = PROCESS_LIMIT (the kernel counts per uid, threads included), RLIMIT_AS and
  RLIMIT_DATA (memory_mb; a large allocation raises MemoryError), RLIMIT_CPU (the timeout plus a
  second), RLIMIT_FSIZE (16 MiB per file), RLIMIT_NOFILE 256 and no core dumps;
- sees only a loopback device that is down, so there is no network at all;
- gets an environment of PATH/HOME/TMPDIR/LANG and single-threaded BLAS, nothing of ours.

An interpreter under a private home (pyenv in /root, mode 0700) stays importable as nobody: that
home is covered by an empty tmpfs into which only the interpreter's import folders are bound.

Around that: a fresh `python -I` child (no PYTHON* variables, no user site), stdin at /dev/null,
a wall-clock timeout that SIGKILLs the whole process group, and everything in the PID namespace
dies with the program; stdout and stderr are read concurrently and only their last 8 KiB kept;
a program passes only when it exits 0 *and* the harness reached its end, so `sys.exit(0)` or
`os._exit(0)` before the asserts counts as a failure. The Python-level guard (process creation,
signalling, file removal, writes outside the work folder, sockets, `ctypes` refused) is still
installed, to stop accidents with a clear message; it is not what keeps the program in.

When the namespaces cannot be built (no `unshare`, no user namespaces for a non-root user, a
container that forbids mounts), `run_program` raises SandboxUnavailable saying why, before
running anything. PKT_SANDBOX_WEAK=1 runs the programs anyway with the Python-level guard only,
as root if we are root, with a loud warning: that guard can be undone from inside (re-importing
`posix`, `_io.open`), so use it only for code you trust.

Not covered: total memory is bounded per process (RLIMIT_AS), not per sandbox, so PROCESS_LIMIT
processes can use that much each (a cgroup would bound the sum); PROCESS_LIMIT is shared by
all sandboxes running at once as nobody. Inside the PID namespace the program is its own init,
so a signal it raises at itself with the default action is ignored (faults the kernel raises,
such as a real segfault, still kill it).
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
Mode = Literal["setuid", "userns", "weak"]

FILE_SIZE_LIMIT = 16 << 20
OUTPUT_TAIL = 8 << 10
DETAIL_CHARS = 300
SANDBOX_UID = 65534  # nobody: who the program runs as when we are root
# RLIMIT_NPROC, counted by the kernel per uid (threads included) over all sandboxes running at once.
PROCESS_LIMIT = 32
DISK_QUOTA = 64 << 20  # the work folder's tmpfs: all the program and its children may write
NAMESPACES = ("--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child")
WEAK_ENV = "PKT_SANDBOX_WEAK"
# How the child reports that it could not build the sandbox (written out in _GUARD).
SETUP_FAILED = 125
SETUP_MESSAGE = "pkt sandbox setup failed"

# Runs in the child before the program. `_PKT` (mode, limits and nonce) is prepended by `_run`.
# In the namespace modes it starts as root of its mount namespace: it builds the file-system view,
# sets the limits, gives up root, and only then installs the Python-level guard and runs the program.
_GUARD = r"""
import builtins, faulthandler, io, os, posix, resource, shutil, socket, subprocess, sys
import _posixsubprocess, _socket

_mode, _memory, _cpu, _fsize, _nproc, _quota, _uid, _nonce = _PKT
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
_root = os.getcwd()


def _searchable(path):
    st = os.stat(path)
    bit = 0o100 if st.st_uid == _uid else 0o010 if st.st_gid == _uid else 0o001
    return bool(st.st_mode & bit)


def _cover(mount, bind, tmpfs_flags):
    # Empty tmpfs over the folders where other programs keep sockets and scratch files (a read-only
    # mount does not stop connect() on a socket file) and, as nobody, over each folder it could not
    # enter on the way to the interpreter (pyenv, conda under a 0700 home): the interpreter's
    # folders are then bound back in, and the rest of that home stays out of sight.
    # Whole prefixes, not only sys.path: extension modules load shared libraries from <prefix>/lib.
    roots = (*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    entries = sorted({os.path.realpath(p) for p in roots if p and os.path.exists(p)})
    covered = {f for f in ("/run", "/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(f) and not os.path.islink(f)}
    for entry in entries if _mode == "setuid" else ():
        parts = entry.split(os.sep)
        closed = [os.sep.join(parts[:d]) for d in range(2, len(parts)) if not _searchable(os.sep.join(parts[:d]))]
        covered.update(closed[:1])
    inside = lambda path, folders: any(path == f or path.startswith(f + os.sep) for f in folders)
    covered = {f for f in covered if not inside(os.path.dirname(f), covered)}
    kept = {}
    for entry in entries:
        if inside(entry, covered) and not inside(entry, kept):
            kept[entry] = os.open(entry, os.O_PATH)
    for folder in sorted(covered):
        mount(b"tmpfs", folder.encode(), b"tmpfs", tmpfs_flags, b"size=64k,mode=0755")
    for entry, fd in kept.items():
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(entry, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(entry), 0o755, exist_ok=True)
            open(entry, "x").close()
        mount(f"/proc/self/fd/{fd}".encode(), entry.encode(), None, bind)
        os.close(fd)
    os.makedirs(_root, 0o700, exist_ok=True)  # the work folder's mount point, if it was covered


def _isolate():
    import ctypes, re

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    KEPT = {"nodev": NODEV, "noexec": NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

    def mount(source, target, fstype, flags, data=None):
        if libc.mount(source, target, fstype, flags, data) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mount {os.fsdecode(target)}: {os.strerror(error)}")

    def prctl(*args):
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl{args}: {os.strerror(error)}")

    mount(None, b"/", None, REC | PRIVATE)
    _cover(mount, BIND | REC, NOSUID | NODEV | NOEXEC)
    # Every mount read-only and nosuid, keeping the flags a bind remount would otherwise clear
    # (and that a user namespace may not clear); mountinfo escapes blanks in paths as octal.
    with open("/proc/self/mountinfo", "rb") as f:
        mounts = [line.split()[4:6] for line in f]
    for target, options in mounts:
        target = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), target)
        kept = sum(KEPT.get(o, 0) for o in options.decode().split(","))
        mount(None, target, None, REMOUNT | BIND | RDONLY | NOSUID | kept)
    # A /proc of the new PID namespace on top of the host's: only this program's processes.
    mount(b"proc", b"/proc", b"proc", NOSUID | NODEV | NOEXEC)
    options = f"size={_quota},nr_inodes=4096,mode=0700,uid={_uid},gid={_uid}".encode()
    mount(b"tmpfs", _root.encode(), b"tmpfs", NOSUID | NODEV | NOEXEC, options)
    os.chdir(_root)
    with open("program.py", "w", encoding="utf-8") as f:
        f.write(_source)
    os.chown("program.py", _uid, _uid)
    if _mode == "setuid":
        os.setgroups([])
        os.setresgid(_uid, _uid, _uid)
        os.setresuid(_uid, _uid, _uid)  # from root to another uid: every capability goes too
    else:  # root of a user namespace: keep the uid, drop the capabilities it holds there
        for cap in range(64):
            try:
                prctl(24, cap)  # PR_CAPBSET_DROP
            except OSError:
                break
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


if _mode != "weak":
    try:
        _isolate()
    except Exception as exc:
        sys.stderr.write(f"pkt sandbox setup failed: {exc}\n")
        os._exit(125)

for _limit, _soft, _hard in (
    (resource.RLIMIT_AS, _memory, _memory), (resource.RLIMIT_DATA, _memory, _memory),
    (resource.RLIMIT_CPU, _cpu, _cpu + 1), (resource.RLIMIT_FSIZE, _fsize, _fsize),
    (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, 256, 256),
) + (((resource.RLIMIT_NPROC, _nproc, _nproc),) if _mode != "weak" else ()):
    resource.setrlimit(_limit, (_soft, _hard))
faulthandler.disable()
_write = os.write


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
"""


@dataclass(frozen=True)
class Verdict:
    """Outcome of one program: `status` is one of passed, failed, timeout, memory, error."""

    passed: bool
    status: Status
    detail: str = ""


class SandboxUnavailable(ValueError):
    """This machine cannot build the sandbox (a ValueError, so the CLI prints it as one line)."""


def _prefix(mode: Mode) -> tuple[str, ...]:
    if mode == "weak":
        return ()
    user = ("--user", "--map-root-user") if mode == "userns" else ()
    return (shutil.which("unshare") or "unshare", *user, *NAMESPACES)


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> Mode:
    """How programs are isolated here: "setuid" (root: namespaces, then the sandbox uid), "userns"
    (not root: an unprivileged user namespace, whose root then drops its capabilities), or "weak"
    (no namespaces; only when PKT_SANDBOX_WEAK=1 asks for it).

    Probed once per process by running a trivial program through the whole setup, because what
    works depends on the machine (root or not, container seccomp profile, sysctls), not on the code.
    Raises SandboxUnavailable when no mode works and the weak one was not asked for.
    """
    reasons = []
    if shutil.which("unshare") is None:
        reasons.append("unshare not found on PATH (it comes with util-linux)")
    else:
        # Root uses no user namespace: there RLIMIT_NPROC would not bind (the kernel exempts root's uid).
        mode: Mode = "setuid" if os.geteuid() == 0 else "userns"
        verdict = _run(mode, "pass", 30.0, 1024)
        if verdict.passed:
            log.info("sandboxed programs run under %s", " ".join(_prefix(mode)))
            return mode
        reasons.append(f"{mode} mode: {verdict.detail or verdict.status}")
    if os.environ.get(WEAK_ENV) == "1":
        log.warning(
            "%s=1: model-written code runs with Python-level guards only, which are NOT a security boundary "
            "(%s)", WEAK_ENV, "; ".join(reasons),
        )
        return "weak"
    raise SandboxUnavailable(
        f"the sandbox cannot isolate model-written code on this machine ({'; '.join(reasons)}). It needs "
        "util-linux `unshare` and mount, PID and network namespaces: run as root, or allow unprivileged user "
        "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1, and on Ubuntu "
        f"kernel.apparmor_restrict_unprivileged_userns=0). To run it anyway with only Python-level guards, "
        f"which are NOT a security boundary, set {WEAK_ENV}=1."
    )


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
    return _run(sandbox_mode(), source, timeout_s, memory_mb)


def _run(mode: Mode, source: str, timeout_s: float, memory_mb: int) -> Verdict:
    nonce = secrets.token_hex(16)
    uid = SANDBOX_UID if mode == "setuid" else 0
    params = (mode, memory_mb << 20, math.ceil(timeout_s) + 1, FILE_SIZE_LIMIT, PROCESS_LIMIT, DISK_QUOTA, uid, nonce)
    # Only the mount point and program.py's way in: the program's own folder is a tmpfs mounted on it.
    with tempfile.TemporaryDirectory(prefix="pkt-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        command = [*_prefix(mode), sys.executable, "-I", "-c", f"_PKT = {params!r}\n{_GUARD}"]
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
    if returncode == SETUP_FAILED and SETUP_MESSAGE in err:
        return Verdict(False, "error", _last_line(err))
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
    sandbox_mode()  # probe once (or refuse), before the threads race to do it
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_program, s, timeout_s, memory_mb) for s in sources]
        for future in tqdm(futures, desc=desc, unit="prog", disable=not progress):
            future.result()
    return [future.result() for future in futures]
