"""The program's side of a sandboxed run: isolate the process, load the program, answer the checker's calls.

:mod:`dare_gym.rewards.sandbox` starts this module (through :mod:`dare_gym.rewards.sandbox_boot`) as the
first code of the program's process, inside new namespaces when they are available. It

1. finishes the isolation (:func:`isolate`): joins the run's cgroups, makes every mount read-only, puts the
   working directory on a private size-limited tmpfs, covers ``/proc`` and the hidden paths, drops to the
   run's own uid/gid, gives the run a fresh session keyring and empties its uid's keyrings, sets rlimits and
   closes every descriptor but its two channel ends;
2. runs the untrusted program as ``__main__`` (then the benchmark's setup code, if any, in its namespace);
3. serves the checker (:mod:`dare_gym.rewards.code_checker`): each request names a top-level function and
   carries plain-data arguments; the reply is the plain-data result or the exception raised
   (:mod:`dare_gym.rewards.sandbox_protocol`); at ``finish`` it reports threads or processes left running.

NOTHING HERE IS TRUSTED. Once the program runs it can rewrite every function, frame and module of this
process, this module included, and answer whatever it likes. That is by design: the verdict is computed by
the checker, in another process, from the plain data it receives; this module only makes an honest program
easy to call. Keeping it honest matters for correct programs, never for the soundness of a verdict.
"""

from __future__ import annotations

import builtins
import os
import sys
import threading
import time
import types

from . import sandbox_protocol as protocol

__all__ = ["main", "isolate", "describe_error", "builtin_exception_name"]

_KEYCTL_JOIN_SESSION_KEYRING = 1
_KEYCTL_CLEAR = 7
_KEY_SPEC_USER_KEYRING = -4
_KEY_SPEC_USER_SESSION_KEYRING = -5
_SETUP_FILENAME = "<benchmark setup>"
_EXCEPTION_MESSAGE_CHARS = 2000


def main(payload: dict) -> None:
    """Entry point in the child process (called by the boot module); never returns."""
    call_fd, reply_fd = payload["call_fd"], payload["reply_fd"]
    try:
        sys.path.extend(p for p in payload["site_paths"] if p not in sys.path)
        program_path = isolate(payload["config"], payload["source"], keep_fds=(call_fd, reply_fd))
    except BaseException as error:
        _send_quietly(reply_fd, {"setup_error": f"sandbox setup failed: {type(error).__name__}: {error}"})
        _exit_run(3)
    namespace = _load(payload["source"], program_path, payload["setup"], reply_fd)
    _serve(namespace, call_fd, reply_fd)


# ------------------------------------------------------------------------------------------------ the program


class _ThreadErrors:
    """Uncaught exceptions of the program's threads (a program whose thread failed did not succeed)."""

    def __init__(self):
        self.seen: list[str] = []

    def hook(self, args) -> None:
        self.seen.append(f"{args.exc_type.__name__} in thread {getattr(args.thread, 'name', '?')}")
        try:
            import traceback

            traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
        except BaseException:
            pass


_THREAD_ERRORS = _ThreadErrors()
_HARNESS_PID = os.getpid()  # only this process speaks for the program: a forked child that returns here leaves


def _leave_if_forked() -> None:
    if os.getpid() != _HARNESS_PID:
        os._exit(0)


def _load(source: str, program_path: str, setup: str, reply_fd: int) -> dict:
    """Run the program (and the benchmark's setup code) in a fresh ``__main__``; report failure and exit."""
    module = types.ModuleType("__main__")
    module.__file__ = program_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [program_path]
    threading.excepthook = _THREAD_ERRORS.hook
    try:
        exec(compile(source, program_path, "exec", dont_inherit=True), module.__dict__)
        if setup:
            exec(compile(setup, _SETUP_FILENAME, "exec", dont_inherit=True), module.__dict__)
    except BaseException as error:
        _leave_if_forked()
        _print_program_traceback(error)
        described = describe_error(error, {program_path: source, _SETUP_FILENAME: setup})
        _send_quietly(reply_fd, {"load_error": described})
        _exit_run(1)
    _leave_if_forked()
    _send_or_exit(reply_fd, {"ready": True})
    return module.__dict__


