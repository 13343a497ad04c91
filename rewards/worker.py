"""Run reward computations in helper processes that are killed at a hard wall-clock limit.

Why processes: a limit enforced from a thread stops nothing. The thread runs on, it keeps the interpreter from
exiting, and while it holds the GIL (a regex or parser stuck in C) even the waiting thread cannot wake up. A
helper process can always be killed, so here no reward code ever runs in a thread of the calling process.

Two kinds of helper speak one protocol (:func:`serve` on a pair of pipes):

* **spawned** (:class:`TimeoutPool`, shared through :func:`default_pool`): ``python -m
  dare_gym.rewards.helper_main``, a fresh interpreter holding ``dare_gym.rewards`` and never torch, kept alive
  between batches. It serves the project's own functions, sent by reference (their import path). A
  function's ``warm_up()`` (math-verify's sympy import) runs once per helper before its first call, outside
  any call's limit, so a cold helper never eats into a limit.
* **forked** (:class:`ForkPool`, one per batch): a copy of the calling process made with ``os.fork()``. It
  serves any callable, lambdas and closures included, because the callable is already in its memory: only
  the arguments and the result are pickled. The copy sees the process as it was when the batch was scored,
  and whatever the callable changes in it (a counter, a cache) is lost with it. A forked copy must not use torch,
  CUDA or OpenMP, whose thread pools do not survive ``fork``: a reward that needs them runs without a time
  limit (in-process). Another thread may hold a lock (stdout's, say) at the moment of the fork; the copy
  only runs the reward and is killed at its limit, so that costs one limit, never a hang.

:func:`run_calls` runs a batch of calls in parallel, each in its own helper and each killed once it has run for
the limit (then it failed with "timed out after … s"; helper start-up is not part of a call's time). Up to one
call per CPU core runs at once; a call that has run ``LONG_CALL_S`` no longer holds its core's place and opens
one more, so calls that hang or sleep do not queue the rest: eight hung calls with a 1 s limit take about a
second. At most ``MAX_WORKERS`` helpers of a pool run at once (more hung calls than that wait their turn), which
also bounds how far CPU-bound long calls can oversubscribe the cores.

Replies are matched to their calls: each names the call it answers and the helper's pid, and only the helper
itself ever answers (a reward that forks and returns in both processes has the copy leave silently), so no
completion gets another's score. After every call the helper, a child subreaper, kills whatever processes the
call left running (but the code sandbox's checker server, declared with :func:`keep_child`).

Cleanup: helpers are started from one long-lived thread and, on Linux, ask the kernel to kill them when that
thread, so this process, ends (``PR_SET_PDEATHSIG``: it fires when the *thread* that started a process
exits, so helpers started from a short-lived pool thread would die with it); an ``atexit`` hook kills them on a
normal exit. A hung reward never delays this process's exit.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import inspect
import itertools
import os
import pickle
import queue
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

CPU_COUNT = max(1, os.cpu_count() or 1)
BASE_WORKERS = CPU_COUNT  # calls running at once before any has run long
MAX_WORKERS = max(16, 2 * CPU_COUNT)  # helper processes of one pool running at once, long calls included
LONG_CALL_S = 0.05  # a call running longer (or a tenth of its limit) has "run long"
START_LIMIT_S = 60.0  # a helper process that is not ready by then is killed
PREPARE_LIMIT_S = 120.0  # loading a function (its module, its warm_up) in a spawned helper

_HEADER = struct.Struct("<Q")
_MESSAGE_IDS = itertools.count(1)
_IN_HELPER = False  # set in helper processes
_LINUX_PRCTL = None
if sys.platform.startswith("linux"):
    try:
        _LINUX_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a forked copy must not dlopen
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        _LINUX_PRCTL = None

# Python 3.12+ warns on every fork of a process with threads; forked helpers are designed for that (see above).
warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning,
                        module=__name__)


class RewardTimeout(TimeoutError):
    """A reward computation ran past its time limit and was stopped."""


class HelperError(RuntimeError):
    """A call failed in a helper process and its exception could not be sent back as itself."""


def in_helper() -> bool:
    """Whether this process is a reward helper (work here is already under a hard limit)."""
    return _IN_HELPER


def describe_error(error: BaseException) -> str:
    """``"ValueError: bad input (my_rewards.py:12 in score)"``: a failure as users read it. Private exception
    classes are named by their nearest public base class."""
    public = next(c for c in type(error).__mro__ if not c.__name__.startswith("_"))
    message = str(error)
    text = f"{public.__name__}: {message}" if message else public.__name__
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    if frames:
        last = frames[-1]
        text += f" ({os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`RewardTimeout` in the block after ``seconds``. Only in a process's main thread (elsewhere the
    block runs unbounded), and only between Python bytecodes: inside a helper it is the polite first limit
    of Python-level work (sympy), and killing the helper is the hard one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"ran past its {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ wire format
def _send(fd: int, payload: Any) -> None:
    """Write one message: its length, then its pickle (pickled first, so a failure writes nothing)."""
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the helper process closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> Any:
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return pickle.loads(_read_exactly(fd, size))


def _failure(error: BaseException, ident: Hashable, pid: int) -> tuple:
    """The reply for a call that raised: its description, and the exception itself when it pickles."""
    try:
        blob = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception holding unpicklable state: send its description only
        blob = None
    return ("error", describe_error(error), blob, ident, pid)


def serve(read_fd: int, write_fd: int, resolve: Callable[[Hashable], Callable]) -> None:
    """A helper's loop: announce readiness, then answer messages until the pipe closes.

    ``("prepare", ref, ident)`` loads the function ``resolve(ref)`` and runs its ``warm_up``; ``("call", ref,
    ident, args, kwargs, post)`` calls it and, with ``post``, passes the result through ``post`` here, under
    the call's limit (a score's ``__float__`` is the reward's code too). Replies are ``("ok", value, ident,
    pid)`` or ``("error", description, pickled exception or None, ident, pid)``: the caller matches each to
    its call. Only this process ever answers: a reward that forks and returns in both processes has its copy
    leave here without a word, and whatever process a call left running is killed before the next message.
    """
    global _IN_HELPER
    import logging

    _IN_HELPER = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its own timeouts
    home = os.getpid()
    functions: dict[Hashable, Callable] = {}
    _send(write_fd, ("ready", home))
    while True:
        try:
            message = _receive(read_fd)
        except EOFError:
            return
        kind, ref, ident = message[:3]
        try:
            if ref not in functions:
                functions[ref] = resolve(ref)
            if kind == "prepare":
                warm_up = getattr(functions[ref], "warm_up", None)
                reply = ("ok", warm_up() if callable(warm_up) else None, ident, home)
            else:
                args, kwargs, post = message[3:]
                value = functions[ref](*args, **kwargs)
                reply = ("ok", post(value) if post is not None else value, ident, home)
        except BaseException as error:  # noqa: BLE001 - even sys.exit() in a reward is reported, not obeyed
            reply = _failure(error, ident, home)
        if os.getpid() != home:  # a copy the reward forked, returning here: the call is not its to answer
            os._exit(0)
        _stop_strays()
        try:
            _send(write_fd, reply)
        except Exception as error:  # noqa: BLE001 - a result that does not pickle
            reason = f"returned a value that cannot be sent back from its helper process ({describe_error(error)})"
            _send(write_fd, ("error", reason, None, ident, home))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # what the reward printed, before the next call (a forked copy never exits cleanly)
            except (OSError, ValueError):
                pass


_KEPT_CHILDREN: set[int] = set()  # processes a helper's code started to outlive calls on purpose


def keep_child(pid: int) -> None:
    """Declare a child process of this helper long-lived (the code sandbox's checker server): it is not
    killed after the call that started it."""
    _KEPT_CHILDREN.add(pid)


def _children() -> set[int]:
    """The child processes of every thread of this process (the kernel lists them per thread)."""
    found = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                found.update(int(pid) for pid in f.read().split())
    except (OSError, ValueError):
        pass
    return found


def _stop_strays() -> None:
    """Kill and reap every child process a call left running, except the kept ones. A helper is a child
    subreaper (:func:`become_helper`), so the orphans of a killed child come back here and are found in the
    next round. Without ``/proc/self/task/*/children`` (not Linux), nothing is done."""
    for _ in range(100):
        strays = _children() - _KEPT_CHILDREN
        if not strays:
            break
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in strays:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    _KEPT_CHILDREN.intersection_update(_children())  # forget kept ones that ended


def become_helper(parent_pid: int) -> None:
    """Set-up of a helper process: ignore Ctrl-C (the parent stops it), die with the parent, and adopt the
    orphans of the processes a reward starts (so that :func:`serve` finds and kills them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _LINUX_PRCTL is not None:
        _LINUX_PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        _LINUX_PRCTL(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


# ------------------------------------------------------------------------------------------------ helpers
_OPEN_FDS: set[int] = set()  # the parent's ends of every helper's pipes (a forked copy closes them)
_OPEN_FDS_LOCK = threading.Lock()


class _Helper:
    """One helper process and the parent's ends of its two pipes; one call at a time."""

    def __init__(self, pid: int, to_fd: int, from_fd: int, popen: subprocess.Popen | None = None):
        self.pid, self.to_fd, self.from_fd, self.popen = pid, to_fd, from_fd, popen
        self.prepared: set[Hashable] = set()
        self.closed = False
        self.exit_status: int | None = None
        with _OPEN_FDS_LOCK:
            _OPEN_FDS.update((to_fd, from_fd))

    def send(self, message: tuple) -> None:
        _send(self.to_fd, message)

    def receive(self) -> Any:
        return _receive(self.from_fd)

    def signal_kill(self) -> None:
        """Send SIGKILL, unless the helper is closed (its pid may belong to another process by now)."""
        if self.closed:
            return
        try:
            if self.popen is not None:
                self.popen.kill()  # knows whether the process was already reaped
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self, *, wait: bool = True) -> None:
        """Kill the process, close the pipes, and reap it: now, or with ``wait=False`` soon, in the background
        (the teardown of a large forked copy takes tens of milliseconds that a batch need not wait for)."""
        if self.closed:
            return
        self.signal_kill()
        self.closed = True
        with _OPEN_FDS_LOCK:
            _OPEN_FDS.difference_update((self.to_fd, self.from_fd))
        for fd in (self.to_fd, self.from_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if wait:
            self.reap()
        else:
            _REAPER.reap(self)

    def reap(self) -> None:
        try:
            self.exit_status = self.popen.wait() if self.popen is not None else _wait_status(self.pid)
        except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler set to SIG_IGN)
            self.exit_status = -signal.SIGKILL

    def death(self) -> str:
        """How the process ended, once :meth:`kill` reaped it."""
        status = self.exit_status
        if status is None or status == -signal.SIGKILL:
            return "its helper process died"
        if status < 0:
            return f"its helper process was killed by {signal.Signals(-status).name}"
        return f"its helper process exited with status {status}"


def _wait_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _spawn_helper() -> _Helper:
    """Start ``python -m dare_gym.rewards.helper_main`` on a fresh pair of pipes."""
    to_read, to_write = os.pipe()
    from_read, from_write = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "dare_gym.rewards.helper_main", str(to_read), str(from_write), str(os.getpid())],
            pass_fds=(to_read, from_write), stdin=subprocess.DEVNULL, env=env,
        )
    except BaseException:
        for fd in (to_read, to_write, from_read, from_write):
            os.close(fd)
        raise
    os.close(to_read)
    os.close(from_write)
    return _Helper(popen.pid, to_write, from_read, popen)


def _fork_helper(resolve: Callable[[Hashable], Callable]) -> _Helper:
    """Fork this process into a helper that serves ``resolve(ref)`` from its copy of memory."""
    to_read, to_write = os.pipe()
    from_read, from_write = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # or the copy would print the parent's buffered output a second time
        except (OSError, ValueError):
            pass
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the copy: serve, and never return into the parent's code
        status = 1
        try:
            with _OPEN_FDS_LOCK:
                inherited = set(_OPEN_FDS)
            for fd in inherited | {to_write, from_read}:
                try:
                    os.close(fd)
                except OSError:
                    pass
            become_helper(parent)
            serve(to_read, from_write, resolve)
            status = 0
        finally:
            os._exit(status)
    os.close(to_read)
    os.close(from_write)
    return _Helper(pid, to_write, from_read)


class _Launcher:
    """Starts helper processes from one long-lived daemon thread (see the module docstring: PR_SET_PDEATHSIG)."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, make: Callable[[], _Helper]) -> _Helper:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="dare_gym-reward-launcher", daemon=True)
                self._thread.start()
        done, box = threading.Event(), []
        self._jobs.put((make, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _loop(self) -> None:
        while True:
            make, box, done = self._jobs.get()
            try:
                box.append(make())
            except BaseException as error:  # noqa: BLE001 - handed to the thread that asked
                box.append(error)
            done.set()


_LAUNCHER = _Launcher()


class _Reaper:
    """Reaps killed helpers on a daemon thread (waiting for a process's teardown is all it does)."""

    def __init__(self):
        self._helpers: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def reap(self, helper: _Helper) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="dare_gym-reward-reaper", daemon=True)
                self._thread.start()
        self._helpers.put(helper)

    def _loop(self) -> None:
        while True:
            self._helpers.get().reap()


_REAPER = _Reaper()


# ------------------------------------------------------------------------------------------------ pools
class _Pool:
    """Helper processes of one kind: idle ones to reuse, and a cap on how many live at once.

    ``scale_up_after_s``: None starts helpers as calls need them; a number starts one more only once every
    call this batch has running in the pool has run that long (a fork is worth it for slow calls only).
    """

    scale_up_after_s: float | None = None

    def __init__(self, max_workers: int, keep_idle: int):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self.max_workers, self.keep_idle = max_workers, keep_idle
        self._idle: list[_Helper] = []
        self._live: set[_Helper] = set()
        self._reserved = 0
        self._changed = threading.Condition()

    def reference(self, fn: Callable) -> Hashable:
        raise NotImplementedError

    def _make(self) -> _Helper:
        raise NotImplementedError

    def take(self) -> _Helper | None:
        """An idle, ready helper, or None."""
        with self._changed:
            while self._idle:
                helper = self._idle.pop()
                if helper.popen is None or helper.popen.poll() is None:
                    return helper
                helper.kill()  # died while idle (killed from outside): reap it and free its place
                self._live.discard(helper)
            return None

    def reserve(self) -> bool:
        """Claim room for one more process; False at the cap."""
        with self._changed:
            if len(self._live) + self._reserved >= self.max_workers:
                return False
            self._reserved += 1
            return True

    def start(self) -> _Helper:
        """Start a helper in a reserved place (it announces readiness on its pipe)."""
        try:
            helper = _LAUNCHER.start(self._make)
        except BaseException:
            with self._changed:
                self._reserved -= 1
                self._changed.notify_all()
            raise
        with self._changed:
            self._reserved -= 1
            self._live.add(helper)
        return helper

    def give_back(self, helper: _Helper) -> None:
        with self._changed:
            if len(self._idle) < self.keep_idle:
                self._idle.append(helper)
                self._changed.notify_all()
                return
        self.discard(helper)

    def discard(self, helper: _Helper, *, wait: bool = True) -> None:
        """Kill a helper (busy or broken) and free its place; ``wait=False`` reaps it in the background."""
        helper.kill(wait=wait)
        with self._changed:
            self._live.discard(helper)
            self._changed.notify_all()

    def wait(self, seconds: float) -> None:
        """Wait (at most ``seconds``) for a helper to come back or to go."""
        with self._changed:
            self._changed.wait(seconds)

    def close(self, *, wait: bool = True) -> None:
        """Kill every helper of this pool, busy ones included (``wait=False``: reap them in the background)."""
        with self._changed:
            helpers = list(self._live)
            self._idle.clear()
        for helper in helpers:
            self.discard(helper, wait=wait)


class TimeoutPool(_Pool):
    """Long-lived spawned helpers for functions sent by reference (module-level functions of importable
    modules); up to ``max_workers`` at once, ``keep_idle`` kept between batches."""

    def __init__(self, max_workers: int = MAX_WORKERS, keep_idle: int | None = None):
        super().__init__(max_workers, min(max_workers, BASE_WORKERS) if keep_idle is None else keep_idle)

    def reference(self, fn: Callable) -> Hashable:
        return pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)

    def _make(self) -> _Helper:
        return _spawn_helper()

    def call(self, fn: Callable, *args: Any, timeout: float) -> Any:
        """``fn(*args)`` in a helper; raises :class:`RewardTimeout` after ``timeout`` seconds, or whatever
        ``fn`` raised (:class:`HelperError` with its description if that does not pickle)."""
        outcome = _Scheduler([(self, self.reference(fn), Call(fn, args))], timeout).run()[0]
        if outcome.timed_out:
            raise RewardTimeout(f"{getattr(fn, '__name__', fn)} ran past its {timeout:g} s limit")
        if outcome.error is not None:
            raise outcome.exception or HelperError(outcome.error)
        return outcome.value


class ForkPool(_Pool):
    """Helpers forked from this process for one batch; they serve the callables given to :meth:`reference`
    before they were forked. Close it when the batch is done.

    Forking a large process (a trainer) takes tens of milliseconds, so one copy serves a batch of quick calls,
    and another is forked only when every copy's call has run ``scale_up_after_s``.
    """

    scale_up_after_s = 0.02

    def __init__(self, max_workers: int = MAX_WORKERS):
        super().__init__(max_workers, keep_idle=max_workers)
        self._functions: list[Callable] = []

    def reference(self, fn: Callable) -> Hashable:
        for index, known in enumerate(self._functions):
            if known is fn:
                return index
        self._functions.append(fn)
        return len(self._functions) - 1

    def _make(self) -> _Helper:
        helper = _fork_helper(self._functions.__getitem__)
        helper.prepared.update(range(len(self._functions)))  # nothing to load: the copy has them all
        return helper


_DEFAULT_POOL: TimeoutPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> TimeoutPool:
    """The process-wide pool of spawned helpers, closed at exit."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None:
            _DEFAULT_POOL = TimeoutPool()
            atexit.register(_DEFAULT_POOL.close)
        return _DEFAULT_POOL


def _forget_parent_state() -> None:
    """In a forked child: the helpers and the launcher thread belong to the parent (the thread does not exist
    here); start afresh if this copy ever needs them."""
    global _DEFAULT_POOL, _LAUNCHER, _REAPER, _OPEN_FDS_LOCK, _DEFAULT_POOL_LOCK
    _DEFAULT_POOL, _LAUNCHER, _REAPER = None, _Launcher(), _Reaper()
    _OPEN_FDS_LOCK, _DEFAULT_POOL_LOCK = threading.Lock(), threading.Lock()
    _KEPT_CHILDREN.clear()  # the parent's children are not this copy's (their pids may come back as its own)


os.register_at_fork(after_in_child=_forget_parent_state)


def sends_by_reference(fn: Callable) -> bool:
    """Whether ``fn`` is one of the project's module-level functions, which a spawned helper imports by name;
    anything else (users' functions, lambdas, closures, methods, callable objects) is served by a fork."""
    module_name = getattr(fn, "__module__", None) or ""
    if not inspect.isfunction(fn) or module_name.split(".")[0] != "dare_gym" or "<" in fn.__qualname__:
        return False
    target: Any = sys.modules.get(module_name)
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is fn


# ------------------------------------------------------------------------------------------------ scheduling
@dataclass
class Call:
    """One function call to run in a helper: ``fn(*args, **kwargs)``, its result passed through ``post`` (a
    module-level function) in the helper when given."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    post: Callable | None = None


@dataclass
class Outcome:
    """What a call came to: its value, or why it failed (``error``, for people; ``exception``, the failure
    itself where it could be sent back); ``timed_out`` when it was stopped at its limit."""

    value: Any = None
    error: str | None = None
    exception: BaseException | None = None
    timed_out: bool = False


@dataclass
class _Slot:
    """A helper busy for one call: starting, loading the function, or running it since ``since``."""

    pool: _Pool
    helper: _Helper
    job: int
    phase: str  # "start" | "prepare" | "call"
    since: float
    deadline: float
    ident: int | None = None  # what the reply must name (see serve)


class _Scheduler:
    """Runs jobs ``(pool, reference, call)`` in parallel helpers, each call under ``timeout`` seconds."""

    def __init__(self, jobs: Sequence[tuple[_Pool, Hashable, Call]], timeout: float):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self.jobs, self.timeout = list(jobs), timeout
        self.long_s = min(LONG_CALL_S, timeout / 10)
        self.outcomes: list[Outcome | None] = [None] * len(self.jobs)
        self.pending = collections.deque(range(len(self.jobs)))
        self.retries = collections.Counter()
        self.slots: dict[int, _Slot] = {}
        self.selector = selectors.DefaultSelector()

    def run(self) -> list[Outcome]:
        try:
            while self.pending or self.slots:
                self._dispatch()
                self._wait()
                self._expire()
        finally:
            for slot in list(self.slots.values()):  # interrupted (Ctrl-C): stop what still runs
                self._drop(slot)
                slot.pool.discard(slot.helper, wait=False)
            self.selector.close()
        return self.outcomes

    # -- starting calls
    def _dispatch(self) -> None:
        now = time.monotonic()
        long = sum(1 for s in self.slots.values() if s.phase == "call" and now - s.since >= self.long_s)
        busy = len(self.slots) - long
        while self.pending and busy < BASE_WORKERS + long and len(self.slots) < MAX_WORKERS:
            job = self.pending[0]
            pool = self.jobs[job][0]
            helper = pool.take()
            if helper is None and not (self._may_start(pool, now) and pool.reserve()):
                return  # wait: for calls to run long enough, or for a helper to come back (the pool's cap)
            self.pending.popleft()
            busy += 1
            if helper is not None:
                self._begin(pool, helper, job)
                continue
            try:
                helper = pool.start()
            except OSError as error:
                self.outcomes[job] = Outcome(error=f"could not start a helper process ({describe_error(error)})")
                continue
            now = time.monotonic()
            self._add(_Slot(pool, helper, job, "start", now, now + START_LIMIT_S))

    def _may_start(self, pool: _Pool, now: float) -> bool:
        """Whether to start one more helper in ``pool`` now (see ``_Pool.scale_up_after_s``)."""
        if pool.scale_up_after_s is None:
            return True
        return all(s.phase == "call" and now - s.since >= pool.scale_up_after_s
                   for s in self.slots.values() if s.pool is pool)

    def _begin(self, pool: _Pool, helper: _Helper, job: int) -> None:
        """Send a ready helper its job: the function to load first if it does not have it, else the call."""
        _, ref, call = self.jobs[job]
        phase = "call" if ref in helper.prepared else "prepare"
        ident = next(_MESSAGE_IDS)  # names the reply this message must get: anything else means a broken helper
        message = (("call", ref, ident, call.args, call.kwargs, call.post) if phase == "call"
                   else ("prepare", ref, ident))
        try:
            helper.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError):  # it died while idle: run the job elsewhere
            pool.discard(helper)
            self._retry(job, "its helper process died before the call")
            return
        except Exception as error:  # noqa: BLE001 - arguments that do not pickle; the helper is still fine
            pool.give_back(helper)
            self.outcomes[job] = Outcome(error=f"its arguments cannot be sent to a helper process "
                                               f"({describe_error(error)})")
            return
        now = time.monotonic()
        limit = self.timeout if phase == "call" else PREPARE_LIMIT_S
        self._add(_Slot(pool, helper, job, phase, now, now + limit, ident))

    def _retry(self, job: int, reason: str) -> None:
        self.retries[job] += 1
        if self.retries[job] > 2:
            self.outcomes[job] = Outcome(error=reason)
        else:
            self.pending.appendleft(job)

    # -- waiting for replies and deadlines
    def _add(self, slot: _Slot) -> None:
        self.slots[slot.helper.from_fd] = slot
        self.selector.register(slot.helper.from_fd, selectors.EVENT_READ)

    def _drop(self, slot: _Slot) -> None:
        del self.slots[slot.helper.from_fd]
        self.selector.unregister(slot.helper.from_fd)

    def _wait(self) -> None:
        if not self.slots:
            if self.pending:
                self.jobs[self.pending[0]][0].wait(0.05)
            return
        now = time.monotonic()
        wake = min(s.deadline for s in self.slots.values())
        if self.pending:  # a call turning long, or slow enough to fork for, frees room for the next one
            for slot in self.slots.values():
                if slot.phase == "call":
                    marks = (self.long_s, slot.pool.scale_up_after_s or self.long_s)
                    wake = min([wake, *(slot.since + m for m in marks if now - slot.since < m)])
        for key, _ in self.selector.select(max(0.0, wake - now)):
            self._reply(self.slots[key.fd])

    def _reply(self, slot: _Slot) -> None:
        self._drop(slot)
        _, ref, _ = self.jobs[slot.job]
        try:
            message = slot.helper.receive()
        except (EOFError, OSError, pickle.UnpicklingError):
            slot.pool.discard(slot.helper)
            reason = slot.helper.death()
            if slot.phase == "call":
                self.outcomes[slot.job] = Outcome(error=f"{reason} during the call")
            else:
                self._retry(slot.job, f"{reason} while {'starting' if slot.phase == 'start' else 'loading the reward'}")
            return
        expected = ("ready", slot.helper.pid) if slot.phase == "start" else (slot.ident, slot.helper.pid)
        if tuple(message[-2:]) != expected:  # another process wrote on its pipe (a reward that forked, say)
            slot.pool.discard(slot.helper)
            self.outcomes[slot.job] = Outcome(error="its helper process answered for another call or process "
                                                    "(stopped): no score can be trusted from it")
            return
        if slot.phase == "start":  # ready
            self._begin(slot.pool, slot.helper, slot.job)
        elif message[0] == "error":
            slot.pool.give_back(slot.helper)
            prefix = "" if slot.phase == "call" else "could not load the reward in its helper process: "
            self.outcomes[slot.job] = Outcome(error=prefix + message[1], exception=_unpickle_error(message[2]))
        elif slot.phase == "prepare":
            slot.helper.prepared.add(ref)
            self._begin(slot.pool, slot.helper, slot.job)
        else:
            slot.pool.give_back(slot.helper)
            self.outcomes[slot.job] = Outcome(value=message[1])

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [s for s in self.slots.values() if now >= s.deadline]
        for slot in expired:
            slot.helper.signal_kill()  # all at once first: reaping one must not delay killing the next
        for slot in expired:
            self._drop(slot)
            slot.pool.discard(slot.helper, wait=False)
            if slot.phase == "call":
                self.outcomes[slot.job] = Outcome(error=f"timed out after {self.timeout:g} s (stopped)",
                                                  timed_out=True)
            elif slot.phase == "start":
                self.outcomes[slot.job] = Outcome(error=f"its helper process did not start within {START_LIMIT_S:g} s")
            else:
                self.outcomes[slot.job] = Outcome(error=f"loading the reward in its helper process took longer "
                                                        f"than {PREPARE_LIMIT_S:g} s")


def _unpickle_error(blob: bytes | None) -> BaseException | None:
    if blob is None:
        return None
    try:
        error = pickle.loads(blob)
    except Exception:  # noqa: BLE001 - an exception class this process cannot rebuild
        return None
    return error if isinstance(error, BaseException) else None


def run_calls(calls: Sequence[Call], timeout: float) -> list[Outcome]:
    """Run ``calls`` in helper processes, in parallel, each stopped once it has run ``timeout`` seconds.

    The project's own functions go to the shared spawned helpers; every other callable to helpers forked from
    this process for this batch (killed when it returns).
    """
    fork_pool: ForkPool | None = None
    jobs = []
    for call in calls:
        if sends_by_reference(call.fn):
            pool: _Pool = default_pool()
        else:
            fork_pool = fork_pool or ForkPool()
            pool = fork_pool
        jobs.append((pool, pool.reference(call.fn), call))
    try:
        return _Scheduler(jobs, timeout).run()
    finally:
        if fork_pool is not None:
            fork_pool.close(wait=False)


def run_with_timeout(fn: Callable, *args: Any, timeout: float) -> Any:
    """``fn(*args)`` in a spawned helper (``fn`` must be importable by name), stopped after ``timeout`` seconds
    with :class:`RewardTimeout`."""
    return default_pool().call(fn, *args, timeout=timeout)
