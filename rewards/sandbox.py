"""Run untrusted Python programs (model completions plus their tests) in a sandbox and decide PASS soundly.

Every program runs in a FRESH process, started for it alone, and everything it leaves behind is killed.

Isolation layers, strongest first (what is active on this machine: :func:`isolation_report`):

* **Namespaces** (root + util-linux ``unshare``): a new network namespace (only a downed loopback: no
  connection to the internet, to the host's localhost, or to the host's abstract unix sockets), a new pid
  namespace whose init is the trusted harness (when it exits, the kernel kills every process of the run,
  double-forked daemons included; the program cannot see or signal the host's processes), and a new mount
  namespace in which every mount is made read-only, the working directory is a private, size-limited tmpfs
  owned by the run's uid (it vanishes with the run), ``/proc`` is covered by an empty tmpfs, and any
  ``SandboxLimits.hidden_paths`` are covered too. Directories that the unprivileged uid cannot traverse on the
  way to the interpreter (``/root`` for a pyenv install) are replaced, inside the namespace only, by a tmpfs
  that holds nothing but the interpreter's own directory: the rest of them stays hidden.
* **An unprivileged uid/gid**, unique per concurrent run (claimed through an abstract unix socket, so two
  processes on one host never share one): ``RLIMIT_NPROC`` binds (it does not bind root), no capabilities,
  ``no_new_privs``, no way to signal the host's processes, no write access to anything the run does not own.
* **cgroups v1** (``pids`` and ``memory``): a per-run cgroup caps the number of tasks of the whole tree (for
  root too) and its total memory (tmpfs included); at the end every task still in it is killed.
* **rlimits** in the child: CPU seconds, address space, processes, file size, open files, no core files.
* **Always**: a new session/process group (the whole group is SIGKILLed at the end and on timeout), an
  environment built from scratch (nothing of the parent's), a private temporary working directory removed
  afterwards, stdin from ``/dev/null``, capped stdout/stderr, and a wall-clock deadline owned by the parent.

Where a layer is missing (not root, no ``unshare``, no cgroup v1 controllers) the next ones still apply and a
ONE-TIME warning names exactly what is missing. Without a pid namespace nor cgroups, the harness is a child
subreaper (orphans stay in its tree); on timeout the parent stops and kills that tree (found through ``/proc``),
the harness kills what the program left when it reports a failure, and with a per-run uid every process of that
uid is killed too. The hole left in that weakest mode: a program that detaches a ``setsid`` daemon and then
leaves through ``os._exit`` (bypassing the harness) keeps the daemon alive unless a per-run uid is in use.

Deciding PASS (threat model). Exit status and printed text are under the program's control, so they are never
enough. The parent writes a random per-run token into a sealed memfd; the trusted harness (the child's main
script) reads it straight into an anonymous page with ``readv`` (it never becomes a Python object), marks the
page ``PROT_NONE`` and ``MADV_DONTFORK``, closes the memfd and every other descriptor except a dedicated result
pipe, installs an audit hook, and only then compiles and ``exec``\\ s the program in a fresh ``__main__``
module. Only if ``exec`` returns normally, in the original process, with no thread and no child process left
running, does the harness unprotect the page, write the token to the result pipe and ``os._exit(0)``. The
parent counts a pass only if exactly the token arrived, the run exited with status 0, and no limit was hit.
So ``sys.exit(0)``, ``os._exit(0)``, ``raise SystemExit``, ``atexit`` tricks, printed markers, garbage written
to any descriptor, a forked child reaching the end of the program, or threads/processes left behind all score
as not passed. The audit hook always refuses ``sys.settrace``/``sys.setprofile`` (a trace function could jump
over the tests), the ``gc`` object walkers, sub-interpreters and opening a file named ``mem``; it refuses
``ctypes`` symbol look-ups and raw-address reads unless they come from the harness's own frame.

Known limits, stated honestly: the harness and the program share one interpreter, so a program that
deliberately attacks the interpreter's memory (for instance by rebuilding a native function pointer to
``mprotect`` from addresses leaked through ``ctypes`` and the libc image on disk, then reading the token page)
can forge a pass; so can a kernel exploit. Without the mount namespace a symlink to ``/proc/self/mem`` is only
caught by a path check. The verdict is about the program, not about intent: a completion that games the tests
(e.g. returns an object whose ``__eq__`` is always true) passes. Files readable by every user stay readable
(hide them with ``hidden_paths``). Programs that need the network, write outside their working directory, use
``sys.settrace``, or leave threads or processes running are scored as failed by design.
"""

