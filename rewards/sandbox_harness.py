"""The program's side of a sandboxed run: isolate the process, load the program, answer the checker's calls.

:mod:`dare_gym.rewards.sandbox` starts this module (through :mod:`dare_gym.rewards.sandbox_boot`) as the
first code of the program's process, inside new namespaces when they are available. It

1. finishes the isolation (:func:`isolate`): joins the run's fresh cgroups, pivots into an allow-listed root
   (a new tmpfs holding only the interpreter, its libraries and a few devices, read-only, plus a private
   size-limited working directory and ``/dev/shm``), drops to the run's own uid/gid, gives the run a fresh
   session keyring and empties its uid's keyrings, sets rlimits, closes every descriptor but its two channel
   ends and installs the parent's system-call filter (no keys, namespaces or mounts);
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
    handles = _Handles()

    def resolve(name: str):  # what the benchmark's setup code built here, named by the checker
        if name not in namespace:
            raise protocol.ProtocolError(f"the program has no {name!r}")
        return namespace[name]

    while True:
        try:
            message = protocol.read_message(call_fd, resolve, handles.objects)
        except protocol.ProtocolError as error:
            _send_quietly(reply_fd, {"bad": f"the checker's request is malformed: {error}"})
            _exit_run(2)
        if message is None:  # the checker has its verdict and went away
            _exit_run(0)
        if message.get("op") == "finish":
            _send_or_exit(reply_fd, _finish())
            _exit_run(0)
        ident = message.get("id")
        reply, value = _answer(namespace, message)
        try:
            _send_or_exit(reply_fd, reply)
        except protocol.Unencodable as error:
            if message.get("handle") is True and "ok" in reply:  # an object of the program's classes: it stays here
                _send_or_exit(reply_fd, {"id": ident, "handle": handles.add(value)})
            else:
                _send_or_exit(reply_fd, {"id": ident, "bad": f"{message.get('function')}() returned {error}"})
        except Exception as error:  # an iterator of the program's that raised while it was sent
            _send_or_exit(reply_fd, {"id": ident, "bad": f"{message.get('function')}() returned {error}"})


class _Handles:
    """Objects that calls of the program's classes made, kept here and named to the checker by number (the same
    object always by the same number)."""

    def __init__(self):
        self.objects: dict[int, object] = {}
        self._numbers: dict[int, int] = {}  # id(object) -> its number (the objects are kept alive above)

    def add(self, value) -> int:
        number = self._numbers.get(id(value))
        if number is None:
            number = self._numbers[id(value)] = len(self.objects) + 1
            self.objects[number] = value
        return number


def _answer(namespace: dict, message: dict) -> tuple[dict, object]:
    """The reply to a call, and the value it returned (None if it raised)."""
    ident, name = message.get("id"), message.get("function")
    args, kwargs = message.get("args"), message.get("kwargs")
    if type(name) is not str or type(args) is not list or type(kwargs) is not dict:
        return {"id": ident, "bad": "the checker's request is malformed: a call needs a name, a list, a dict"}, None
    try:
        function = namespace[name] if name in namespace else getattr(builtins, name)
    except AttributeError:
        return {"id": ident, "raise": ["NameError", f"name {name!r} is not defined"]}, None
    try:
        value = function(*args, **kwargs)
    except BaseException as error:
        _leave_if_forked()
        _print_program_traceback(error)
        return {"id": ident, "raise": [builtin_exception_name(error), _message(error)]}, None
    _leave_if_forked()
    return {"id": ident, "ok": value}, value


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

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192


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
    """Cgroups, the allow-listed root, privileges, keyrings, limits and the system-call filter; runs as root when
    the parent is root. Returns the path of the program's file in its working directory."""
    import resource

    workdir, uid, gid = config["workdir"], config["uid"], config["gid"]
    for procs in config["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")
    libc = _Libc()
    if config["mount_ns"]:
        _allow_listed_root(libc, config)
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
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (also what lets an unprivileged process install a filter)
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
    if config["seccomp"]:  # last: the set-up above needs some of the calls it denies
        _install_filter(libc, config["seccomp"])
    return program_path


