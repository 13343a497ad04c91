"""The trusted side of a sandboxed check: run a benchmark's test code against proxies of the program's functions.

:mod:`dare_gym.rewards.sandbox` runs this module (through :mod:`dare_gym.rewards.sandbox_boot`) in a
process of its own, beside the sandboxed program (:mod:`dare_gym.rewards.sandbox_harness`), with the parent's
privileges but its own time, CPU and memory limits: a fork of the checker server (:func:`serve`, one per
parent process, which has the common imports of test code done) or, where that is unavailable, a fresh
interpreter. The program's process never holds the test code, and this process never holds an object of the
program's:

1. the benchmark's trusted prelude runs here (HumanEval's prompt header, whose helpers such as HumanEval/32's
   ``poly`` or /38's ``encode_cyclic`` the tests call);
2. once the program reports that it loaded, each name in ``functions`` is bound to a :class:`ProgramFunction`,
   a proxy that sends its arguments to the program as plain data and returns the plain-data result
   (:mod:`dare_gym.rewards.sandbox_protocol`); each name in ``remote_names`` (what the benchmark's setup code
   built inside the program) to a :class:`~dare_gym.rewards.sandbox_protocol.Reference` that calls can pass;
3. the test code runs here; every comparison it makes is between builtin values built by this process;
4. ``finish``: the program must confirm that it left nothing running.

The verdict, written on a pipe only the parent reads, is ``pass`` only if the test code ran to its end, no call
ever failed (the program died, hung up, broke the protocol, returned something that is not plain data, or
raised ``SystemExit`` and the like) and the program said goodbye. Such a failure raises :class:`ProgramFailure`,
a ``BaseException`` a test's ``except Exception`` does not catch, and is also recorded, so a test that swallows
it with a bare ``except`` still fails. Builtin exceptions the program raises come back as the same builtin
class (``StopIteration`` as ``RuntimeError``: it would otherwise end a test's loop early), so tests that expect
an exception still work; the program can choose to raise, but not what the test makes of it.
"""

from __future__ import annotations

import builtins
import os
import resource
import sys

from . import sandbox_protocol as protocol

__all__ = ["CheckerError", "ProgramFailure", "ProgramFunction", "main", "run_check", "serve"]

_REASON_CHARS = 4000


class ProgramFailure(BaseException):
    """The program cannot answer any more (a ``BaseException``: a test's ``except Exception`` lets it through)."""


class CheckerError(BaseException):
    """The test asked for something the protocol cannot do (e.g. passed a function to the program)."""


