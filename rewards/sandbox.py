"""Run untrusted Python programs in a sandbox, and judge them by trusted tests that run in ANOTHER process.

Two processes per run, started for it alone; everything either leaves behind is killed:

* **the program** (:mod:`dare_gym.rewards.sandbox_harness`): the untrusted code runs as ``__main__`` in a
  fully isolated process (below), then only ANSWERS CALLS: the checker names one of its top-level functions
  and sends arguments; it replies with the result or the exception raised, as plain data.
* **the checker** (:mod:`dare_gym.rewards.code_checker`): a process of the parent's, with its own time, CPU
  and memory limits, that runs the benchmark's trusted test code (:class:`CheckSpec`: HumanEval's
  ``check(candidate)`` with the prompt's helper functions, MBPP's asserts) against proxies of the program's
  functions. Arguments and results cross as JSON-like values with exact types (int, float incl. nan/inf,
  bool, None, str, bytes, list, tuple, dict, set, ...; :mod:`dare_gym.rewards.sandbox_protocol`), decoded
  by the checker with size and depth caps into builtin objects: never pickle, never an object of the
  program's. Its verdict goes to the parent on a pipe that only the two of them hold. Checkers are forked by
  a checker server (one per parent process, common imports of test code done once: a fork costs about a
  millisecond where a fresh interpreter costs tens), each check in a fork of its own; where pidfds are
  unavailable, each checker is a fresh interpreter.

Why this is sound (the threat model). The program may do anything its process allows: rewrite every
function, frame, closure, builtin and module it can reach (the harness included), start sub-interpreters,
``ctypes`` its own memory, fork, or die at any moment. None of that reaches the verdict: the test code and
every comparison run in the checker, which the program can only send bytes to. So the program is, to the
checker, an arbitrary function from the calls it receives to plain-data replies, and a run passes only if such
replies satisfy the tests — exactly what passing the tests means. An ``__eq__`` that always says True never
crosses (objects are not plain data); a program that dies, hangs, breaks the protocol, returns what is not
plain data, raises ``SystemExit`` in a call, or leaves threads or processes running FAILS the whole run (the
checker raises a ``BaseException`` that a test's ``except Exception`` cannot swallow and records it anyway).
What remains: the program can learn the expected answers only by computing them (the test code never enters
its process; no file of the host but the interpreter and its libraries exists for it, so no copy of a
benchmark, wherever it lies and whatever limits a caller passes; no kernel state it can write survives its run,
so it cannot learn across runs either; it cannot see or trace the checker, which runs under another uid outside
its pid namespace); trusted test code that accepts wrong answers stays weak; a kernel exploit breaks any
sandbox; and in the weakest fallback (not root: no per-run uid and no pid namespace) the program runs as the
same user as the parent and the checker and can reach them through ``ptrace`` or ``/proc`` where the kernel
allows it: :func:`isolation_report` then says ``verdict_isolated: False``.

``run_program(source)`` is the degenerate check with no test: it passes if the program runs to its end and
says goodbye. That verdict is the program's own word (a program can claim it falsely), which is right for
running a program, never for judging untrusted code: the code rewards always use :func:`check_program`.

The stance is deny by default: the program sees an allow-listed file system, and every piece of state the
kernel keeps per uid or per cgroup is either fresh for the run or out of its reach, so nothing of one run
reaches another. Layers, strongest first (what is active on this machine: :func:`isolation_report`):

* **Namespaces** (root + util-linux ``unshare``): network (only a downed loopback: no connection to the
  internet, the host's localhost or its abstract unix sockets), pid (the harness is init: when it exits the
  kernel kills every process of the run), IPC (System V objects and POSIX message queues die with the run)
  and UTS (hostname), and mount, which makes:
* **An allow-listed root**: the harness pivots into a new tmpfs holding only :func:`allow_list` (the
  interpreter, its standard library, site-packages and the folders of the shared libraries they load), bound
  read-only, five stateless devices, an empty ``/proc``, and two private size-limited tmpfs mounts, the
  working directory (owned by the run's uid) and ``/dev/shm``; the host's tree is detached. Nothing else
  exists inside: not ``DARE_GYM_DATA_DIR`` nor a ``data_files=`` copy of a benchmark, not ``/sys`` (cgroup
  counters), ``/tmp``, ``/home`` or the project's folder. ``SandboxLimits.hidden_paths`` can cover folders
  inside the allow-list too. Shared on purpose: the **user** namespace (the program is an unprivileged uid
  without capabilities, and the filter below denies it namespaces of its own), the **cgroup** namespace (no
  cgroup file is in sight) and the **time** namespace (setting a clock needs ``CAP_SYS_TIME``).
* **An unprivileged uid/gid**, unique per concurrent run (claimed through an abstract unix socket, so two
  processes on one host never share one): ``RLIMIT_NPROC`` binds, no capabilities, ``no_new_privs``, no way to
  signal or trace the host's processes (the checker included), no write access to anything it does not own.
* **A system-call filter** (seccomp, installed by the harness last): no key calls (the kernel keeps keyrings
  per uid for days, a channel to the uid's next run), no ``clone``/``unshare`` with a namespace flag, no
  mounts, ``bpf``, ``perf_event_open``, ``userfaultfd`` or ``io_uring``. Where no filter can be installed the
  run still gets a fresh session keyring and its uid's user, user-session and persistent keyrings are emptied
  before the program starts.
* **Fresh cgroups v1** (``pids`` and ``memory``): new cgroups for every run, removed after it, cap the tasks
  of the whole tree (for root too) and its memory (tmpfs included): their counters (high-water mark, failures)
  start at zero, and at the end every task still in them is killed.
* **rlimits**: CPU seconds, address space, processes, file size, open files, no core files.
* **Always**: a new session/process group (SIGKILLed at the end and on timeout), an environment built from
  scratch, a private temporary working directory removed afterwards (or, if the caller was killed, by the
  next run holding its uid slot), stdin from ``/dev/null``, capped
  stdout/stderr, and one wall-clock deadline owned by the parent for both processes. With util-linux
  ``setpriv``, the run's processes get a parent-death signal, so the kernel kills them if their caller dies (a
  reward's helper process killed at its time limit): nothing of a run outlives the process that started it.

Where a layer is missing (not root, no ``unshare``, no cgroup v1 controllers, no seccomp) the next ones still
apply and a ONE-TIME warning names exactly what is missing. Without a pid namespace nor cgroups, the harness is
a child subreaper and kills what the program left when it exits; on timeout the parent stops and kills that tree
(found through ``/proc``), and with a per-run uid every process of that uid is killed too. The holes left in
that weakest mode: a ``setsid`` daemon of a program that then leaves through ``os._exit`` survives unless a
per-run uid is in use, and without a mount namespace the program sees the host's files as its user may.
"""

from __future__ import annotations