def _install_filter(libc: _Libc, program: bytes) -> None:
    """Install the parent's seccomp filter (classic BPF, built by ``_seccomp_filter`` in
    :mod:`dare_gym.rewards.sandbox`): a ``struct sock_fprog`` pointing at ``program``'s instructions."""
    c = libc.ctypes
    if len(program) % 8:
        raise ValueError("a BPF program is a whole number of 8-byte instructions")

    class SockFprog(c.Structure):
        _fields_ = [("len", c.c_ushort), ("filter", c.c_void_p)]

    buffer = c.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, c.addressof(buffer))
    prctl = libc.function("prctl", c.c_int, [c.c_int, c.c_ulong, c.c_void_p, c.c_ulong, c.c_ulong])
    libc.check(prctl(22, 2, c.addressof(fprog), 0, 0), "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)")


_KEYCTL_GET_PERSISTENT = 22
_KEY_SPEC_SESSION_KEYRING = -3


def _private_keyrings(libc: _Libc, keyctl_nr: int, clear_user: bool) -> None:
    """A fresh session keyring (the parent's stays out of reach), and, with a per-run uid, that uid's user, user
    session and persistent keyrings emptied: the kernel keeps keys per uid, beyond the life of any process.
    The system-call filter then denies every key call to the program; this is what still holds where no filter
    can be installed. Where keyrings are unavailable (a kernel without them, a seccomp policy), the program has
    none either."""
    import errno

    c = libc.ctypes
    syscall = libc.function("syscall", c.c_long, [c.c_long, c.c_long, c.c_long, c.c_long])
    tolerated = (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP)

    def call(operation: int, first: int, second: int, what: str) -> int | None:
        result = syscall(keyctl_nr, operation, first, second)
        if result < 0:
            err = c.get_errno()
            if err in tolerated:
                return None
            raise OSError(err, f"could not {what}: {os.strerror(err)}")
        return result

    if call(_KEYCTL_JOIN_SESSION_KEYRING, 0, 0, "join a new session keyring") is None:
        return
    if not clear_user:
        return
    call(_KEYCTL_CLEAR, _KEY_SPEC_USER_KEYRING, 0, "clear the run uid's user keyring")
    call(_KEYCTL_CLEAR, _KEY_SPEC_USER_SESSION_KEYRING, 0, "clear the run uid's user session keyring")
    persistent = call(_KEYCTL_GET_PERSISTENT, -1, _KEY_SPEC_SESSION_KEYRING, "find the run uid's persistent keyring")
    if persistent is not None:
        call(_KEYCTL_CLEAR, persistent, 0, "clear the run uid's persistent keyring")


_MNT_DETACH = 2