class Channel:
    """The checker's end of the conversation with one program; remembers the first failure for good."""

    def __init__(self, call_fd: int, reply_fd: int):
        self.call_fd, self.reply_fd = call_fd, reply_fd
        self.failure: tuple[str, str] | None = None  # (verdict kind, reason)
        self.checker_error: str | None = None
        self.calls = 0
        self.handles: dict[int, protocol.Handle] = {}  # one handle per object of the program's

    def fail(self, kind: str, reason: str) -> ProgramFailure:
        if self.failure is None:
            self.failure = (kind, reason[:_REASON_CHARS])
        return ProgramFailure(self.failure[1])

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise ProgramFailure(self.failure[1])

    def receive(self, during: str) -> dict:
        self._check_alive()
        try:
            message = protocol.read_message(self.reply_fd)
        except protocol.ProtocolError as error:
            raise self.fail("died", f"the program broke the protocol {during}: {error}") from None
        if message is None:
            raise self.fail("died", f"the program stopped answering {during} (it exited or closed its channel)")
        return message

    def send(self, message: dict, during: str) -> None:
        self._check_alive()
        try:
            protocol.write_message(self.call_fd, message)
        except OSError:
            raise self.fail("died", f"the program stopped listening {during}") from None

    def wait_until_loaded(self) -> None:
        message = self.receive("while it loaded")
        if message.get("ready") is True:
            return
        if type(message.get("load_error")) is str:
            raise self.fail("fail", message["load_error"])
        if type(message.get("setup_error")) is str:
            raise self.fail("error", message["setup_error"])
        raise self.fail("died", "the program broke the protocol while it loaded: unexpected first message")

    def call(self, name: str, args: tuple, kwargs: dict, *, constructor: bool = False):
        """``name(*args, **kwargs)`` in the program; a ``constructor`` (a class of the program's) may answer with
        an object that stays there, which comes back as a :class:`~dare_gym.rewards.sandbox_protocol.Handle`."""
        self._check_alive()
        self.calls += 1
        ident, during = self.calls, f"in call {self.calls} ({name})"
        request = {"op": "call", "id": ident, "function": name, "args": list(args), "kwargs": dict(kwargs),
                   "handle": constructor}
        try:
            self.send(request, during)
        except protocol.Unencodable as error:
            self.checker_error = f"the test passes {name}() {error}: the sandbox carries plain data only"
            raise CheckerError(self.checker_error) from None
        reply = self.receive(during)
        if reply.get("id") != ident:
            raise self.fail("died", f"the program broke the protocol {during}: a reply to another call")
        if "ok" in reply:
            return reply["ok"]
        if "handle" in reply:
            number = reply["handle"]
            if not constructor or type(number) is not int:
                raise self.fail("died", f"the program broke the protocol {during}: a handle it was not asked for")
            return self.handles.setdefault(number, protocol.Handle(number))
        if "raise" in reply:
            raise self._exception(name, reply["raise"], during)
        if type(reply.get("bad")) is str:
            raise self.fail("fail", f"{name}() could not answer in plain data: {reply['bad']}")
        raise self.fail("died", f"the program broke the protocol {during}: a reply without a result")

    def _exception(self, function: str, raised, during: str) -> BaseException:
        if type(raised) is not list or len(raised) != 2 or any(type(part) is not str for part in raised):
            return self.fail("died", f"the program broke the protocol {during}: a malformed exception")
        name, message = raised
        cls = getattr(builtins, name, None) if name.isidentifier() else None
        if name in ("StopIteration", "StopAsyncIteration"):
            cls, message = RuntimeError, f"{name}: {message}"
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            return self.fail("fail", f"the program's {function}() raised {name[:100]}: {message[:500]}")
        error: BaseException = Exception(message)
        for candidate in cls.__mro__:  # some builtin exceptions need more than a message to be made
            try:
                error = candidate(message)
                break
            except Exception:
                continue
        error.raised_by_program = function  # type: ignore[attr-defined]  (for the verdict's reason)
        return error

    def finish(self) -> None:
        self.send({"op": "finish"}, "at the end")
        reply = self.receive("at the end")
        if reply.get("bye") is True:
            return
        if type(reply.get("left")) is str:
            raise self.fail("fail", reply["left"])
        raise self.fail("died", "the program broke the protocol at the end")


class ProgramFunction:
    """Stands for a function of the sandboxed program: calling it is a round trip of plain data."""

    __slots__ = ("_channel", "__name__", "_constructor")

    def __init__(self, channel: Channel, name: str, constructor: bool = False):
        self._channel = channel
        self.__name__ = name
        self._constructor = constructor

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs, constructor=self._constructor)

    def __repr__(self) -> str:
        return f"<function {self.__name__} of the sandboxed program>"


def describe_failure(error: BaseException, sources: dict[str, str]) -> str:
    """One line for a failed test: the exception, who raised it, and the test's line."""
    try:
        text = str(error)
    except Exception:
        text = "<unprintable>"
    origin = getattr(error, "raised_by_program", None)
    where = ""
    tb = error.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in sources:
            lines = sources[filename].splitlines()
            line = lines[tb.tb_lineno - 1].strip() if 0 < tb.tb_lineno <= len(lines) else ""
            where = f" at {filename[1:-1]} line {tb.tb_lineno}" + (f": {line}" if line else "")
        tb = tb.tb_next
    by = f" (raised by the program's {origin}())" if origin else ""
    return f"{type(error).__name__}{': ' + text if text else ''}{by}{where}"[:_REASON_CHARS]