from __future__ import annotations

import logging
import marshal
import os
import pwd
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["SandboxLimits", "ExecutionResult", "run_program", "run_programs", "isolation_report"]

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
_RESULT_CAP = 4096
_UID_BASE = 1_870_000_000  # far above any login uid and the usual subuid ranges
_UID_SLOTS = 4096
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_PARENT = "dare_gym_sandbox"
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CGROUP_HEADROOM_MB = 128
_EXIT_GRACE_S = 0.25  # how long pipes may stay open after the main process exited (fallback mode only)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run.

    ``timeout_s``: wall-clock limit, owned by the parent (the run is killed at the deadline).
    ``cpu_s``: CPU seconds per process (``RLIMIT_CPU``); ``None`` means ``timeout_s``.
    ``memory_mb``: address space per process (``RLIMIT_AS``); with the memory cgroup, the whole tree may use
    ``memory_mb + workdir_mb + 128`` MB of RAM (tmpfs included) before the OOM killer stops it.
    ``max_processes``: tasks (processes and threads) of the run: pids cgroup and ``RLIMIT_NPROC``.
    ``max_output_bytes``: what is kept of stdout and of stderr each; the rest is read and dropped.
    ``workdir_mb``: size of the private working directory (tmpfs) and ``RLIMIT_FSIZE``.
    ``hidden_paths``: directories covered by an empty read-only tmpfs inside the run (e.g. a benchmark's
    answer key); needs the mount namespace, ignored otherwise.
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


