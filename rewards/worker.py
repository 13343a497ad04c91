"""Run reward computations in helper processes with a hard wall-clock limit.

Symbolic checkers (sympy under math-verify) can run for minutes on adversarial input, and math-verify's own
timeout uses ``signal.alarm``, which only works in the main thread. Here the limit is owned by the caller: the
call runs in a long-lived helper process (``python -m dare_gym.rewards.helper_main``) and, if it overruns, the
helper is killed and replaced. Any thread may call; calls from several threads run in parallel helpers.

Functions are sent by reference (module-level functions pickle as their import path), so the helper imports
the module the function lives in.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
from typing import Any, Callable

_HEADER = struct.Struct("<Q")


class RewardTimeout(TimeoutError):
    """A reward computation ran past its time limit and was killed."""


def _write_message(stream, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError("the helper process closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _Helper:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dare_gym.rewards.helper_main"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def call(self, fn: Callable, args: tuple, timeout: float) -> Any:
        _write_message(self.process.stdin, (fn, args))
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            self.kill()
            raise RewardTimeout(f"{getattr(fn, '__name__', fn)} ran past its {timeout:g} s limit")
        (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
        status, value = pickle.loads(_read_exactly(fd, size))
        if status == "error":
            raise value
        return value

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:  # the helper died mid-message; the pipe is gone either way
                pass


class TimeoutPool:
    """Up to ``max_workers`` helper processes, started lazily and replaced when killed."""

    def __init__(self, max_workers: int = 2):
        self.max_workers = max_workers
        self._idle: queue.LifoQueue[_Helper] = queue.LifoQueue()
        self._started = 0
        self._lock = threading.Lock()
        self._all: list[_Helper] = []

    def _acquire(self) -> _Helper:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._started < self.max_workers:
                self._started += 1
                helper = _Helper()
                self._all.append(helper)
                return helper
        return self._idle.get()

    def call(self, fn: Callable, *args: Any, timeout: float) -> Any:
        """``fn(*args)`` in a helper; raises :class:`RewardTimeout` after ``timeout`` seconds, or whatever
        ``fn`` raised."""
        helper = self._acquire()
        try:
            return helper.call(fn, args, timeout)
        except (RewardTimeout, EOFError, BrokenPipeError):
            helper.kill()
            with self._lock:
                self._all.remove(helper)
                helper = _Helper()
                self._all.append(helper)
            raise
        finally:
            self._idle.put(helper)

    def close(self) -> None:
        with self._lock:
            for helper in self._all:
                helper.kill()
            self._all.clear()


_DEFAULT_POOL: TimeoutPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> TimeoutPool:
    """The process-wide pool (as many helpers as CPU cores), closed at exit."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None:
            _DEFAULT_POOL = TimeoutPool(max_workers=max(1, os.cpu_count() or 1))
            atexit.register(_DEFAULT_POOL.close)
        return _DEFAULT_POOL


def run_with_timeout(fn: Callable, *args: Any, timeout: float) -> Any:
    return default_pool().call(fn, *args, timeout=timeout)


def serve() -> None:
    """The helper's loop: read (function, args) messages from stdin, write (status, value) replies."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its own timeouts
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything the function prints must not corrupt the reply stream
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(header)
        fn, args = pickle.loads(stdin.read(size))
        try:
            reply = ("ok", fn(*args))
        except Exception as error:  # noqa: BLE001 - sent back and re-raised in the caller
            reply = ("error", error)
        try:
            _write_message(stdout, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            _write_message(stdout, ("error", RuntimeError(f"unpicklable result: {error}")))