def run_check(spec: dict, channel: Channel) -> tuple[str, str]:
    """Run one check; returns the verdict ``(kind, reason)`` with kind ``pass``/``fail``/``died``/``error``."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    sources = {"<prelude>": spec["prelude"], "<test>": spec["test"]}
    try:
        for module in spec["modules"]:
            __import__(module)
            namespace[module] = sys.modules[module]
        exec(compile(spec["prelude"], "<prelude>", "exec", dont_inherit=True), namespace)
        test = compile(spec["test"], "<test>", "exec", dont_inherit=True)
    except BaseException as error:
        return "error", "the benchmark's own code failed before the test: " + describe_failure(error, sources)
    failure = None
    try:
        channel.wait_until_loaded()
        constructors = set(spec.get("constructors", ()))
        for name in spec["functions"]:
            namespace[name] = ProgramFunction(channel, name, constructor=name in constructors)
        for name in spec["remote_names"]:
            namespace[name] = protocol.Reference(name)
        exec(test, namespace)
    except (ProgramFailure, CheckerError):
        pass  # recorded in the channel
    except BaseException as error:
        failure = describe_failure(error, sources)
    if channel.checker_error is not None:
        return "error", channel.checker_error
    if channel.failure is None and failure is None:
        try:
            channel.finish()
        except ProgramFailure:
            pass
    if channel.failure is not None:
        return channel.failure
    if failure is not None:
        return "fail", failure
    return "pass", ""


def _set_limit(which: int, soft: int, hard: int) -> None:
    _old_soft, old_hard = resource.getrlimit(which)
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(which, (soft, hard))


def main(payload: dict) -> None:
    """Run one check (in a fresh interpreter, or in a fork of the server) and write its verdict; never returns."""
    folder = payload["folder"]
    os.chdir(folder)
    os.environ["HOME"] = os.environ["TMPDIR"] = folder
    limits = payload["rlimits"]
    _set_limit(resource.RLIMIT_CPU, limits["cpu"], limits["cpu"] + 1)
    _set_limit(resource.RLIMIT_AS, limits["as"], limits["as"])
    _set_limit(resource.RLIMIT_CORE, 0, 0)
    sys.path.extend(p for p in payload.get("site_paths", ()) if p not in sys.path)
    channel = Channel(payload["call_fd"], payload["reply_fd"])
    try:
        kind, reason = run_check(payload["spec"], channel)
    except BaseException as error:  # a bug here must never read as a pass
        kind, reason = "error", f"the checker failed: {type(error).__name__}: {error}"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    protocol.write_message(payload["verdict_fd"], {"verdict": kind, "reason": reason[:_REASON_CHARS]})
    os._exit(0)


# ------------------------------------------------------------------------------------------------ the server


def serve(payload: dict) -> None:
    """The checker server's loop (see ``_CheckerServer`` in :mod:`dare_gym.rewards.sandbox`): import what test
    code commonly needs once, then fork one checker per request and answer with a pidfd of it. Ends when the
    parent closes its end of the socket."""
    import socket

    sys.path.extend(p for p in payload["site_paths"] if p not in sys.path)
    for name in payload["preload"]:
        try:
            __import__(name)
        except Exception:
            pass
    server = socket.socket(fileno=payload["socket_fd"])
    while True:
        _reap_children()
        try:
            message, fds, _flags, _address = socket.recv_fds(server, 64, 8)
        except OSError:
            break
        if not message:  # the parent closed its end: it has exited
            break
        if message != b"check" or len(fds) != 5:
            _close_all(fds)
            server.send(b"refused")
            continue
        pid = os.fork()
        if pid == 0:
            server.close()
            _run_forked(*fds)
        _close_all(fds)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            server.send(b"failed")
            continue
        try:
            socket.send_fds(server, [b"forked"], [pidfd])
        finally:
            os.close(pidfd)
    os._exit(0)


def _run_forked(payload_fd: int, call_fd: int, reply_fd: int, verdict_fd: int, output_fd: int) -> None:
    """In the fork: its own session, fresh random state, the run's output pipe as stdout and stderr, then the
    check."""
    import marshal

    try:
        os.setsid()
        # every fork starts with the server's memory: without this, generators the preloaded modules hold would
        # give every check the same "random" draws (the random module reseeds its own at fork; this makes sure)
        if "random" in sys.modules:
            sys.modules["random"].seed()
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        with open(payload_fd, "rb") as stream:
            payload = marshal.load(stream)
        payload.update(call_fd=call_fd, reply_fd=reply_fd, verdict_fd=verdict_fd)
    except BaseException:
        os._exit(1)
    main(payload)


def _reap_children() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