def _serve(namespace: dict, call_fd: int, reply_fd: int) -> None:
    """Answer calls until the checker says ``finish`` or closes its end."""

    def resolve(name: str):  # what the benchmark's setup code built here, named by the checker
        if name not in namespace:
            raise protocol.ProtocolError(f"the program has no {name!r}")
        return namespace[name]

    while True:
        try:
            message = protocol.read_message(call_fd, resolve)
        except protocol.ProtocolError as error:
            _send_quietly(reply_fd, {"bad": f"the checker's request is malformed: {error}"})
            _exit_run(2)
        if message is None:  # the checker has its verdict and went away
            _exit_run(0)
        if message.get("op") == "finish":
            _send_or_exit(reply_fd, _finish())
            _exit_run(0)
        ident = message.get("id")
        reply = _answer(namespace, message)
        try:
            _send_or_exit(reply_fd, reply)
        except Exception as error:  # not plain data, too large, or an iterator of the program's that raised
            _send_or_exit(reply_fd, {"id": ident, "bad": f"{message.get('function')}() returned {error}"})


def _answer(namespace: dict, message: dict) -> dict:
    ident, name = message.get("id"), message.get("function")
    args, kwargs = message.get("args"), message.get("kwargs")
    if type(name) is not str or type(args) is not list or type(kwargs) is not dict:
        return {"id": ident, "bad": "the checker's request is malformed: a call needs a name, a list, a dict"}
    try:
        function = namespace[name] if name in namespace else getattr(builtins, name)
    except AttributeError:
        return {"id": ident, "raise": ["NameError", f"name {name!r} is not defined"]}
    try:
        value = function(*args, **kwargs)
    except BaseException as error:
        _leave_if_forked()
        _print_program_traceback(error)
        return {"id": ident, "raise": [builtin_exception_name(error), _message(error)]}
    _leave_if_forked()
    return {"id": ident, "ok": value}


def _finish() -> dict:
    """After the last call: the program must have left no thread or child process running."""
    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()  # what the interpreter does at exit: joins the non-daemon threads
    except BaseException as error:
        return {"left": f"while joining threads: {type(error).__name__}: {_message(error)}"}
    if _THREAD_ERRORS.seen:
        return {"left": "uncaught exception in a thread: " + "; ".join(_THREAD_ERRORS.seen[:5])}
    grace_end = time.monotonic() + 0.1  # a thread or a child that is just finishing is not "left running"
    while _thread_count() > 0:
        if time.monotonic() > grace_end:
            return {"left": f"the program left {_thread_count()} thread(s) running"}
        time.sleep(0.002)
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG | 0x40000000)  # __WALL
        except ChildProcessError:
            break  # no child at all (orphans come back to this process: pid 1 or a subreaper)
        if pid == 0:
            if time.monotonic() > grace_end:
                return {"left": "the program left child processes running"}
            time.sleep(0.002)
    _flush_streams()
    return {"bye": True}


def _thread_count() -> int:
    import _thread

    return _thread._count()


# ------------------------------------------------------------------------------------------------ reporting


def builtin_exception_name(error: BaseException) -> str:
    """The name of the nearest builtin class of ``error`` (``ValueError`` for ``class E(ValueError)``)."""
    for cls in type(error).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "BaseException"


def _message(error: BaseException) -> str:
    try:
        return str(error)[:_EXCEPTION_MESSAGE_CHARS]
    except BaseException:
        return "<an exception message that could not be converted to text>"


def describe_error(error: BaseException, sources: dict[str, str]) -> str:
    """One line for a failure of the program: the exception, its message, and the line of ``sources``
    (file name -> text) where it happened."""
    try:
        if isinstance(error, SystemExit):
            return f"SystemExit({error.code!r}): the program exited before it completed"
        if isinstance(error, SyntaxError):
            return f"SyntaxError: {error.msg} (line {error.lineno})"
        text = _message(error)
        where = ""
        tb = error.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if filename in sources:
                lines = sources[filename].splitlines()
                line = lines[tb.tb_lineno - 1].strip() if 0 < tb.tb_lineno <= len(lines) else ""
                place = "setup line" if filename == _SETUP_FILENAME else "line"
                where = f" at {place} {tb.tb_lineno}" + (f": {line}" if line else "")
            tb = tb.tb_next
        return f"{type(error).__name__}{': ' + text if text else ''}{where}"[:2000]
    except BaseException:
        return "an exception that could not be described"