import functools
import logging
import marshal
import os
import platform
import pwd
import secrets
import select
import selectors
import shutil
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from dare_gym.rewards import code_checker, sandbox_boot, sandbox_harness, sandbox_protocol, worker

__all__ = [
    "CheckSpec",
    "allow_list",
    "ExecutionResult",
    "SandboxLimits",
    "check_program",
    "check_programs",
    "isolation_report",
    "run_program",
    "run_programs",
]

logger = logging.getLogger(__name__)

_VERDICT_CAP = 64 * 1024
_UID_BASE = 1_870_000_000  # far above any login uid and the usual subuid ranges
_UID_SLOTS = 4096
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_PARENT = "dare_gym_sandbox"
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CGROUP_HEADROOM_MB = 128
_CHECKER_MEMORY_HEADROOM_MB = 512  # decoding a large reply takes several times its size
_EXIT_GRACE_S = 0.25  # how long the program may take to exit after the verdict (it normally has already)
_NAMESPACES = ("--mount", "--net", "--pid", "--ipc", "--uts")
_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_SYSCALLS = {  # the system calls the sandbox names, by architecture (the kernel's unistd tables)
    "x86_64": {"keyctl": 250, "add_key": 248, "request_key": 249, "pivot_root": 155, "clone": 56, "clone3": 435,
               "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "chroot": 161, "open_tree": 428,
               "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
               "mount_setattr": 442, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
               "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
    "aarch64": {"keyctl": 219, "add_key": 217, "request_key": 218, "pivot_root": 41, "clone": 220, "clone3": 435,
                "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "chroot": 51, "open_tree": 428,
                "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
                "mount_setattr": 442, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED_SYSCALLS = {
    # keys: the kernel keeps them per uid, beyond any process: a channel from one run to the next
    "keyctl": "ENOSYS", "add_key": "ENOSYS", "request_key": "ENOSYS",
    # mounts: the allow-listed root is all the program may see
    "mount": "EPERM", "umount2": "EPERM", "pivot_root": "EPERM", "chroot": "EPERM", "setns": "EPERM",
    "open_tree": "EPERM", "move_mount": "EPERM", "fsopen": "EPERM", "fsconfig": "EPERM", "fsmount": "EPERM",
    "fspick": "EPERM", "mount_setattr": "EPERM",
    # kernel surface no Python program needs, and the usual first step of an exploit
    "bpf": "EPERM", "perf_event_open": "EPERM", "userfaultfd": "EPERM",
    "io_uring_setup": "EPERM", "io_uring_enter": "EPERM", "io_uring_register": "EPERM",
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes the C library fall back to clone
    "clone3": "ENOSYS",
}
_NAMESPACE_FLAGS = 0xFE020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
"""clone() and unshare() with any of these fail (EPERM): a user namespace of its own would give the program
capabilities over new mount namespaces, hence a view of cgroupfs or procfs the allow-listed root does not have."""
_CHILD_PACKAGE = "_dare_gym_sandbox"
_CHECKER_PRELOAD = ("typing", "re", "math", "random", "collections", "itertools", "functools", "heapq", "bisect",
                    "string", "hashlib", "copy", "fractions", "decimal", "statistics", "operator", "datetime")
"""Imported once by the checker server, so that the test code of every forked checker finds them loaded."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run.

    ``timeout_s``: wall-clock limit of the whole run (program and checker), owned by the parent.
    ``cpu_s``: CPU seconds per process (``RLIMIT_CPU``); ``None`` means ``timeout_s``.
    ``memory_mb``: address space per process (``RLIMIT_AS``); with the memory cgroup, the program's whole tree
    may use ``memory_mb + 2 * workdir_mb + 128`` MB of RAM (tmpfs included) before the OOM killer stops it.
    ``max_processes``: tasks (processes and threads) of the program: pids cgroup and ``RLIMIT_NPROC``.
    ``max_output_bytes``: what is kept of stdout and of stderr each; the rest is read and dropped.
    ``workdir_mb``: size of the private working directory and of ``/dev/shm`` (tmpfs each), and ``RLIMIT_FSIZE``.
    ``hidden_paths``: folders inside the allow-list (:func:`allow_list`) covered by an empty read-only tmpfs
    (e.g. a package's data in site-packages); what is outside the allow-list is absent anyway. Needs the mount
    namespace, ignored otherwise.
    """

    timeout_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    max_output_bytes: int = 64 * 1024
    workdir_mb: int = 64
    hidden_paths: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s!r}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"cpu_s must be positive, got {self.cpu_s!r}")
        for name in ("memory_mb", "max_processes", "max_output_bytes", "workdir_mb"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if isinstance(self.hidden_paths, str):
            raise TypeError("hidden_paths must be a sequence of paths, not one string")

    @property
    def effective_cpu_s(self) -> float:
        return float(self.timeout_s if self.cpu_s is None else self.cpu_s)


@dataclass(frozen=True)
class CheckSpec:
    """The trusted half of a check: code that runs in the checker, never in the program's process.

    ``prelude``: run first in the checker's namespace (HumanEval: the prompt's imports and helper functions).
    ``modules``: imported into that namespace by name (MBPP 596's asserts use the ``sys`` that the
    solution imports). ``functions``: names bound to proxies of the program's top-level functions.
    ``program_setup``: trusted code run INSIDE the program after it loaded, for test inputs that are objects of
    the program's own classes (MBPP 367 builds trees of the solution's ``Node``); ``remote_names``: the names
    it binds, passed to calls by reference. ``constructors``: the names of ``functions`` that are classes of the
    program's (MBPP 601's ``Pair``): what a call of one returns stays in the program, and the checker gets a
    :class:`~dare_gym.rewards.sandbox_protocol.Handle` that it can only pass back. ``test``: the test code, run
    in the checker last; the run passes if it completes. An empty spec checks only that the program runs to its
    end (:func:`run_program`).
    """

    test: str = ""
    prelude: str = ""
    functions: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    program_setup: str = ""
    remote_names: tuple[str, ...] = ()
    constructors: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("test", "prelude", "program_setup"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"CheckSpec.{name} must be a str, got {type(getattr(self, name)).__name__}")
        for name in ("functions", "modules", "remote_names", "constructors"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v.isidentifier() for v in value):
                raise ValueError(f"CheckSpec.{name} must be a sequence of identifiers, got {value!r}")
            object.__setattr__(self, name, tuple(value))


@dataclass
class ExecutionResult:
    """Outcome of one run.

    ``status`` is one of ``"passed"``, ``"failed"`` (a test failed, the program raised, exited early or
    misbehaved), ``"timeout"`` (wall-clock limit), ``"killed"`` (the program was killed by a signal: memory,
    CPU or process limits) or ``"error"`` (the sandbox or the trusted test code could not run).
    ``reason`` says why it did not pass. ``stdout``/``stderr`` are the program's; ``checker_output`` is what
    the trusted test code printed. ``returncode`` is the program process's exit status.
    """

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    checker_output: str = ""


# --------------------------------------------------------------------------------------------------------
# The children's code: real modules of this package, compiled once and sent to each child.
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _child_code() -> tuple[str, tuple, tuple]:
    """The boot script's text, and the compiled modules of the program's and the checker's processes."""

    def compiled(module) -> tuple[str, object]:
        path = Path(module.__file__)
        return module.__name__.rpartition(".")[2], compile(path.read_text(), str(path), "exec", dont_inherit=True)

    protocol = compiled(sandbox_protocol)
    boot = Path(sandbox_boot.__file__).read_text()
    return boot, (protocol, compiled(sandbox_harness)), (protocol, compiled(code_checker))


def _payload_fd(modules: tuple, entry: str, payload: dict, raw: bool = False) -> int:
    """A memory file holding what the boot script loads (or, ``raw``, only ``payload``: for a checker that the
    checker server forks); the caller passes it to the child and closes it."""
    data = marshal.dumps(payload if raw else (_CHILD_PACKAGE, list(modules), entry, payload))
    fd = os.memfd_create("dare_gym_sandbox", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------------------


def check_program(solution: str, spec: CheckSpec, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``solution`` (untrusted code) in a fresh sandboxed process and judge it by ``spec``'s trusted test
    code, run in a separate checker process (see the module docstring for why that verdict is sound).

    Returns within ``limits.timeout_s`` plus about a second whatever the program does. Never raises for
    anything the program does; a failure of the sandbox or of the test code is ``status="error"``.
    """
    start = time.monotonic()
    if not isinstance(solution, str):
        return _error(f"the program must be a str, got {type(solution).__name__}", start)
    if not isinstance(spec, CheckSpec):
        return _error(f"spec must be a CheckSpec, got {type(spec).__name__}", start)
    try:
        plan = _get_plan()
    except Exception as error:  # pragma: no cover - probing never raises in practice
        return _error(f"sandbox probe failed: {type(error).__name__}: {error}", start)
    return _run(solution, spec, limits, plan)


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run a whole program in a fresh sandboxed process; it passes if it runs to its end (raising nothing)
    and leaves no thread or process running. That is the program's own word: use :func:`check_program` to
    judge untrusted code against tests."""
    return check_program(source, CheckSpec(), limits)


def check_programs(jobs: Sequence[tuple[str, CheckSpec]] | Iterable[tuple[str, CheckSpec]],
                   limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[ExecutionResult]:
    """:func:`check_program` for many ``(solution, spec)`` pairs, ``workers`` at a time; results keep the order."""
    jobs = list(jobs)
    if not jobs:
        return []
    _get_plan()  # probe once, outside the pool
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        return [check_program(solution, spec, limits) for solution, spec in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dare_gym_sandbox") as pool:
        return list(pool.map(lambda job: check_program(job[0], job[1], limits), jobs))


def run_programs(sources: Sequence[str] | Iterable[str], limits: SandboxLimits = SandboxLimits(),
                 workers: int = 2) -> list[ExecutionResult]:
    """:func:`run_program` for many programs, ``workers`` at a time; results keep the order."""
    return check_programs([(source, CheckSpec()) for source in sources], limits, workers)


@dataclass
class _Program:
    """The program's process (``unshare`` and the harness under it) and the parent's ends of its output."""

    proc: subprocess.Popen
    outputs: dict  # fd -> stream name


class _SpawnedChecker:
    """A checker in a fresh interpreter of its own (when the checker server is unavailable)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.outputs = {proc.stdout.fileno(): "checker"}

    def exited_cleanly(self) -> bool:
        return self.proc.returncode == 0

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.proc.stdout.close()


class _ForkedChecker:
    """A checker forked by the checker server; the parent holds a pidfd (immune to pid reuse) to kill it."""

    def __init__(self, pidfd: int, output_fd: int):
        self.pidfd, self.output_fd = pidfd, output_fd
        self.outputs = {output_fd: "checker"}

    def exited_cleanly(self) -> bool:
        return True  # its exit status goes to the server; the verdict is its last act

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)  # readable once the process has exited
        poller.poll(1000)

    def close(self) -> None:
        for fd in (self.pidfd, self.output_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class _CheckerServer:
    """A long-lived trusted process, one per parent process, that forks a fresh checker for every run.

    A fresh interpreter per checker costs a start-up and the imports of the test code (``typing``, ``re``...)
    every time; a fork of a process that already has them costs about a millisecond. The server never runs
    test code or touches a program's data itself: each check runs in its own fork, which dies with the check,
    so nothing of one check reaches another. It receives the run's channel ends over a private socket pair,
    answers with a pidfd of the fork (so the parent can kill it at the deadline without any pid-reuse race),
    and exits when this process closes its end (at exit, or killed). Where pidfds or descriptor passing are
    unavailable, or the server cannot start, checkers run in fresh interpreters instead.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._owner: int | None = None
        self.unavailable: str | None = None if all(
            hasattr(module, name) for module, name in ((os, "pidfd_open"), (signal, "pidfd_send_signal"),
                                                       (socket, "send_fds"), (socket, "recv_fds"))
        ) else "pidfds or descriptor passing are unavailable"

    def fork_checker(self, payload_fd: int, fds: list[int]) -> int | None:
        """A pidfd of a new checker holding ``payload_fd`` and ``fds``; None if the server cannot make one."""
        with self._lock:
            if self.unavailable is not None:
                return None
            for _attempt in range(2):  # a server that died since the last run is restarted once
                try:
                    if self._owner != os.getpid() or self._proc is None or self._proc.poll() is not None:
                        self._start()
                    socket.send_fds(self._socket, [b"check"], [payload_fd, *fds])
                    data, pidfds, _flags, _address = socket.recv_fds(self._socket, 16, 1)
                except OSError as error:
                    self._stop(f"{type(error).__name__}: {error}")
                    continue
                if data == b"forked" and len(pidfds) == 1:
                    return pidfds[0]
                for fd in pidfds:
                    os.close(fd)
                self._stop("the server did not fork a checker")
            return None

    def _start(self) -> None:
        self._stop(None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot, _, modules = _child_code()
        payload = {"socket_fd": theirs.fileno(), "site_paths": _site_paths(), "preload": list(_CHECKER_PRELOAD)}
        payload_fd = _payload_fd(modules, "code_checker:serve", payload)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-s", "-B", "-c", boot, str(payload_fd)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=_clean_env("/"),
                pass_fds=(payload_fd, theirs.fileno()), start_new_session=True, close_fds=True,
            )
        finally:
            os.close(payload_fd)
            theirs.close()
        worker.keep_child(self._proc.pid)  # in a reward's helper process: it serves the calls to come
        ours.settimeout(10.0)
        self._socket, self._owner = ours, os.getpid()

    def _stop(self, why: str | None) -> None:
        if self._socket is not None:
            self._socket.close()
        if self._proc is not None and self._owner == os.getpid():
            self._proc.kill()
            self._proc.wait()
        self._socket = self._proc = self._owner = None
        if why is not None:
            logger.warning("dare_gym sandbox: the checker server failed (%s); restarting it", why)

    def forget_after_fork(self) -> None:
        """In a forked copy of this process: the server belongs to the original; this copy starts its own."""
        self._lock = threading.Lock()
        if self._socket is not None:
            self._socket.close()
        self._socket = self._proc = self._owner = None


_CHECKER_SERVER = _CheckerServer()
os.register_at_fork(after_in_child=_CHECKER_SERVER.forget_after_fork)


def _run(solution: str, spec: CheckSpec, limits: SandboxLimits, plan: _Plan) -> ExecutionResult:
    start = time.monotonic()
    deadline = start + float(limits.timeout_s)
    workdir = checker_dir = uid_sock = program = checker = None
    cgroups: dict[str, Path] = {}
    parent_fds: list[int] = []  # the parent's copies of the channel ends, closed once both children hold them
    verdict_r = None
    uid = None
    try:
        slot_uid, uid_sock = _UID_POOL.acquire()  # also names this run's folders and cgroups
        workdir, checker_dir = _slot_folders(slot_uid)
        if plan.drop_uid:
            uid = slot_uid
            if not plan.namespaces:
                os.chown(workdir, uid, uid)
        if plan.cgroups:
            cgroups = _run_cgroups(plan, limits, slot_uid)
        oom_before = _oom_kills(cgroups)
        call_r, call_w = os.pipe()
        parent_fds += [call_r, call_w]
        reply_r, reply_w = os.pipe()
        parent_fds += [reply_r, reply_w]
        verdict_r, verdict_w = os.pipe()
        parent_fds.append(verdict_w)
        program = _start_program(solution, spec, limits, plan, workdir, slot_uid, cgroups, call_r, reply_w)
        checker = _start_checker(spec, limits, plan, checker_dir, call_w, reply_r, verdict_w)
        for fd in parent_fds:
            os.close(fd)
        parent_fds.clear()
        return _supervise(program, checker, verdict_r, limits, deadline, start, cgroups, uid, plan, oom_before)
    except Exception as error:
        return _error(f"sandbox failure: {type(error).__name__}: {error}", start)
    finally:
        for fd in parent_fds + ([verdict_r] if verdict_r is not None else []):
            try:
                os.close(fd)
            except OSError:
                pass
        if program is not None and program.proc.returncode is None:
            _stop_program(program, cgroups, uid, plan)
        if checker is not None:
            checker.kill()
            checker.close()
        if cgroups:
            _remove_cgroups(cgroups)
        for folder in (workdir, checker_dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if uid_sock is not None:
            uid_sock.close()


def _start_program(solution, spec, limits, plan, workdir, slot_uid, cgroups, call_fd, reply_fd) -> _Program:
    memory = int(limits.memory_mb) * 1024 * 1024
    config = {
        "workdir": workdir,
        "uid": slot_uid if plan.drop_uid else 0,
        "gid": slot_uid if plan.drop_uid else 0,
        "drop_uid": plan.drop_uid,
        "mount_ns": plan.namespaces,
        "root": {"paths": list(allow_list()), "devices": [d for d in _DEVICES if os.path.exists(d)]}
        if plan.namespaces else None,
        "pivot_root": plan.pivot_root,
        "seccomp": plan.seccomp,
        "hidden_paths": [str(p) for p in limits.hidden_paths],
        "cgroup_procs": [str(p / "cgroup.procs") for p in cgroups.values()],
        "workdir_mb": int(limits.workdir_mb),
        "keyctl": plan.keyctl,
        "rlimits": {
            "cpu": max(1, int(-(-limits.effective_cpu_s // 1))),
            "as": memory,
            "nproc": int(limits.max_processes),
            "fsize": int(limits.workdir_mb) * 1024 * 1024,
            "nofile": 256,
        },
    }
    boot, modules, _ = _child_code()
    payload = {"config": config, "source": solution, "setup": spec.program_setup, "call_fd": call_fd,
               "reply_fd": reply_fd, "site_paths": _site_paths()}
    payload_fd = _payload_fd(modules, "sandbox_harness", payload)
    try:
        argv = [sys.executable, "-S", "-s", "-B", "-c", boot, str(payload_fd)]
        if plan.namespaces:
            argv = [plan.unshare, *_NAMESPACES, "--fork", "--kill-child", "--propagation", "private", *argv]
        proc = subprocess.Popen(
            _die_with_this_thread(plan, argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=workdir, env=_clean_env(workdir), pass_fds=(payload_fd, call_fd, reply_fd),
            start_new_session=True, close_fds=True,
        )
    finally:
        os.close(payload_fd)
    return _Program(proc, {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"})


def _die_with_this_thread(plan: _Plan, argv: list[str]) -> list[str]:
    """``argv`` started so that the kernel kills it if the thread starting it dies (the parent killed at a
    reward's time limit, say): nothing of the run outlives its caller."""
    return [plan.setpriv, "--pdeathsig", "KILL", *argv] if plan.setpriv else argv


def _start_checker(spec: CheckSpec, limits: SandboxLimits, plan: _Plan, folder: str, call_fd: int,
                   reply_fd: int, verdict_fd: int):
    """The checker, forked by the checker server when it can, else in a fresh interpreter."""
    boot, _, modules = _child_code()
    payload = {
        "spec": {"prelude": spec.prelude, "test": spec.test, "functions": list(spec.functions),
                 "modules": list(spec.modules), "remote_names": list(spec.remote_names),
                 "constructors": list(spec.constructors)},
        "folder": folder,
        "rlimits": {"cpu": max(1, int(-(-limits.effective_cpu_s // 1))) + 1,
                    "as": (int(limits.memory_mb) + _CHECKER_MEMORY_HEADROOM_MB) * 1024 * 1024},
    }
    output_r, output_w = os.pipe()
    payload_fd = _payload_fd((), "", payload, raw=True)
    try:
        pidfd = _CHECKER_SERVER.fork_checker(payload_fd, [call_fd, reply_fd, verdict_fd, output_w])
    finally:
        os.close(payload_fd)
        os.close(output_w)
    if pidfd is not None:
        return _ForkedChecker(pidfd, output_r)
    os.close(output_r)
    payload.update(call_fd=call_fd, reply_fd=reply_fd, verdict_fd=verdict_fd, site_paths=_site_paths())
    payload_fd = _payload_fd(modules, "code_checker", payload)
    try:
        proc = subprocess.Popen(
            _die_with_this_thread(plan, [sys.executable, "-S", "-s", "-B", "-c", boot, str(payload_fd)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=folder,
            env=_clean_env(folder), pass_fds=(payload_fd, call_fd, reply_fd, verdict_fd), start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(payload_fd)
    return _SpawnedChecker(proc)


def _stop_program(program: _Program, cgroups, uid, plan) -> None:
    """Kill the program's whole tree."""
    _kill_tree(program.proc, cgroups, uid if not plan.namespaces else None, plan.namespaces)
    try:
        program.proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass


class _Outputs:
    """Reads every output pipe of a run without blocking, keeping at most a cap of each."""

    def __init__(self, streams: dict[int, str], caps: dict[str, int]):
        self.streams, self.caps = streams, caps
        self.data = {name: bytearray() for name in caps}
        self.overflow = {name: False for name in caps}
        self.selector = selectors.DefaultSelector()
        for fd in streams:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)

    def open(self, name: str) -> bool:
        return any(self.streams[key.fd] == name for key in self.selector.get_map().values())

    def read(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.selector.unregister(key.fd)
                continue
            name = self.streams[key.fd]
            room = self.caps[name] - len(self.data[name])
            if room > 0:
                self.data[name] += chunk[:room]
            if len(chunk) > max(room, 0):
                self.overflow[name] = True

    def read_until(self, done, deadline: float) -> bool:
        """Read until ``done()`` or the deadline; whether ``done()`` came first."""
        while not done():
            now = time.monotonic()
            if now >= deadline:
                return False
            self.read(min(deadline - now, 0.05))
        return True

    def text(self, name: str) -> str:
        return bytes(self.data[name]).decode("utf-8", "replace")

    def close(self) -> None:
        self.selector.close()


def _supervise(program: _Program, checker, verdict_r: int, limits: SandboxLimits, deadline: float,
               start: float, cgroups: dict[str, Path], uid: int | None, plan: _Plan,
               oom_before: int) -> ExecutionResult:
    cap = int(limits.max_output_bytes)
    outputs = _Outputs({**program.outputs, **checker.outputs, verdict_r: "verdict"},
                       {"stdout": cap, "stderr": cap, "checker": cap, "verdict": _VERDICT_CAP})
    try:
        timed_out = not outputs.read_until(lambda: not outputs.open("verdict"), deadline)
        verdict = None if timed_out else _parse_verdict(bytes(outputs.data["verdict"]))
        if verdict is not None and verdict[0] == "died":  # let its exit status arrive (for the reason)
            outputs.read_until(lambda: _exited_without_reaping(program.proc.pid), min(deadline, time.monotonic() + 0.2))
        exited_alone = _exited_without_reaping(program.proc.pid)
        if not timed_out:  # it normally exits right after its goodbye: keep its last output
            outputs.read_until(lambda: not outputs.open("stdout") and not outputs.open("stderr"),
                               min(deadline, time.monotonic() + _EXIT_GRACE_S))
        _stop_program(program, cgroups, uid, plan)
        checker.kill()
        drain_end = time.monotonic() + 0.2
        outputs.read_until(lambda: not outputs.selector.get_map(), drain_end)
    finally:
        outputs.close()
        for stream in (program.proc.stdout, program.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    rc = program.proc.returncode

    def make(passed: bool, status: str, reason: str) -> ExecutionResult:
        return ExecutionResult(passed, status, rc, outputs.text("stdout"), outputs.text("stderr"),
                               time.monotonic() - start, reason, outputs.overflow["stdout"],
                               outputs.overflow["stderr"], outputs.text("checker"))

    oom = oom_before >= 0 and _oom_kills(cgroups) > oom_before or oom_before < 0 and _memory_failures(cgroups) > 0
    if timed_out:
        return make(False, "timeout", f"exceeded the wall-clock limit of {limits.timeout_s:g} s")
    if verdict is None:
        tail = outputs.text("checker").strip().splitlines()[-3:]
        return make(False, "error", "the checker ended without a verdict" + (": " + " | ".join(tail) if tail else ""))
    kind, reason = verdict
    if kind == "pass" and checker.exited_cleanly():
        return make(True, "passed", "")
    if kind == "error":
        return make(False, "error", reason)
    if exited_alone and rc is not None and rc < 0 or oom:
        return make(False, "killed", f"{_signal_reason(rc, oom, limits)} ({reason})")
    if kind == "died" and exited_alone and rc is not None:
        return make(False, "failed", f"{reason}; exit status {rc}")
    return make(False, "failed", reason or "the checker gave no reason")


def _parse_verdict(data: bytes) -> tuple[str, str] | None:
    try:
        message = sandbox_protocol.parse_message(data)
    except sandbox_protocol.ProtocolError:
        return None
    kind, reason = message.get("verdict"), message.get("reason")
    if kind not in ("pass", "fail", "died", "error") or not isinstance(reason, str):
        return None
    return kind, reason


def _signal_reason(rc: int | None, oom: bool, limits: SandboxLimits) -> str:
    if oom:
        return "memory limit of the run exceeded (killed by the OOM killer)"
    sig = -rc if rc is not None else 0
    if sig == signal.SIGXCPU:
        return f"CPU time limit of {limits.effective_cpu_s:g} s exceeded"
    if sig == signal.SIGKILL:
        return "killed by SIGKILL (CPU hard limit, memory limit or the sandbox)"
    try:
        return f"killed by {signal.Signals(sig).name}"
    except ValueError:
        return f"killed by signal {sig}"


def _error(reason: str, start: float) -> ExecutionResult:
    return ExecutionResult(False, "error", None, "", "", time.monotonic() - start, reason)


# --------------------------------------------------------------------------------------------------------
# Isolation probing (once per process).
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    namespaces: bool = False  # with them, the allow-listed root (the mount namespace is what makes it)
    drop_uid: bool = False
    cgroups: dict = field(default_factory=dict)  # controller -> Path of the parent of every run's fresh cgroup
    unshare: str | None = None
    setpriv: str | None = None  # util-linux setpriv, if it can set a parent-death signal
    arch: str | None = None  # "x86_64" or "aarch64": the system-call tables this module has
    seccomp: bytes | None = None  # the system-call filter the harness installs
    missing: dict = field(default_factory=dict)  # layer -> why it is missing

    @property
    def keyctl(self) -> int | None:
        """The keyctl system call's number, where known (the harness empties the run uid's keyrings with it)."""
        return _SYSCALLS[self.arch]["keyctl"] if self.arch else None

    @property
    def pivot_root(self) -> int | None:
        return _SYSCALLS[self.arch]["pivot_root"] if self.arch else None


_PLAN: _Plan | None = None
_PLAN_LOCK = threading.Lock()
_WARNED = False
_NAMESPACE_LAYERS = ("network_namespace", "pid_namespace", "mount_namespace", "ipc_namespace", "uts_namespace",
                     "allow_listed_root")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
"""The devices of the allow-listed root. None keeps what is written to it where a later read finds it: the sinks
drop it, and the random devices hash it into the kernel's pool."""


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return None


def _runs(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10, env={"PATH": _SAFE_PATH}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _interpreter_reachable_by_others() -> bool:
    targets = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))}
    for target in targets:
        cur = "/"
        for part in [p for p in target.split("/") if p]:
            try:
                if not os.stat(cur).st_mode & 0o001:
                    return False
            except OSError:
                return False
            cur = os.path.join(cur, part)
    return True


def _seccomp_filter(arch: str) -> bytes:
    """The system-call filter of every program (classic BPF over ``struct seccomp_data``), installed by the
    harness as its last act: the calls in ``_DENIED_SYSCALLS`` fail with their errno, ``clone``/``unshare``
    with a namespace flag fail with EPERM, every call of another ABI (32-bit ``int 0x80``, x32) fails with
    ENOSYS because its numbers name other calls, and everything else is allowed."""
    import errno

    def insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("<HBBI", code, jt, jf, k)

    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow = 0x7FFF0000

    def fail(name: str) -> int:
        return 0x00050000 | getattr(errno, name)  # SECCOMP_RET_ERRNO

    numbers = _SYSCALLS[arch]
    program = [insn(load, 4), insn(jeq, _AUDIT_ARCH[arch], jt=1), insn(ret, fail("ENOSYS")), insn(load, 0)]
    if arch == "x86_64":  # x32 system calls are the same numbers with bit 30 set
        program += [insn(jge, 0x40000000, jf=1), insn(ret, fail("ENOSYS"))]
    for name, error in sorted(_DENIED_SYSCALLS.items()):
        program += [insn(jeq, numbers[name], jf=1), insn(ret, fail(error))]
    for name in ("clone", "unshare"):  # their flags are the first argument (its low 32 bits at offset 16)
        program += [insn(jeq, numbers[name], jf=4), insn(load, 16), insn(jset, _NAMESPACE_FLAGS, jf=1),
                    insn(ret, fail("EPERM")), insn(ret, allow)]
    program.append(insn(ret, allow))
    return b"".join(program)


def _elf_interpreter(executable: str) -> str | None:
    """The dynamic loader an ELF executable names (its ``PT_INTERP``), which must exist for it to start again
    inside the sandbox (a program running ``sys.executable``); None for what is not a 64-bit ELF file."""
    try:
        with open(executable, "rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
                return None
            order = "<" if header[5] == 1 else ">"
            phoff, = struct.unpack_from(order + "Q", header, 0x20)
            entry_size, count = struct.unpack_from(order + "HH", header, 0x36)
            for index in range(count):
                f.seek(phoff + index * entry_size)
                kind, _flags, offset, _vaddr, _paddr, size = struct.unpack(order + "IIQQQQ", f.read(40))
                if kind == 3:  # PT_INTERP
                    f.seek(offset)
                    return f.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


_LIBRARY_PROBE = """
import os, sys
for folder in [p for p in sys.path if p.endswith("lib-dynload")]:
    for name in sorted(os.listdir(folder)):
        if name.endswith(".so"):
            try:
                __import__(name.split(".")[0])
            except BaseException:
                pass
with open("/proc/self/maps") as maps:
    print("\\n".join(sorted({line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6})))
"""
"""Imports every extension module of the standard library in a fresh interpreter and lists the files it then has
mapped: the shared libraries the interpreter and its standard library load."""


def _library_folders() -> set[str]:
    """The folders of the shared libraries the interpreter loads (``libc``, ``libffi``, ``libssl``...: found by
    ``_LIBRARY_PROBE``), and the system's multiarch library folders, where an extension module of
    site-packages finds the libraries it links against."""
    folders = set()
    try:
        mapped = subprocess.run([sys.executable, "-I", "-S", "-c", _LIBRARY_PROBE], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60, env={"PATH": _SAFE_PATH}).stdout
    except (OSError, subprocess.SubprocessError):
        mapped = ""
    for path in mapped.splitlines():
        if path.startswith("/") and ".so" in os.path.basename(path):
            folders.add(os.path.dirname(path))
    multiarch = getattr(sys.implementation, "_multiarch", None)
    if multiarch:
        folders.update(f"{prefix}/{multiarch}" for prefix in ("/lib", "/usr/lib", "/usr/local/lib"))
    return {folder for folder in folders if os.path.isdir(folder)}


@functools.lru_cache(maxsize=None)
def allow_list() -> tuple[str, ...]:
    """What of the host a sandboxed program can see, read-only, beside its private working directory, its
    private ``/dev/shm``, an empty ``/proc`` and the devices ``/dev/null``, ``/dev/zero``, ``/dev/full``,
    ``/dev/random`` and ``/dev/urandom``: the interpreter (every link on the way to it and its dynamic loader),
    its standard library and site-packages folders, the folders of the shared libraries they load, the
    loader's cache and a virtual environment's ``pyvenv.cfg``. Ordered by real path, so that a folder comes
    before what lies inside it. Nothing else of the host exists inside: not the benchmarks' files (wherever
    they are), ``/sys``, ``/etc``, ``/tmp``, ``/home`` or the project's folder."""
    import sysconfig

    paths = {sys.executable, os.path.realpath(sys.executable)}
    loader = _elf_interpreter(os.path.realpath(sys.executable))
    if loader:
        paths.add(loader)
    for key in ("stdlib", "platstdlib"):
        paths.add(sysconfig.get_path(key))
    paths.update(p for p in sys.path if p.endswith(("lib-dynload", ".zip")) and os.path.exists(p))
    paths.update(_site_paths())
    paths.update(p for p in (os.path.join(sys.prefix, "pyvenv.cfg"), "/etc/ld.so.cache") if os.path.isfile(p))
    paths.update(_library_folders())
    existing = {os.path.normpath(p) for p in paths if p and os.path.exists(p)}
    return tuple(sorted(existing, key=lambda p: (os.path.realpath(p), p)))


def _cgroup_parent(controller: str) -> Path | None:
    root = _CGROUP_ROOT / controller
    if not (root / "cgroup.procs").is_file():
        return None
    parent = root / _CGROUP_PARENT
    try:
        parent.mkdir(exist_ok=True)
    except OSError:
        return None
    needed = {"pids": "pids.max", "memory": "memory.limit_in_bytes"}[controller]
    probe = parent / f"probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        ok = (probe / needed).is_file()
        probe.rmdir()
    except OSError:
        return None
    return parent if ok else None


def _build_plan() -> _Plan:
    plan = _Plan()
    is_root = os.geteuid() == 0
    plan.unshare = _find_tool("unshare")
    plan.setpriv = _find_tool("setpriv")
    if plan.setpriv is not None and not _runs([plan.setpriv, "--pdeathsig", "KILL", "true"]):
        plan.setpriv = None
    if plan.setpriv is None:
        plan.missing["parent_death_signal"] = "util-linux setpriv with --pdeathsig is not installed"
    plan.arch = _ARCHES.get(platform.machine().lower())
    if plan.arch is None:
        why = f"this module has no system-call table for {platform.machine()}"
        plan.missing["private_keyrings"] = plan.missing["syscall_filter"] = why
    elif "Seccomp:" not in Path("/proc/self/status").read_text():
        plan.missing["syscall_filter"] = "the kernel has no seccomp filters"
    else:
        plan.seccomp = _seccomp_filter(plan.arch)
    if not is_root:
        plan.missing["namespaces"] = "not running as root"
    elif plan.unshare is None:
        plan.missing["namespaces"] = "the unshare command (util-linux) is not installed"
    else:
        try:
            probe = subprocess.run(
                [plan.unshare, *_NAMESPACES, "--fork", "--kill-child", "--propagation", "private", "true"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10,
                env={"PATH": _SAFE_PATH},
            )
            if probe.returncode == 0:
                plan.namespaces = True
            else:
                plan.missing["namespaces"] = f"unshare failed: {probe.stderr.decode(errors='replace').strip()}"
        except (OSError, subprocess.SubprocessError) as error:
            plan.missing["namespaces"] = f"unshare failed: {error}"
    if not is_root:
        plan.missing["unprivileged_uid"] = "not running as root (cannot switch to a per-run uid)"
    elif plan.namespaces or _interpreter_reachable_by_others():
        plan.drop_uid = True
    else:
        plan.missing["unprivileged_uid"] = (
            f"the interpreter under {sys.base_prefix} is not readable by other users and there is no "
            "mount namespace to expose it")
    for controller in ("pids", "memory"):
        parent = _cgroup_parent(controller) if is_root else None
        if parent is not None:
            plan.cgroups[controller] = parent
        else:
            plan.missing[f"{controller}_cgroup"] = (
                "not running as root" if not is_root else f"no writable cgroup v1 '{controller}' hierarchy "
                f"under {_CGROUP_ROOT}")
    if "namespaces" in plan.missing:
        why = plan.missing.pop("namespaces")
        for layer in _NAMESPACE_LAYERS:
            plan.missing[layer] = why
    return plan


def _trial(plan: _Plan) -> ExecutionResult:
    return _run("import os\nassert os.getcwd()\n", CheckSpec(), SandboxLimits(timeout_s=20), plan)


def _get_plan() -> _Plan:
    global _PLAN, _WARNED
    with _PLAN_LOCK:
        if _PLAN is None:
            plan = _build_plan()
            result = _trial(plan)
            if not result.passed and plan.seccomp is not None:
                plan.seccomp = None
                plan.missing["syscall_filter"] = f"a trial run with the system-call filter failed: {result.reason}"
                result = _trial(plan)
            if not result.passed and plan.drop_uid:
                plan.drop_uid = False
                plan.missing["unprivileged_uid"] = f"a trial run with a per-run uid failed: {result.reason}"
                result = _trial(plan)
            if not result.passed and plan.namespaces:
                plan.namespaces = False
                for layer in _NAMESPACE_LAYERS:
                    plan.missing[layer] = f"a trial run in namespaces failed: {result.reason}"
                result = _trial(plan)
            if not result.passed and plan.cgroups:
                for controller in list(plan.cgroups):
                    plan.missing[f"{controller}_cgroup"] = f"a trial run in a cgroup failed: {result.reason}"
                plan.cgroups.clear()
                result = _trial(plan)
            if not result.passed:
                logger.error("dare_gym sandbox: even a trivial program does not pass: %s", result.reason)
            _PLAN = plan
            if plan.missing and not _WARNED:
                _WARNED = True
                detail = "; ".join(f"{layer}: {why}" for layer, why in plan.missing.items())
                message = f"dare_gym sandbox runs with reduced isolation. Missing layers: {detail}"
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                logger.warning(message)
        return _PLAN


def isolation_report() -> dict:
    """Which isolation layers are active on this machine, and why any is missing.

    Probes once per process (with a trial run) and caches the answer. Keys: ``root``, ``fresh_process``,
    ``new_session``, ``network_namespace``, ``pid_namespace``, ``mount_namespace``, ``allow_listed_root`` (the
    program's root holds only :func:`allow_list`, read-only, a private tmpfs working directory and
    ``/dev/shm``, an empty ``/proc`` and five devices), ``allow_list`` (those paths, or None), ``ipc_namespace``,
    ``uts_namespace``, ``unprivileged_uid``, ``private_keyrings`` (no key of one run reaches another),
    ``syscall_filter`` (the seccomp filter: no keys, namespaces or mounts), ``pids_cgroup``, ``memory_cgroup``,
    ``fresh_cgroups`` (every run gets new cgroups, removed after it, so their counters start at zero),
    ``rlimits`` (list),
    ``clean_env``, ``parent_death_signal``, ``separate_checker`` (the tests run in another process than the
    program), ``checker_server`` (checkers are forked by the server rather than started fresh),
    ``verdict_isolated`` (the program can reach neither the checker nor the parent: a per-run uid or a pid
    namespace), ``shared_namespaces`` (namespace -> why sharing it is safe), ``unshare``, ``missing``
    (layer -> reason).
    """
    plan = _get_plan()
    return {
        "root": os.geteuid() == 0,
        "fresh_process": True,
        "new_session": True,
        **{layer: plan.namespaces for layer in _NAMESPACE_LAYERS},
        "allow_list": list(allow_list()) if plan.namespaces else None,
        "unprivileged_uid": plan.drop_uid,
        "private_keyrings": plan.seccomp is not None or plan.keyctl is not None,
        "syscall_filter": plan.seccomp is not None,
        "pids_cgroup": "pids" in plan.cgroups,
        "memory_cgroup": "memory" in plan.cgroups,
        "fresh_cgroups": bool(plan.cgroups),
        "rlimits": ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"],
        "clean_env": True,
        "parent_death_signal": plan.setpriv is not None,
        "separate_checker": True,
        "checker_server": _CHECKER_SERVER.unavailable is None,
        "verdict_isolated": plan.drop_uid or plan.namespaces,
        "shared_namespaces": {
            "user": "the program is an unprivileged uid without capabilities, and the system-call filter denies "
                    "it namespaces of its own" if plan.seccomp is not None else
                    "the program is an unprivileged uid without capabilities; user namespaces it makes give it "
                    "power only over namespaces it owns",
            "cgroup": "the allow-listed root has no /sys and an empty /proc: no cgroup file is in sight, and "
                      "every run's cgroups are new",
            "time": "setting a clock needs CAP_SYS_TIME; nothing of one run reaches another",
        } if plan.namespaces else {},
        "unshare": plan.unshare,
        "missing": dict(plan.missing),
    }


# --------------------------------------------------------------------------------------------------------
# Per-run resources: uid slots, cgroups, cleanup.
# --------------------------------------------------------------------------------------------------------


class _UidPool:
    """Hands out uids unique among concurrent runs of every process on this host: a slot is held by binding
    an abstract unix socket named after it (released by the kernel when the holder closes it or dies)."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self) -> tuple[int, socket.socket]:
        """The lowest free slot and the socket that holds it."""
        with self._lock:
            for slot in range(_UID_SLOTS):
                uid = _UID_BASE + slot
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(f"\0dare_gym_sandbox/uid/{uid}")
                except OSError:
                    sock.close()
                    continue
                try:
                    pwd.getpwuid(uid)
                    sock.close()  # a real account owns this uid: skip it
                    continue
                except KeyError:
                    pass
                return uid, sock
        raise RuntimeError("no free sandbox uid slot")


_UID_POOL = _UidPool()


_FOLDER_PREFIXES = ("dare_gym_sandbox_", "dare_gym_checker_")  # the program's working folder, the checker's


def _slot_folders(uid: int) -> tuple[str, str]:
    """Fresh working folders for the program and the checker of a run holding ``uid``'s slot, named after the
    slot. A run whose caller was killed (a reward's helper process at its time limit) never reaches its
    cleanup: as the slot is exclusive to this run, any folder named after it is such a run's, removed here."""
    tmp = tempfile.gettempdir()
    stale = tuple(f"{prefix}{uid}_" for prefix in _FOLDER_PREFIXES)
    for name in os.listdir(tmp):
        if name.startswith(stale):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    workdir, checker_dir = (tempfile.mkdtemp(prefix=f"{prefix}{uid}_") for prefix in _FOLDER_PREFIXES)
    return workdir, checker_dir


def _run_cgroups(plan: _Plan, limits: SandboxLimits, uid: int) -> dict[str, Path]:
    """New cgroups for one run, named after its uid slot: every counter in them (memory high-water mark,
    failures, OOM kills, task events) starts at zero, so nothing one run does to them is there for the next;
    :func:`_remove_cgroups` deletes them after the run. Cgroups a killed caller left behind for this slot are
    removed first (the slot is exclusive to this run, see :class:`_UidPool`)."""
    made: dict[str, Path] = {}
    try:
        for controller, parent in plan.cgroups.items():
            for stale in parent.glob(f"run-{uid}-*"):
                _remove_cgroups({controller: stale})
            path = parent / f"run-{uid}-{secrets.token_hex(6)}"
            path.mkdir()
            made[controller] = path
            if controller == "pids":
                (path / "pids.max").write_text(str(int(limits.max_processes) + 1))  # + the harness
                continue
            # headroom above the per-process RLIMIT_AS: one process gets a clean MemoryError; the cgroup only
            # stops trees of processes (and the tmpfs working directory and /dev/shm, charged here too)
            limit = str((int(limits.memory_mb) + 2 * int(limits.workdir_mb) + _CGROUP_HEADROOM_MB) * 1024 * 1024)
            memsw = path / "memory.memsw.limit_in_bytes"
            files = [path / "memory.limit_in_bytes"] + ([memsw] if memsw.exists() else [])
            for name in files * 2:  # memsw >= limit must hold at every step: one of the two orders works
                try:
                    name.write_text(limit)
                except OSError:
                    pass
            if int((path / "memory.limit_in_bytes").read_text()) != int(limit):
                raise OSError(f"could not set the memory limit of {path}")
            try:
                (path / "memory.swappiness").write_text("0")
            except OSError:
                pass
    except BaseException:
        _remove_cgroups(made)
        raise
    return made


def _remove_cgroups(cgroups: dict[str, Path], budget_s: float = 1.0) -> None:
    """Kill every task of the run's cgroups and delete them. A cgroup whose last tasks are still being torn
    down refuses for a moment (EBUSY); one still there after ``budget_s`` is left for the next run of the slot."""
    end = time.monotonic() + budget_s
    for path in cgroups.values():
        while True:
            _kill_cgroups({"": path}, budget_s=max(0.0, end - time.monotonic()))
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > end:
                    logger.warning("dare_gym sandbox: could not remove cgroup %s yet", path)
                    break
                time.sleep(0.002)


def _cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_cgroups(cgroups: dict[str, Path], budget_s: float = 1.0) -> None:
    end = time.monotonic() + budget_s
    for path in cgroups.values():
        while True:
            pids = _cgroup_pids(path)
            if not pids or time.monotonic() > end:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.002)


def _oom_kills(cgroups: dict[str, Path]) -> int:
    """OOM kills so far in the memory cgroup (compared before/after a run), or -1 if unknown."""
    path = cgroups.get("memory")
    if path is None:
        return -1
    try:
        for line in (path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _memory_failures(cgroups: dict[str, Path]) -> int:
    path = cgroups.get("memory")
    try:
        return int((path / "memory.failcnt").read_text()) if path is not None else 0
    except (OSError, ValueError):
        return 0


def _kill_uid(uid: int) -> None:
    """Fallback without pid namespace and cgroups: kill every process that runs as the run's unique uid."""
    for _ in range(20):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found = True
                                os.kill(int(entry), signal.SIGKILL)
                            break
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.005)


def _site_paths() -> list[str]:
    """The parent's site-packages folders: the child starts without ``site`` (``-S``, much faster), so they are
    put on its ``sys.path`` directly (``.pth`` files are not processed)."""
    return [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def _clean_env(workdir: str) -> dict[str, str]:
    path = os.pathsep.join([os.path.dirname(sys.executable), _SAFE_PATH])
    return {
        "PATH": path,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONNOUSERSITE": "1",
    }


def _exited_without_reaping(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process on the host (one pass over /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return parents


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_descendants(root: int) -> None:
    """Fallback without pid namespace and cgroups: stop the whole tree under ``root`` (so that nothing forks
    or re-parents away meanwhile), then kill it. Orphans come back to the harness (a child subreaper) while it
    lives, so a ``setsid`` daemon is still found here."""
    stopped: set[int] = set()
    for _ in range(10):
        new = (_descendants(root) | {root}) - stopped
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except (ProcessLookupError, PermissionError):
                pass
        stopped |= new
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_tree(proc: subprocess.Popen, cgroups: dict[str, Path], uid: int | None, namespaces: bool) -> None:
    """Kill everything of the run. The harness (and with it the whole pid namespace) goes first, so that
    ``unshare`` reaps it and exits by itself; killing ``unshare`` first would leave the harness a zombie for
    the host's init to reap. Then the whole process group, the cgroups once more, and the uid (fallback)."""
    if proc.returncode is None and not _exited_without_reaping(proc.pid):
        if cgroups:
            _kill_cgroups(cgroups, budget_s=0.5)
        elif namespaces:
            for child in _descendants(proc.pid):  # the harness: its namespace dies with it
                try:
                    os.kill(child, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        else:
            _kill_descendants(proc.pid)
        end = time.monotonic() + 0.2
        while time.monotonic() < end and not _exited_without_reaping(proc.pid):
            time.sleep(0.002)
    if proc.returncode is None:  # not reaped yet: the pid (and so the process group id) is still ours
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if cgroups:
        _kill_cgroups(cgroups, budget_s=0.3)
    if uid is not None:
        _kill_uid(uid)