@dataclass
class ExecutionResult:
    """Outcome of one run.

    ``status`` is one of ``"passed"``, ``"failed"`` (the program raised, exited early or misbehaved),
    ``"timeout"`` (wall-clock limit), ``"killed"`` (by a signal: memory, CPU or process limits) or
    ``"error"`` (the sandbox itself could not run the program). ``reason`` says why it did not pass.
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


# --------------------------------------------------------------------------------------------------------
# The trusted harness: the child's main script (``python -S -s -B -c _HARNESS <config fd> <result fd>``).
# --------------------------------------------------------------------------------------------------------

_HARNESS = r'''
import os, sys

def _main():
    cfg_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    write, _exit, getpid = os.write, os._exit, os.getpid

    def setup_error(message):
        try:
            write(result_fd, ("ERROR:" + message).encode("utf-8", "replace")[:4000])
        finally:
            _exit(3)

    try:
        import ctypes, marshal, signal, builtins, types, threading, _thread
        import mmap as _mmap
        libc = ctypes.CDLL(None, use_errno=True)
        fn = lambda name, res, args: _setfn(libc._FuncPtr((name, libc)), res, args)
        c = ctypes
        mmap_ = fn("mmap", c.c_void_p, [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long])
        mprotect = fn("mprotect", c.c_int, [c.c_void_p, c.c_size_t, c.c_int])
        madvise = fn("madvise", c.c_int, [c.c_void_p, c.c_size_t, c.c_int])
        page = _mmap.PAGESIZE
        addr = mmap_(None, page, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
        if not addr or addr == c.c_void_p(-1).value:
            raise OSError("mmap of the token page failed")
        token_len = 32
        if os.readv(cfg_fd, [(c.c_char * token_len).from_address(addr)]) != token_len:
            raise OSError("short read of the run token")
        madvise(addr, page, 10)  # MADV_DONTFORK: forked children do not get the page
        if mprotect(addr, page, 0) != 0:  # PROT_NONE
            raise OSError("mprotect of the token page failed")
        del mprotect, mmap_, madvise, fn
        data = bytearray()
        while True:
            chunk = os.read(cfg_fd, 1 << 20)
            if not chunk:
                break
            data += chunk
        os.close(cfg_fd)
        size = int.from_bytes(data[:4], "little")
        header, body = bytes(data[4:4 + size]), bytes(data[4 + size:])
        del data
        cfg = marshal.loads(header)
        source = body.decode("utf-8", "surrogatepass")
        sys.path.extend(p for p in cfg["site_paths"] if p not in sys.path)
        program_path = _setup(cfg, libc, source)
    except BaseException as error:
        setup_error(f"sandbox setup failed: {type(error).__name__}: {error}")

    harness_pid = getpid()
    count_threads = _thread._count
    shutdown_threads = getattr(threading, "_shutdown", None)
    waitpid, WNOHANG, WALL = os.waitpid, os.WNOHANG, 0x40000000
    sigmask, all_signals = signal.pthread_sigmask, signal.valid_signals()
    stdout, stderr = sys.stdout, sys.stderr
    char_array = c.c_char * token_len
    thread_errors = []
    # everything used after the program ran is a local of this frame (the program can rebind globals)
    setfn, sleep, describe, kill_descendants, printexc = _setfn, _sleep, _describe, _kill_descendants, print_exc
    monotonic = __import__("time").monotonic

    def report(kind, message, code):
        if getpid() != harness_pid:  # a forked child of the program: only the harness speaks
            _exit(code)
        if harness_pid != 1:  # no pid namespace to clean up after us: kill what the program left
            try:
                kill_descendants(harness_pid)
            except BaseException:
                pass
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            write(result_fd, (kind + ":" + message).encode("utf-8", "replace")[:4000])
        except BaseException:
            pass
        _exit(code)

    def excepthook(args):
        thread_errors.append(f"{args.exc_type.__name__} in thread {getattr(args.thread, 'name', '?')}")
        try:
            printexc(args.exc_type, args.exc_value, args.exc_traceback)
        except BaseException:
            pass

    threading.excepthook = excepthook
    module = types.ModuleType("__main__")
    module.__file__ = program_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [program_path]
    try:
        code = compile(source, program_path, "exec", dont_inherit=True, optimize=0)
    except BaseException as error:
        report("FAIL", _describe(error, program_path, source), 1)
    del source
    _install_audit_hook(sys._getframe(), cfg.get("proc_visible", True))
    try:
        exec(code, module.__dict__)
    except BaseException as error:
        try:
            printexc(type(error), error, error.__traceback__.tb_next)  # without the harness's frame
        except BaseException:
            pass
        report("FAIL", describe(error, program_path, None), 1)
    # -- the program returned normally; from here on only locals of this frame are used --
    if getpid() != harness_pid:
        _exit(0)
    try:
        sigmask(signal.SIG_BLOCK, all_signals)
        if shutdown_threads is not None:
            shutdown_threads()  # what the interpreter does at exit: atexit hooks of threading, join threads
    except BaseException as error:
        report("FAIL", "while joining threads: " + describe(error, program_path, None), 1)
    if thread_errors:
        report("FAIL", "uncaught exception in a thread: " + "; ".join(thread_errors[:5]), 1)
    grace_end = monotonic() + 0.1  # a thread or a child that is just finishing is not "left running"
    while count_threads():
        if monotonic() > grace_end:
            report("FAIL", f"the program left {count_threads()} thread(s) running", 1)
        sleep(0.002)
    while True:
        try:
            pid, _status = waitpid(-1, WNOHANG | WALL)
        except ChildProcessError:
            break  # no child at all: nothing of the program runs any more (orphans come back to us)
        if pid == 0:
            if monotonic() > grace_end:
                report("FAIL", "the program left child processes running", 1)
            sleep(0.002)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    protect = setfn(libc._FuncPtr(("mprotect", libc)), c.c_int, [c.c_void_p, c.c_size_t, c.c_int])
    if protect(addr, page, 1) != 0:  # PROT_READ
        _exit(4)
    try:
        write(result_fd, char_array.from_address(addr))
    except BaseException:
        _exit(4)
    _exit(0)


def _kill_descendants(root):
    import signal
    stopped = set()
    for _ in range(10):
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        stat = f.read()
                    parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        tree, todo = set(), [root]
        while todo:
            parent = todo.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    todo.append(pid)
        new = tree - stopped
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
        stopped |= new
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def print_exc(*args):
    import traceback
    traceback.print_exception(*args)


def _sleep(seconds):
    import time
    time.sleep(seconds)


def _setfn(f, restype, argtypes):
    f.restype, f.argtypes = restype, argtypes
    return f


def _describe(error, program_path, source):
    try:
        name = type(error).__name__
        if isinstance(error, SystemExit):
            return f"SystemExit({error.code!r}): the program exited before it completed"
        if isinstance(error, SyntaxError):
            return f"SyntaxError: {error.msg} (line {error.lineno})"
        text = str(error)
        where = ""
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == program_path:
                import linecache
                line = linecache.getline(program_path, tb.tb_lineno).strip()
                where = f" at line {tb.tb_lineno}" + (f": {line}" if line else "")
            tb = tb.tb_next
        return f"{name}{': ' + text if text else ''}{where}"[:2000]
    except BaseException:
        return "an exception that could not be described"


def _install_audit_hook(harness_frame, proc_visible):
    import _thread
    getframe, basename, realpath, fspath = sys._getframe, os.path.basename, os.path.realpath, os.fspath
    harness_thread = _thread.get_ident()
    get_ident = _thread.get_ident
    always = frozenset({
        "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "cpython.PyInterpreterState_New",
    })
    harness_only = frozenset({
        "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.string_at", "ctypes.wstring_at",
        "ctypes.call_function",
    })

    def hook(event, args):
        if event in always:
            raise RuntimeError(f"{event} is not allowed in the sandbox")
        if event in harness_only:
            if getframe(1) is harness_frame and get_ident() == harness_thread:
                return
            raise RuntimeError(f"{event} is not allowed in the sandbox")
        if event == "open" and args:
            path = args[0]
            if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__"):
                try:
                    path = fspath(path)
                    if isinstance(path, bytes):
                        path = path.decode("utf-8", "replace")
                    names = {basename(path)}
                    if proc_visible:
                        names.add(basename(realpath(path)))
                except Exception:
                    names = set()
                if "mem" in names:
                    raise PermissionError(f"opening {path!r} is not allowed in the sandbox")

    sys.addaudithook(hook)


def _setup(cfg, libc, source):
    """Namespaces, cgroups, mounts, privileges and limits; runs as root when the parent is root."""
    import ctypes, resource
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
    MS_RELATIME = 1 << 21
    workdir, uid, gid = cfg["workdir"], cfg["uid"], cfg["gid"]

    for procs in cfg["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")

    if cfg["mount_ns"]:
        mount = _setfn(libc._FuncPtr(("mount", libc)), ctypes.c_int,
                       [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p])
        enc = lambda s: None if s is None else os.fsencode(s)

        def do_mount(src, target, fstype, flags, data=None):
            if mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount({src!r}, {target!r}, {fstype!r}): {os.strerror(err)}")

        def traversable(path):
            st = os.stat(path)
            if st.st_uid == uid:
                return bool(st.st_mode & 0o100)
            if st.st_gid == gid:
                return bool(st.st_mode & 0o010)
            return bool(st.st_mode & 0o001)

        needed = {os.path.realpath(p) for p in
                  [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                   os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]
                  + [p for p in sys.path if p and os.path.isdir(p)]}
        stash_root = os.path.join(workdir, ".stash")
        os.mkdir(stash_root, 0o700)
        counter = 0
        for _ in range(16):  # open, inside the namespace only, the directories that block the interpreter
            blocker = None
            for target in sorted(needed):
                cur = "/"
                for part in [p for p in target.split("/") if p]:
                    if not traversable(cur):
                        blocker = (cur, part)
                        break
                    cur = os.path.join(cur, part)
                if blocker:
                    break
            if blocker is None:
                break
            directory = blocker[0]
            if directory == "/":
                raise OSError("the root directory is not traversable by the sandbox uid")
            children = sorted({t[len(directory):].lstrip("/").split("/")[0] for t in needed
                               if t.startswith(directory.rstrip("/") + "/")})
            stashed = []
            for child in children:
                src = os.path.join(directory, child)
                stash = os.path.join(stash_root, str(counter))
                counter += 1
                is_dir = os.path.isdir(src)
                os.mkdir(stash) if is_dir else open(stash, "w").close()
                do_mount(src, stash, None, MS_BIND | MS_REC)
                stashed.append((child, stash, is_dir))
            do_mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            for child, stash, is_dir in stashed:
                dest = os.path.join(directory, child)
                os.mkdir(dest) if is_dir else open(dest, "w").close()
                do_mount(stash, dest, None, MS_MOVE)
        else:
            raise OSError("could not make the interpreter reachable for the sandbox uid")

        for hidden in cfg["hidden_paths"]:
            hidden = os.path.realpath(hidden)
            if not os.path.isdir(hidden) or hidden == "/":
                continue
            if any(n == hidden or n.startswith(hidden + "/") for n in needed) or \
                    (workdir + "/").startswith(hidden + "/"):
                continue
            do_mount("tmpfs", hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")

        do_mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                 f"size={int(cfg['workdir_mb'])}m,mode=0700,uid={uid},gid={gid}")
        os.chdir(workdir)

        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read().splitlines()
        def unescape(text):  # mountinfo writes space, tab, newline and backslash as \ooo
            parts = text.split("\\")
            out = parts[0]
            for part in parts[1:]:
                out += chr(int(part[:3], 8)) + part[3:] if part[:3].isdigit() else "\\" + part
            return out
        keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
        for line in mountinfo:
            fields = line.split()
            point, options = unescape(fields[4]), fields[5].split(",")
            if point == workdir:
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for option in options:
                flags |= keep.get(option, 0)
            try:
                do_mount(None, point, None, flags)
            except OSError:
                if point == "/":
                    raise
        do_mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    else:
        os.chdir(workdir)

    program_path = os.path.join(workdir, "program.py")
    fd = os.open(program_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)

    prctl = _setfn(libc._FuncPtr(("prctl", libc)), ctypes.c_int,
                   [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])
    if cfg["drop_uid"]:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("could not drop privileges")
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL (reset by the uid change; set again)
    prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: other processes cannot read this one's memory
    if os.getpid() != 1:
        prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to the harness

    limits = cfg["rlimits"]
    cpu = int(limits["cpu"])
    for which, soft, hard in [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, limits["as"], limits["as"]),
        (resource.RLIMIT_NPROC, limits["nproc"], limits["nproc"]),
        (resource.RLIMIT_FSIZE, limits["fsize"], limits["fsize"]),
        (resource.RLIMIT_NOFILE, limits["nofile"], limits["nofile"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]:
        old_soft, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))

    result_fd = int(sys.argv[2])
    os.closerange(3, result_fd)
    os.closerange(result_fd + 1, 1 << 16)
    return program_path


_main()
'''


# --------------------------------------------------------------------------------------------------------
# Isolation probing (once per process).
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    namespaces: bool = False
    drop_uid: bool = False
    cgroups: dict = field(default_factory=dict)  # controller -> Path of this process's parent cgroup
    unshare: str | None = None
    missing: dict = field(default_factory=dict)  # layer -> why it is missing


_PLAN: _Plan | None = None
_PLAN_LOCK = threading.Lock()
_WARNED = False


def _find_unshare() -> str | None:
    found = shutil.which("unshare")
    if found:
        return found
    for candidate in ("/usr/bin/unshare", "/bin/unshare", "/usr/sbin/unshare"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


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
    plan.unshare = _find_unshare()
    if not is_root:
        plan.missing["namespaces"] = "not running as root"
    elif plan.unshare is None:
        plan.missing["namespaces"] = "the unshare command (util-linux) is not installed"
    else:
        try:
            probe = subprocess.run(
                [plan.unshare, "--mount", "--net", "--pid", "--fork", "--kill-child", "--propagation", "private",
                 "true"],
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
        for layer in ("network_namespace", "pid_namespace", "mount_namespace"):
            plan.missing[layer] = why
    return plan


def _trial(plan: _Plan) -> ExecutionResult:
    return _run(
        "import os\nassert os.getcwd()\n",
        SandboxLimits(timeout_s=20), plan)


def _get_plan() -> _Plan:
    global _PLAN, _WARNED
    with _PLAN_LOCK:
        if _PLAN is None:
            plan = _build_plan()
            result = _trial(plan)
            if not result.passed and plan.drop_uid:
                plan.drop_uid = False
                plan.missing["unprivileged_uid"] = f"a trial run with a per-run uid failed: {result.reason}"
                result = _trial(plan)
            if not result.passed and plan.namespaces:
                plan.namespaces = False
                for layer in ("network_namespace", "pid_namespace", "mount_namespace"):
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
    ``new_session``, ``network_namespace``, ``pid_namespace``, ``mount_namespace`` (read-only file system,
    private tmpfs working directory, hidden ``/proc``), ``unprivileged_uid``, ``pids_cgroup``,
    ``memory_cgroup``, ``rlimits`` (list), ``clean_env``, ``audit_hook``, ``token_protocol``, ``missing``
    (layer -> reason).
    """
    plan = _get_plan()
    return {
        "root": os.geteuid() == 0,
        "fresh_process": True,
        "new_session": True,
        "network_namespace": plan.namespaces,
        "pid_namespace": plan.namespaces,
        "mount_namespace": plan.namespaces,
        "unprivileged_uid": plan.drop_uid,
        "pids_cgroup": "pids" in plan.cgroups,
        "memory_cgroup": "memory" in plan.cgroups,
        "rlimits": ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"],
        "clean_env": True,
        "audit_hook": True,
        "token_protocol": True,
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
        """The lowest free slot (so that slots, and their cgroups, get reused) and the socket that holds it."""
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


def _slot_cgroups(plan: _Plan, limits: SandboxLimits, uid: int) -> dict[str, Path]:
    """The cgroups of a uid slot, made on first use and reused: the slot is exclusive to this run (see
    :class:`_UidPool`), and moving a process into a reused cgroup is much cheaper than into a new one."""
    made: dict[str, Path] = {}
    for controller, parent in plan.cgroups.items():
        path = parent / f"slot-{uid}"
        path.mkdir(exist_ok=True)
        made[controller] = path
        _kill_cgroups({controller: path}, budget_s=0.5)  # a previous holder that died mid-run
        if controller == "pids":
            (path / "pids.max").write_text(str(int(limits.max_processes) + 1))  # + the harness
            continue
        # headroom above the per-process RLIMIT_AS: one process gets a clean MemoryError; the cgroup only
        # stops trees of processes (and the tmpfs working directory, which is charged here too)
        limit = str((int(limits.memory_mb) + int(limits.workdir_mb) + _CGROUP_HEADROOM_MB) * 1024 * 1024)
        memsw = path / "memory.memsw.limit_in_bytes"
        files = [path / "memory.limit_in_bytes"] + ([memsw] if memsw.exists() else [])
        for name in files * 2:  # memsw >= limit must hold at every step: one of the two orders works
            try:
                name.write_text(limit)
            except OSError:
                pass
        if int((path / "memory.limit_in_bytes").read_text()) != int(limit):
            raise OSError(f"could not set the memory limit of {path}")
        for name, value in (("memory.failcnt", "0"), ("memory.swappiness", "0")):
            try:
                (path / name).write_text(value)
            except OSError:
                pass
    return made


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


def _error(reason: str, start: float) -> ExecutionResult:
    return ExecutionResult(False, "error", None, "", "", time.monotonic() - start, reason)


# --------------------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------------------


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``source`` (a whole program: code and its tests) in a fresh sandboxed process.

    Passes only if the program runs to its end normally (see the module docstring for how that is decided),
    within every limit. Returns within ``limits.timeout_s`` plus about a second whatever the program does.
    Never raises for anything the program does; a sandbox failure is reported as ``status="error"``.
    """
    start = time.monotonic()
    if not isinstance(source, str):
        return _error(f"source must be a str, got {type(source).__name__}", start)
    try:
        plan = _get_plan()
    except Exception as error:  # pragma: no cover - probing never raises in practice
        return _error(f"sandbox probe failed: {type(error).__name__}: {error}", start)
    return _run(source, limits, plan)


def _run(source: str, limits: SandboxLimits, plan: _Plan) -> ExecutionResult:
    start = time.monotonic()
    deadline = start + float(limits.timeout_s)
    token = secrets.token_bytes(TOKEN_BYTES)
    workdir = uid_sock = proc = None
    cgroups: dict[str, Path] = {}
    uid = gid = 0
    result_r = None
    try:
        workdir = tempfile.mkdtemp(prefix="dare_gym_sandbox_")
        slot_uid, uid_sock = _UID_POOL.acquire()  # also names this run's (reused) cgroups
        if plan.drop_uid:
            uid = gid = slot_uid
            if not plan.namespaces:
                os.chown(workdir, uid, gid)
        if plan.cgroups:
            cgroups = _slot_cgroups(plan, limits, slot_uid)
        oom_before = _oom_kills(cgroups)
        memory = int(limits.memory_mb) * 1024 * 1024
        config = {
            "workdir": workdir,
            "uid": uid,
            "gid": gid,
            "drop_uid": plan.drop_uid,
            "mount_ns": plan.namespaces,
            "proc_visible": not plan.namespaces,
            "hidden_paths": [str(p) for p in limits.hidden_paths],
            "site_paths": _site_paths(),
            "cgroup_procs": [str(p / "cgroup.procs") for p in cgroups.values()],
            "workdir_mb": int(limits.workdir_mb),
            "rlimits": {
                "cpu": max(1, int(-(-limits.effective_cpu_s // 1))),
                "as": memory,
                "nproc": int(limits.max_processes),
                "fsize": int(limits.workdir_mb) * 1024 * 1024,
                "nofile": 256,
            },
        }
        header = marshal.dumps(config)
        payload = token + len(header).to_bytes(4, "little") + header + source.encode("utf-8", "surrogatepass")
        result_r, result_w = os.pipe()
        try:
            config_fd = os.memfd_create("dare_gym_sandbox", os.MFD_CLOEXEC)
        except OSError:
            os.close(result_w)
            raise
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(config_fd, view):]
            os.lseek(config_fd, 0, os.SEEK_SET)
            argv = [sys.executable, "-S", "-s", "-B", "-c", _HARNESS, str(config_fd), str(result_w)]
            if plan.namespaces:
                argv = [plan.unshare, "--mount", "--net", "--pid", "--fork", "--kill-child",
                        "--propagation", "private", *argv]
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                env=_clean_env(workdir), pass_fds=(config_fd, result_w), start_new_session=True, close_fds=True,
            )
        finally:
            os.close(config_fd)
            os.close(result_w)
        return _supervise(proc, result_r, token, limits, deadline, start, cgroups, uid if plan.drop_uid else None,
                          plan, oom_before)
    except Exception as error:
        if proc is not None:
            _kill_tree(proc, cgroups, uid if plan.drop_uid and not plan.namespaces else None, plan.namespaces)
        return _error(f"sandbox failure: {type(error).__name__}: {error}", start)
    finally:
        if result_r is not None:
            try:
                os.close(result_r)
            except OSError:
                pass
        if cgroups:
            _kill_cgroups(cgroups, budget_s=0.2)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if uid_sock is not None:
            uid_sock.close()


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


def _supervise(proc, result_r, token, limits, deadline, start, cgroups, uid, plan, oom_before) -> ExecutionResult:
    cap = int(limits.max_output_bytes)
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", result_r: "result"}
    caps = {"stdout": cap, "stderr": cap, "result": _RESULT_CAP}
    data = {name: bytearray() for name in caps}
    overflow = {name: False for name in caps}
    selector = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)

    def read_ready(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            fd = key.fd
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                selector.unregister(fd)
                continue
            name = streams[fd]
            room = caps[name] - len(data[name])
            if room > 0:
                data[name] += chunk[:room]
            if len(chunk) > max(room, 0):
                overflow[name] = True

    timed_out = False
    exited_at = None
    try:
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            wait = min(deadline - now, 0.05)
            if exited_at is not None:
                if now - exited_at >= _EXIT_GRACE_S:
                    break  # something outlived the main process and holds the pipes: it is killed below
                wait = min(wait, _EXIT_GRACE_S - (now - exited_at))
            read_ready(wait)
            if exited_at is None and _exited_without_reaping(proc.pid):
                exited_at = time.monotonic()
        _kill_tree(proc, cgroups, uid if not plan.namespaces else None, plan.namespaces)
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        drain_end = time.monotonic() + 0.2
        while selector.get_map() and time.monotonic() < drain_end:
            read_ready(0.02)
    finally:
        selector.close()
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    duration = time.monotonic() - start
    stdout = bytes(data["stdout"]).decode("utf-8", "replace")
    stderr = bytes(data["stderr"]).decode("utf-8", "replace")
    result = bytes(data["result"])
    rc = proc.returncode

    def make(passed: bool, status: str, reason: str) -> ExecutionResult:
        return ExecutionResult(passed, status, rc, stdout, stderr, duration, reason, overflow["stdout"],
                               overflow["stderr"])

    oom = oom_before >= 0 and _oom_kills(cgroups) > oom_before or oom_before < 0 and _memory_failures(cgroups) > 0
    if timed_out:
        return make(False, "timeout", f"exceeded the wall-clock limit of {limits.timeout_s:g} s")
    if result == token and rc == 0:
        return make(True, "passed", "")
    if rc is not None and rc < 0:
        sig = -rc
        try:
            signame = signal.Signals(sig).name
        except ValueError:
            signame = f"signal {sig}"
        if oom:
            why = "memory limit of the run exceeded (killed by the OOM killer)"
        elif sig == signal.SIGXCPU:
            why = f"CPU time limit of {limits.effective_cpu_s:g} s exceeded"
        elif sig == signal.SIGKILL:
            why = "killed by SIGKILL (CPU hard limit, memory limit or the sandbox)"
        else:
            why = f"killed by {signame}"
        return make(False, "killed", why)
    if token in result:
        return make(False, "failed", "the result channel was tampered with (extra bytes around the token)")
    if result.startswith(b"FAIL:"):
        return make(False, "failed", result[5:].decode("utf-8", "replace"))
    if result.startswith(b"ERROR:"):
        return make(False, "error", result[6:].decode("utf-8", "replace"))
    if oom:
        return make(False, "killed", "memory limit of the run exceeded (OOM killer)")
    if rc == 0:
        return make(False, "failed", "the program exited with status 0 before it completed (os._exit or a "
                                     "similar early exit); no completion signal from the harness")
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    return make(False, "failed", f"exited with status {rc} without a verdict" + (f": {tail[0]}" if tail else ""))


def run_programs(sources: Sequence[str] | Iterable[str], limits: SandboxLimits = SandboxLimits(),
                 workers: int = 2) -> list[ExecutionResult]:
    """Run many programs, ``workers`` at a time (each in its own sandboxed process); results keep the order."""
    sources = list(sources)
    if not sources:
        return []
    _get_plan()  # probe once, outside the pool
    workers = max(1, min(int(workers), len(sources)))
    if workers == 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dare_gym_sandbox") as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