def _print_program_traceback(error: BaseException) -> None:
    try:
        import traceback

        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:  # without this module's frames
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb)
    except BaseException:
        pass


def _send_or_exit(fd: int, message: dict) -> None:
    try:
        protocol.write_message(fd, message)
    except OSError:  # the checker went away
        _exit_run(0)


def _send_quietly(fd: int, message: dict) -> None:
    try:
        protocol.write_message(fd, message)
    except BaseException:
        pass


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _exit_run(code: int) -> None:
    """Leave the run. As pid 1 of a pid namespace the kernel then kills everything else of the run; in the
    fallbacks without one, what the program started is killed here."""
    _flush_streams()
    if os.getpid() != 1:
        try:
            _kill_descendants(os.getpid())
        except BaseException:
            pass
    os._exit(code)


def _kill_descendants(root: int) -> None:
    """Stop the whole tree under ``root`` (so that nothing forks or re-parents away meanwhile), then kill it."""
    import signal

    stopped: set[int] = set()
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


# ------------------------------------------------------------------------------------------------ isolation

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_MOVE, _MS_REC = 32, 1024, 2048, 4096, 8192, 16384
_MS_RELATIME = 1 << 21


class _Libc:
    """The few libc calls that Python's standard library does not wrap."""

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def function(self, name: str, restype, argtypes):
        function = self.lib._FuncPtr((name, self.lib))
        function.restype, function.argtypes = restype, argtypes
        return function

    def check(self, result: int, what: str) -> None:
        if result != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


def isolate(config: dict, source: str, keep_fds: tuple[int, ...]) -> str:
    """Cgroups, mounts, privileges, keyrings and limits; runs as root when the parent is root. Returns the
    path of the program's file in its working directory."""
    import resource

    workdir, uid, gid = config["workdir"], config["uid"], config["gid"]
    for procs in config["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")
    libc = _Libc()
    if config["mount_ns"]:
        _private_mounts(libc, config)
    os.chdir(workdir)

    program_path = os.path.join(workdir, "program.py")
    fd = os.open(program_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)

    if config["drop_uid"]:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("could not drop privileges")
    if config["keyctl"]:
        _private_keyrings(libc, config["keyctl"], clear_user=config["drop_uid"])
    c = libc.ctypes
    prctl = libc.function("prctl", c.c_int, [c.c_int, c.c_ulong, c.c_ulong, c.c_ulong, c.c_ulong])
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL (reset by the uid change; set again)
    prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    if os.getpid() != 1:
        prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to this process

    limits = config["rlimits"]
    cpu = int(limits["cpu"])
    for which, soft, hard in [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, limits["as"], limits["as"]),
        (resource.RLIMIT_NPROC, limits["nproc"], limits["nproc"]),
        (resource.RLIMIT_FSIZE, limits["fsize"], limits["fsize"]),
        (resource.RLIMIT_NOFILE, limits["nofile"], limits["nofile"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]:
        _old_soft, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))

    low = 3
    for fd in sorted(keep_fds):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)
    return program_path


def _private_keyrings(libc: _Libc, keyctl_nr: int, clear_user: bool) -> None:
    """A fresh session keyring (the parent's stays out of reach), and, with a per-run uid, that uid's user
    keyrings emptied: keys are kept per uid by the kernel and would otherwise carry data into later runs.
    Where keyrings are unavailable (a kernel without them, a seccomp policy), the program has none either."""
    import errno

    c = libc.ctypes
    syscall = libc.function("syscall", c.c_long, [c.c_long, c.c_long, c.c_long])
    steps = [(_KEYCTL_JOIN_SESSION_KEYRING, 0, "join a new session keyring")]
    if clear_user:
        steps += [(_KEYCTL_CLEAR, _KEY_SPEC_USER_KEYRING, "clear the run uid's user keyring"),
                  (_KEYCTL_CLEAR, _KEY_SPEC_USER_SESSION_KEYRING, "clear the run uid's user session keyring")]
    for operation, argument, what in steps:
        if syscall(keyctl_nr, operation, argument) < 0:
            err = c.get_errno()
            if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                return
            raise OSError(err, f"could not {what}: {os.strerror(err)}")