def _allow_listed_root(libc: _Libc, config: dict) -> None:
    """Inside the new mount namespace, make the program's root a fresh tmpfs that holds only what the parent's
    allow-list names (``config["root"]``: the interpreter, its standard library, site-packages and the shared
    libraries they load, all read-only; a few devices), a private size-limited working directory, a private
    ``/dev/shm`` and an empty ``/proc``, then pivot into it and detach the host's tree. Nothing else of the host
    exists for the program: not the benchmark's files wherever they are, not ``/sys`` (cgroup counters), not
    ``/tmp``, ``/home`` or the project's folder."""
    c = libc.ctypes
    mount = libc.function("mount", c.c_int, [c.c_char_p, c.c_char_p, c.c_char_p, c.c_ulong, c.c_char_p])
    umount2 = libc.function("umount2", c.c_int, [c.c_char_p, c.c_int])

    def enc(text):
        return None if text is None else os.fsencode(text)

    def do_mount(src, target, fstype, flags, data=None):
        libc.check(mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
                   f"mount({src!r}, {target!r}, {fstype!r})")

    spec, workdir, uid, gid = config["root"], config["workdir"], config["uid"], config["gid"]
    new_root = workdir  # the host folder made for this run: unused by anything else, so a fine mount point
    do_mount("tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    root = _Tree(new_root, do_mount)
    for path in spec["paths"]:
        root.expose(path)
    for path in spec["devices"]:
        root.expose(path, device=True)
    for hidden in config["hidden_paths"]:  # what a caller hides inside the allow-list (a site-packages folder)
        target = new_root + os.path.realpath(hidden)
        if os.path.realpath(hidden) != "/" and os.path.isdir(target):
            do_mount("tmpfs", target, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
    for folder in ("/proc", "/dev/shm", workdir):
        root.directory(folder)
    do_mount("tmpfs", new_root + workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
             f"size={int(config['workdir_mb'])}m,mode=0700,uid={uid},gid={gid}")
    do_mount("tmpfs", new_root + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
             f"size={int(config['workdir_mb'])}m,mode=1777")
    do_mount(None, new_root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)

    os.chdir(new_root)
    pivot_nr = config.get("pivot_root")
    syscall = libc.function("syscall", c.c_long, [c.c_long, c.c_char_p, c.c_char_p])
    if pivot_nr is not None and syscall(pivot_nr, b".", b".") == 0:
        # the old root is now stacked on the new one at "/": detach it, whole, from this namespace
        libc.check(umount2(b".", _MNT_DETACH), "umount2(old root)")
    else:  # a root pivot_root refuses (an initramfs): move the new root over "/" and enter it
        do_mount(new_root, "/", None, _MS_MOVE)
        os.chroot(".")
    os.chdir("/")


class _Tree:
    """The new root under construction: host paths re-created in it, their leaves bind-mounted read-only.

    Symbolic links on the way to a path are re-created as links (``/lib -> usr/lib``, a virtual environment's
    ``python -> /usr/bin/python3``) and followed, so every name the interpreter and the dynamic loader use
    resolves inside. Nothing is ever created inside a bound folder: each bind is made read-only at once."""

    def __init__(self, new_root: str, do_mount):
        self.new_root, self.do_mount = new_root, do_mount
        self.bound: list[str] = []  # host folders bound so far (their contents exist already)

    def _inside_bound(self, path: str) -> str | None:
        return next((b for b in self.bound if path == b or path.startswith(b.rstrip("/") + "/")), None)

    def directory(self, path: str) -> None:
        """An empty folder of the new root (root-owned, traversable), with its parents."""
        current = self.new_root
        for part in [p for p in path.split("/") if p]:
            current = os.path.join(current, part)
            if not os.path.lexists(current):
                os.mkdir(current, 0o755)

    def expose(self, path: str, *, device: bool = False, hops: int = 0) -> None:
        """Make host ``path`` (a folder or a file) appear at the same place in the new root, read-only; a
        ``device`` keeps working (no ``nodev``: a read-only mount does not stop writes to a device, which is why
        only devices that keep nothing readable are exposed)."""
        import stat

        if hops > 40:
            raise OSError(f"too many symbolic links on the way to {path}")
        parts = [p for p in os.path.normpath(path).split("/") if p]
        resolved = "/"
        for position, part in enumerate(parts):
            candidate = os.path.join(resolved, part)
            holder = self._inside_bound(candidate)
            if holder is not None and not self._other_device(holder, path):
                return  # visible already, through the bind of a folder above it
            try:
                info = os.lstat(candidate)
            except FileNotFoundError:
                return  # nothing to expose (an optional library folder, say)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(candidate)
                if holder is None and not os.path.lexists(self.new_root + candidate):
                    self.directory(resolved)
                    os.symlink(target, self.new_root + candidate)
                rest = parts[position + 1:]
                self.expose(os.path.join(os.path.normpath(os.path.join(resolved, target)), *rest),
                            device=device, hops=hops + 1)
                return
            resolved = candidate
        destination = self.new_root + resolved
        if self._inside_bound(resolved) is None:
            self.directory(os.path.dirname(resolved))
            if stat.S_ISDIR(os.stat(resolved).st_mode):
                if not os.path.isdir(destination):
                    os.mkdir(destination, 0o755)
            elif not os.path.lexists(destination):
                open(destination, "w").close()
        self.do_mount(resolved, destination, None, _MS_BIND)
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | (0 if device else _MS_NODEV)
        self.do_mount(None, destination, None, flags)
        if os.path.isdir(resolved):
            self.bound.append(resolved)

    @staticmethod
    def _other_device(holder: str, path: str) -> bool:
        """Whether ``path`` lies on another file system than the bound folder ``holder`` (a mount below it,
        which a non-recursive bind does not carry: it gets a bind of its own)."""
        try:
            return os.stat(holder).st_dev != os.stat(path).st_dev
        except OSError:
            return False