def _private_mounts(libc: _Libc, config: dict) -> None:
    """Inside the new mount namespace: a read-only view of the host, a private working directory, an empty
    ``/proc``, hidden paths covered, and the interpreter reachable for the run's uid."""
    c = libc.ctypes
    mount = libc.function("mount", c.c_int, [c.c_char_p, c.c_char_p, c.c_char_p, c.c_ulong, c.c_char_p])

    def enc(text):
        return None if text is None else os.fsencode(text)

    def do_mount(src, target, fstype, flags, data=None):
        libc.check(mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
                   f"mount({src!r}, {target!r}, {fstype!r})")

    workdir, uid, gid = config["workdir"], config["uid"], config["gid"]
    needed = {os.path.realpath(p) for p in
              [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
               os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]
              + [p for p in sys.path if p and os.path.isdir(p)]}
    _expose_interpreter(do_mount, needed, workdir, uid, gid)

    for hidden in config["hidden_paths"]:
        hidden = os.path.realpath(hidden)
        if not os.path.isdir(hidden) or hidden == "/":
            continue
        if any(n == hidden or n.startswith(hidden + "/") for n in needed) or \
                (workdir + "/").startswith(hidden + "/"):
            continue
        do_mount("tmpfs", hidden, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")

    do_mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
             f"size={int(config['workdir_mb'])}m,mode=0700,uid={uid},gid={gid}")
    os.chdir(workdir)

    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read().splitlines()
    keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
            "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}
    for line in mountinfo:
        fields = line.split()
        point, options = _unescape_mountinfo(fields[4]), fields[5].split(",")
        if point == workdir:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= keep.get(option, 0)
        try:
            do_mount(None, point, None, flags)
        except OSError:
            if point == "/":
                raise
    do_mount("tmpfs", "/proc", "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0555")


def _unescape_mountinfo(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    parts = text.split("\\")
    out = parts[0]
    for part in parts[1:]:
        out += chr(int(part[:3], 8)) + part[3:] if part[:3].isdigit() else "\\" + part
    return out


def _expose_interpreter(do_mount, needed: set[str], workdir: str, uid: int, gid: int) -> None:
    """Directories that the run's uid cannot traverse on the way to the interpreter (``/root`` for a pyenv
    install) are replaced, inside the namespace only, by a tmpfs holding nothing but the needed entries."""

    def traversable(path):
        st = os.stat(path)
        if st.st_uid == uid:
            return bool(st.st_mode & 0o100)
        if st.st_gid == gid:
            return bool(st.st_mode & 0o010)
        return bool(st.st_mode & 0o001)

    stash_root = os.path.join(workdir, ".stash")
    os.mkdir(stash_root, 0o700)
    counter = 0
    for _ in range(16):
        blocker = None
        for target in sorted(needed):
            cur = "/"
            for part in [p for p in target.split("/") if p]:
                if not traversable(cur):
                    blocker = cur
                    break
                cur = os.path.join(cur, part)
            if blocker:
                break
        if blocker is None:
            return
        if blocker == "/":
            raise OSError("the root directory is not traversable by the sandbox uid")
        children = sorted({t[len(blocker):].lstrip("/").split("/")[0] for t in needed
                           if t.startswith(blocker.rstrip("/") + "/")})
        stashed = []
        for child in children:
            src = os.path.join(blocker, child)
            stash = os.path.join(stash_root, str(counter))
            counter += 1
            is_dir = os.path.isdir(src)
            os.mkdir(stash) if is_dir else open(stash, "w").close()
            do_mount(src, stash, None, _MS_BIND | _MS_REC)
            stashed.append((child, stash, is_dir))
        do_mount("tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
        for child, stash, is_dir in stashed:
            dest = os.path.join(blocker, child)
            os.mkdir(dest) if is_dir else open(dest, "w").close()
            do_mount(stash, dest, None, _MS_MOVE)
    raise OSError("could not make the interpreter reachable for the sandbox uid")
