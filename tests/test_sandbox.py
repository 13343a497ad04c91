"""The sandbox (dare_gym.rewards.sandbox): isolation of the program, and a verdict that the program cannot reach.

Every hostile program of the corpus runs twice, side by side: as a whole program (``run_program``: it must not
pass, must return in time and must leave nothing behind) and as the solution of a check it fails
(``check_program``: whatever it does, the failing solution must not pass). The verdict section attacks the
checker directly: programs that rewrite everything they can reach, start sub-interpreters, die at every moment
of the protocol, or answer with objects. The code rewards are tested in tests/test_code_rewards.py.
Run with ``-s`` to see what each hostile program got.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dare_gym.rewards import code_checker, sandbox_boot, sandbox_harness, sandbox_protocol
from dare_gym.rewards import sandbox as sb

REPO = Path(__file__).resolve().parents[1]
HOSTILE = sb.SandboxLimits(timeout_s=2.0)
SLACK_S = 1.0  # every run must return within its timeout plus this
FAILING_SPEC = sb.CheckSpec(test="assert solve(2) == 4\nassert solve(5) == 25\n", functions=("solve",))
WRONG_SOLVE = "\n\ndef solve(x):\n    return x + 1\n"  # appended to a hostile program: a failing solution


@pytest.fixture(scope="module")
def report() -> dict:
    return sb.isolation_report()


@pytest.fixture(scope="module")
def isolated(report) -> bool:
    """Whether the full isolation (namespaces, per-run uid, cgroups) is active here."""
    return all(report[k] for k in ("network_namespace", "pid_namespace", "mount_namespace", "unprivileged_uid"))


# ------------------------------------------------------------------------------------------------ helpers


def _proc_entries():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield entry


def _slot_is_free(uid: int) -> bool:
    """Whether no run (of any process on the host) holds this uid's slot right now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(f"\0dare_gym_sandbox/uid/{uid}")
        return True
    except OSError:
        return False
    finally:
        probe.close()


LINGER_S = 5.0  # how long a run's last process may take to vanish once its slot is free (see below)


def _sandbox_uid_processes() -> list[tuple[int, int]]:
    """Processes on the host that run as a per-run uid that no run holds any more: left over from a run.
    (Other processes on the host, the rest of the test suite say, may be running sandboxes right now.)

    A run whose caller was killed (a reward worker at its time limit, on the other pytest worker say) frees
    its slot at once, while its harness, killed by the parent-death signal, stays a zombie until the host's
    init reaps it: about 1.3 s on this project's machines. So a process counts as left over only if it is
    still there after ``LINGER_S``; one that escaped its run lives on forever."""
    end = time.monotonic() + LINGER_S
    while True:
        found = [(pid, uid) for pid, uid in _uid_processes() if _slot_is_free(uid)]
        found = [(pid, uid) for pid, uid in found if Path(f"/proc/{pid}").exists()]
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def _uid_processes() -> list[tuple[int, int]]:
    low, high = sb._UID_BASE, sb._UID_BASE + sb._UID_SLOTS
    found = []
    for entry in _proc_entries():
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                        if low <= uid < high:
                            found.append((int(entry), uid))
                        break
        except (OSError, ValueError):
            continue
    return found


def _processes_with(marker: str) -> list[int]:
    """Host processes whose command line contains ``marker``."""
    found = []
    needle = marker.encode()
    for entry in _proc_entries():
        if int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def private_tempdir():
    """The runs of this module make their folders in a folder of its own (other processes on the host may be
    running sandboxes in the shared temporary folder meanwhile)."""
    folder = tempfile.mkdtemp(prefix="dare_gym_test_runs_")
    os.chmod(folder, 0o755)  # the per-run uid must be able to traverse it (fallback without a mount namespace)
    old, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = old
        shutil.rmtree(folder, ignore_errors=True)


def _leftover_workdirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir())
            if name.startswith(("dare_gym_sandbox_", "dare_gym_checker_"))}


def _run_hostile(source: str, limits: sb.SandboxLimits = HOSTILE) -> sb.ExecutionResult:
    """Run a hostile program twice side by side, as a whole program and as a failing solution of a check:
    neither may pass, both must return in time, and nothing may be left behind. Returns the whole-program
    result (its reason and output are what the program's own run says)."""
    workdirs_before = _leftover_workdirs()
    source = textwrap.dedent(source)
    start = time.monotonic()
    whole, checked = sb.check_programs([(source, sb.CheckSpec()), (source + WRONG_SOLVE, FAILING_SPEC)], limits,
                                       workers=2)
    elapsed = time.monotonic() - start
    print(f"    -> {whole.status:8s} {elapsed:5.2f}s  {whole.reason[:100]}")
    print(f"       checked: {checked.status:8s} {checked.reason[:100]}")
    assert not whole.passed, f"a hostile program passed: {whole}"
    assert not checked.passed, f"a hostile failing solution passed: {checked}"
    assert elapsed <= limits.timeout_s + SLACK_S, f"took {elapsed:.2f}s for a {limits.timeout_s}s limit"
    assert whole.duration_s <= limits.timeout_s + SLACK_S and checked.duration_s <= limits.timeout_s + SLACK_S
    assert _sandbox_uid_processes() == [], "a process of the sandbox outlived its run"
    assert _leftover_workdirs() - workdirs_before == set(), "a sandbox working directory was left behind"
    return whole


# ------------------------------------------------------------------------------------------------ basics


def test_isolation_report_names_the_active_layers(report):
    print("\n    isolation:", json.dumps(report, indent=None, default=str))
    assert report["fresh_process"] and report["new_session"] and report["clean_env"] and report["separate_checker"]
    assert {"RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC"} <= set(report["rlimits"])
    for layer in ("network_namespace", "pid_namespace", "mount_namespace", "ipc_namespace", "uts_namespace",
                  "allow_listed_root", "unprivileged_uid", "private_keyrings", "syscall_filter", "pids_cgroup",
                  "memory_cgroup", "parent_death_signal"):
        assert report[layer] or layer in report["missing"], f"{layer} is off but not reported as missing"
    assert report["fresh_cgroups"] == (report["pids_cgroup"] or report["memory_cgroup"])
    assert (report["allow_list"] is not None) == report["allow_listed_root"]
    if os.geteuid() == 0 and report["unshare"]:
        # this project's machines (developers and CI run as root, util-linux installed): everything is on
        assert report["network_namespace"] and report["pid_namespace"] and report["mount_namespace"]
        assert report["ipc_namespace"] and report["uts_namespace"] and report["unprivileged_uid"]
        assert report["allow_listed_root"] and report["verdict_isolated"]
        assert set(report["shared_namespaces"]) == {"user", "cgroup", "time"}  # each with why it is safe
        assert report["missing"] == {} or set(report["missing"]) <= {"pids_cgroup", "memory_cgroup"}


def test_correct_program_passes():
    result = sb.run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.passed and result.status == "passed", result
    assert result.returncode == 0 and result.stdout == "ok\n" and result.reason == ""


def test_failing_assert_fails_with_its_reason():
    result = sb.run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'wrong sum'\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.reason and "wrong sum" in result.reason and "line 4" in result.reason
    assert "AssertionError" in result.stderr


def test_syntax_error_and_exceptions_fail():
    assert sb.run_program("def f(:\n").reason.startswith("SyntaxError")
    result = sb.run_program("import no_such_module_xyz\n")
    assert not result.passed and "ModuleNotFoundError" in result.reason


def test_programs_get_a_clean_private_environment(isolated):
    source = """
        import os, sys, tempfile
        env = dict(os.environ)
        assert "PYTEST_CURRENT_TEST" not in env, env
        assert env["HOME"] == os.getcwd() == tempfile.gettempdir(), env
        assert env["PYTHONHASHSEED"] == "0" and sys.dont_write_bytecode
        with open("scratch.txt", "w") as f:  # the working directory is writable
            f.write("x" * 1000)
        print(os.getuid(), os.getcwd())
    """
    result = sb.run_program(textwrap.dedent(source))
    assert result.passed, result
    uid, cwd = result.stdout.split()
    if isolated:
        assert sb._UID_BASE <= int(uid) < sb._UID_BASE + sb._UID_SLOTS
    assert not os.path.exists(cwd), "the working directory must be removed afterwards"


def test_parallel_runs_use_distinct_uids(isolated):
    if not isolated:
        pytest.skip("no per-run uid on this machine")
    source = "import os, time\ntime.sleep(0.4)\nprint(os.getuid())\n"
    results = sb.run_programs([source] * 4, workers=4)
    assert all(r.passed for r in results), results
    uids = [int(r.stdout) for r in results]
    assert len(set(uids)) == 4, uids


def test_run_programs_keeps_order():
    sources = [f"assert {i} % 2 == 0\n" for i in range(6)]
    results = sb.run_programs(sources, workers=2)
    assert [r.passed for r in results] == [i % 2 == 0 for i in range(6)]
    assert sb.run_programs([], workers=2) == []


def test_non_string_source_is_an_error_not_an_exception():
    result = sb.run_program(b"print(1)")  # type: ignore[arg-type]
    assert result.status == "error" and not result.passed


def test_limits_validate():
    with pytest.raises(ValueError):
        sb.SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError):
        sb.SandboxLimits(memory_mb=0)
    assert sb.SandboxLimits(timeout_s=3).effective_cpu_s == 3
    assert sb.SandboxLimits(timeout_s=3, cpu_s=1).effective_cpu_s == 1


# ------------------------------------------------------------------------------------------------ fallbacks


def test_missing_layers_are_named_in_one_warning(monkeypatch):
    def degraded_plan():
        plan = sb._Plan()
        for layer in ("network_namespace", "pid_namespace", "mount_namespace"):
            plan.missing[layer] = "the unshare command (util-linux) is not installed"
        plan.missing["unprivileged_uid"] = "not running as root (cannot switch to a per-run uid)"
        return plan

    monkeypatch.setattr(sb, "_PLAN", None)
    monkeypatch.setattr(sb, "_WARNED", False)
    monkeypatch.setattr(sb, "_build_plan", degraded_plan)
    with pytest.warns(RuntimeWarning, match="network_namespace: the unshare command") as record:
        report = sb.isolation_report()
        sb.isolation_report()
        assert sb.run_program("assert True\n").passed
    assert sum("reduced isolation" in str(w.message) for w in record) == 1
    assert not report["network_namespace"] and not report["unprivileged_uid"]
    assert set(report["missing"]) == {"network_namespace", "pid_namespace", "mount_namespace", "unprivileged_uid"}


def _daemon_source(marker: str, tail: str) -> str:
    return textwrap.dedent(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep({marker})"])
            os._exit(0)
        os.wait()
        time.sleep(0.3)
    """) + tail


def test_weakest_fallback_still_judges_soundly_and_cleans_up():
    plan = sb._Plan()  # no namespaces, no per-run uid, no cgroups: fresh processes, rlimits, the checker
    limits = sb.SandboxLimits(timeout_s=1.5)
    assert sb._run("assert sum([1, 2]) == 3\n", sb.CheckSpec(), limits, plan).passed
    assert sb._run("def solve(x):\n    return x * x\n", FAILING_SPEC, limits, plan).passed
    assert not sb._run("def solve(x):\n    return x + 2\n", FAILING_SPEC, limits, plan).passed
    for source in ("import os\nos._exit(0)\n", "raise SystemExit(0)\n", "assert False\n"):
        assert not sb._run(source, sb.CheckSpec(), limits, plan).passed
    for tail in ("while True:\n    pass\n", "assert False\n", ""):
        marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(900) + 100}"
        start = time.monotonic()
        result = sb._run(_daemon_source(marker, tail), sb.CheckSpec(), limits, plan)
        assert not result.passed and time.monotonic() - start <= limits.timeout_s + SLACK_S, result
        assert _processes_with(marker) == [], f"a setsid daemon survived the fallback ({tail!r})"


# ------------------------------------------------------------------------------------------------ hostile


def test_hostile_infinite_loop():
    assert _run_hostile("while True:\n    pass\n").status in ("timeout", "killed")


def test_hostile_long_sleep():
    assert _run_hostile("import time\ntime.sleep(100)\n").status == "timeout"


def test_hostile_ignores_sigterm_and_loops():
    source = """
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
    """
    assert _run_hostile(source).status in ("timeout", "killed")


def test_hostile_fork_bomb():
    source = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    _run_hostile(source)


def test_hostile_memory_bomb():
    limits = sb.SandboxLimits(timeout_s=2.0, memory_mb=256)
    result = _run_hostile("chunks = []\nwhile True:\n    chunks.append(b'x' * 20_000_000)\n", limits)
    assert "MemoryError" in result.reason or result.status == "killed"


def test_hostile_memory_bomb_across_processes(report):
    # each child stays under the per-process address-space limit; together they exceed the run's memory
    source = """
        import os, time
        for _ in range(6):
            if os.fork() == 0:
                block = b'x' * 150_000_000
                time.sleep(3)
                os._exit(0)
        for _ in range(6):
            os.wait()
    """
    result = _run_hostile(source, sb.SandboxLimits(timeout_s=2.0, memory_mb=300))
    if report["memory_cgroup"]:
        assert result.status in ("killed", "failed", "timeout")


def test_hostile_output_flood():
    result = _run_hostile("while True:\n    print('x' * 1000)\n")
    assert len(result.stdout.encode()) <= HOSTILE.max_output_bytes and result.stdout_truncated


def test_hostile_early_sys_exit_0():
    result = _run_hostile("import sys\nsys.exit(0)\nassert False\n")
    assert "SystemExit" in result.reason


def test_hostile_os_exit_0():
    result = _run_hostile("import os\nos._exit(0)\n")
    assert result.returncode == 0 and result.status == "failed"


def test_hostile_raise_systemexit_0():
    assert "SystemExit" in _run_hostile("raise SystemExit(0)\n").reason


def test_hostile_atexit_forces_zero_status():
    source = """
        import atexit, os
        atexit.register(lambda: os._exit(0))
        assert 1 + 1 == 3
    """
    assert "AssertionError" in _run_hostile(source).reason


def test_hostile_prints_pass_markers():
    source = """
        import os, sys
        for line in ("PASS", "passed", "ok", "1.0", "All tests passed!", "status: passed"):
            print(line)
            print(line, file=sys.stderr)
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
    """
    result = _run_hostile(source)
    assert "PASS" in result.stdout  # what it printed is reported, and changes nothing


def test_hostile_forges_the_token_on_every_fd():
    source = """
        import os
        for fd in range(21):
            for payload in (os.urandom(32), b"PASS\\n", b"\\x00" * 32, b"FAIL:" , os.urandom(64)):
                try:
                    os.write(fd, payload)
                except OSError:
                    pass
        os._exit(0)
    """
    _run_hostile(source)


def test_hostile_writes_outside_the_sandbox():
    name = f"dare_gym_hostile_{secrets.token_hex(6)}"
    targets = [Path(tempfile.gettempdir()) / name, REPO / name, Path("/var/tmp") / name, Path("/dev/shm") / name]
    source = f"""
        import os
        written = []
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                written.append(path)
            except OSError as error:
                print("refused", path, error)
        # /dev/shm is the run's own (a fresh tmpfs): writing there reaches nothing outside
        assert [p for p in written if not p.startswith("/dev/shm/")], "nothing could be written outside the sandbox"
    """
    _run_hostile(source)
    for target in targets:
        assert not target.exists(), f"{target} was written"


def test_hostile_deletes_a_file_outside_the_sandbox():
    folder = Path(tempfile.mkdtemp(prefix="dare_gym_canary_"))
    try:
        os.chmod(folder, 0o777)  # even a world-writable folder must be out of reach
        canary = folder / "canary.txt"
        canary.write_text("still here")
        os.chmod(canary, 0o644)
        assert canary.stat().st_uid == os.geteuid()
        source = f"""
            import os, shutil
            for action in (lambda: os.remove({str(canary)!r}), lambda: os.chmod({str(canary)!r}, 0o777),
                           lambda: os.rename({str(canary)!r}, {str(canary) + ".moved"!r}),
                           lambda: shutil.rmtree({str(folder)!r})):
                try:
                    action()
                except OSError as error:
                    print("refused:", error)
            os._exit(0)
        """
        _run_hostile(source)
        assert canary.read_text() == "still here"
        assert stat.S_IMODE(canary.stat().st_mode) == 0o644
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_hostile_network_to_the_internet():
    source = """
        import socket
        socket.create_connection(("1.1.1.1", 80), timeout=1.5).close()
        print("connected")
    """
    result = _run_hostile(source)
    assert "connected" not in result.stdout


def test_hostile_network_to_a_server_of_the_host():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        source = f"""
            import socket
            conn = socket.create_connection(("127.0.0.1", {port}), timeout=1.5)
            conn.sendall(b"exfiltrated")
            print("connected")
        """
        result = _run_hostile(source)
        assert "connected" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_hostile_reads_the_parent_environment():
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    os.environ["DARE_GYM_SANDBOX_TEST_SECRET"] = secret
    try:
        source = """
            import os
            print(dict(os.environ))
            for name in ("/proc/1/environ", "/proc/self/environ"):
                try:
                    print(open(name, "rb").read())
                except OSError as error:
                    print("refused", error)
            assert "DARE_GYM_SANDBOX_TEST_SECRET" in os.environ
        """
        result = _run_hostile(source)
        assert secret not in result.stdout and secret not in result.stderr
    finally:
        del os.environ["DARE_GYM_SANDBOX_TEST_SECRET"]


def test_hostile_kills_its_parent_and_the_test_process():
    source = f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, 1, -1, 0):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as error:
                print("refused", pid, error)
        print("PASS")
        os._exit(0)
    """
    _run_hostile(source)
    os.kill(os.getpid(), 0)  # still alive (trivially, but this process is the one it aimed at)


def test_hostile_double_forked_daemon(isolated):
    marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(900) + 100}"
    name = f"dare_gym_daemon_{secrets.token_hex(6)}"
    target = Path(tempfile.gettempdir()) / name
    source = f"""
        import os, signal, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                print("DAEMON_PID", os.getpid(), flush=True)
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep({marker})"])  # to look for
                time.sleep(0.8)
                with open({str(target)!r}, "w") as f:
                    f.write("I outlived the run")
                time.sleep(100)
            os._exit(0)
        os.wait()
        time.sleep(0.2)
    """
    result = _run_hostile(source)
    assert "processes running" in result.reason or result.status != "passed"
    assert _processes_with(marker) == []
    pids = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("DAEMON_PID")]
    time.sleep(1.2)  # past the moment the daemon meant to write
    assert not target.exists()
    if not isolated:  # without a pid namespace the printed pid is a host pid
        assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert _sandbox_uid_processes() == []


def test_hostile_leaves_a_subprocess_behind():
    marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(900) + 100}"
    source = f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep({marker})"], start_new_session=True)
    """
    result = _run_hostile(source)
    assert "processes running" in result.reason
    assert _processes_with(marker) == []


def test_hostile_daemon_thread_outlives_main():
    source = """
        import threading, time
        def later():
            time.sleep(0.3)
            assert False, "the real check, meant to run after the verdict"
        threading.Thread(target=later, daemon=True).start()
    """
    assert "thread" in _run_hostile(source).reason


def test_hostile_thread_fails_after_main_returns():
    source = """
        import threading, time
        def later():
            time.sleep(0.2)
            raise AssertionError("failed in a thread")
        threading.Thread(target=later).start()
    """
    assert "thread" in _run_hostile(source).reason


def test_hostile_thread_tries_to_rescue_a_failing_main():
    source = """
        import os, threading, time
        def rescue():
            time.sleep(0.1)
            for fd in range(21):
                try:
                    os.write(fd, b"PASS")
                except OSError:
                    pass
            os._exit(0)
        threading.Thread(target=rescue).start()
        assert False, "main fails"
    """
    assert "AssertionError" in _run_hostile(source).reason


def test_hostile_trace_function_jumps_over_the_failing_assert():
    # the tests run in the checker: a tracer in the program's process has nothing to jump over
    source = """
        import sys, threading
        def tracer(frame, event, arg):
            if event == "line" and "assert" in (frame.f_code.co_name + str(frame.f_code.co_consts)):
                try:
                    frame.f_lineno = frame.f_lineno + 1
                except Exception:
                    pass
            return tracer
        sys.settrace(tracer)
        threading.settrace(tracer)
        sys._getframe().f_trace = tracer
        assert False, "skipped by the tracer"
    """
    assert "AssertionError" in _run_hostile(source).reason


def test_hostile_fork_child_runs_to_the_end():
    # only the original process speaks for the program; a forked child reaching the end leaves silently
    source = """
        import os
        if os.fork() != 0:
            os.wait()
            raise SystemExit(0)
    """
    _run_hostile(source)


def test_hostile_reads_proc_and_escapes_privileges(isolated):
    source = """
        import os
        for action in (lambda: os.setuid(0), lambda: os.listdir("/proc"), lambda: os.chroot("/"),
                       lambda: os.system("mount -t tmpfs none /tmp")):
            try:
                print("result:", action())
            except OSError as error:
                print("refused:", error)
        assert os.getuid() == 0 and os.listdir("/proc")
    """
    result = _run_hostile(source)
    if isolated:
        assert "refused: [Errno 1]" in result.stdout


# ------------------------------------------------------------------------------------------------ the verdict


def _check(solution: str, test: str, functions=("f",), limits: sb.SandboxLimits = HOSTILE, **spec):
    result = sb.check_program(textwrap.dedent(solution), sb.CheckSpec(test=textwrap.dedent(test),
                                                                      functions=functions, **spec), limits)
    print(f"    -> {result.status:8s} {result.duration_s:5.2f}s  {result.reason[:110]}")
    assert result.duration_s <= limits.timeout_s + SLACK_S
    assert _sandbox_uid_processes() == []
    return result


def test_a_correct_solution_passes_and_a_wrong_one_fails_with_the_test_line():
    test = "assert f(2) == 4\nassert f(3) == 9, 'three squared'\n"
    assert _check("def f(x):\n    return x * x\n", test).passed
    result = _check("def f(x):\n    return 4 if x == 2 else 0\n", test)
    assert result.status == "failed" and "AssertionError: three squared at test line 2" in result.reason


def test_objects_of_the_program_never_reach_the_checker():
    # an __eq__ that always says True, a str subclass that equals everything, a bool that is always true
    solution = """
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
            def __bool__(self):
                return True
        class Liar(str):
            def __eq__(self, other):
                return True
            __hash__ = str.__hash__
        def f(x):
            return Anything()
        def g(x):
            return Liar("wrong")
        def h(x):
            return [Anything()]
    """
    result = _check(solution, "assert f(1) == 42\n")
    assert not result.passed and "not plain data" in result.reason and "Anything" in result.reason
    assert not _check(solution, "assert g(1) == 'right'\n", functions=("g",)).passed  # it arrives as 'wrong'
    assert not _check(solution, "assert h(1) == [42]\n", functions=("h",)).passed


REWRITE_EVERYTHING = """
    import builtins, gc, sys, types

    def forged(*args, **kwargs):
        return True

    def wrong(x):
        return -1

    touched = 0
    # every function of every module, every frame's globals and locals, every closure cell
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if isinstance(value, types.FunctionType) and name != "wrong":
                try:
                    value.__code__ = forged.__code__ if value.__code__.co_freevars == () else value.__code__
                    touched += 1
                except (TypeError, ValueError, AttributeError):
                    pass
    frame = sys._getframe()
    while frame is not None:
        for scope in (frame.f_globals, frame.f_locals):
            for name in list(scope):
                if isinstance(scope[name], types.FunctionType) and name not in ("wrong", "forged"):
                    scope[name] = forged
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and obj.__closure__:
            for cell in obj.__closure__:
                try:
                    cell.cell_contents = forged
                except ValueError:
                    pass
    for name in ("AssertionError", "Exception", "BaseException", "SystemExit"):
        setattr(builtins, name, type(name, (), {}))
    builtins.isinstance = forged
    builtins.len = lambda obj: 0
    sys.modules["json"] = None
    print("rewrote", touched, "functions", file=sys.stderr)
    f = wrong
"""


def test_rewriting_every_function_frame_closure_builtin_and_module_cannot_forge_a_pass():
    result = _check(REWRITE_EVERYTHING, "assert f(1) == 2\nassert f(2) == 3\n")
    assert not result.passed and "rewrote" in result.stderr, result


def test_rewriting_the_harness_and_the_protocol_inside_a_call_cannot_forge_a_pass():
    # during the first call, replace the harness's serving functions and the protocol module by forgeries
    solution = """
        import sys
        def f(x):
            for name, module in list(sys.modules.items()):
                if name.startswith("_dare_gym_sandbox"):
                    for attr in dir(module):
                        if callable(getattr(module, attr)) and not attr.startswith("__"):
                            try:
                                setattr(module, attr, lambda *a, **k: {"ok": True, "id": 1, "bye": True})
                            except (AttributeError, TypeError):
                                pass
            return 0
    """
    result = _check(solution, "assert f(1) == 1\nassert f(2) == 2\n")
    assert not result.passed


def test_sub_interpreters_cannot_forge_a_pass():
    solution = """
        import os
        started = []
        code = ("import os\\nfor fd in range(3, 64):\\n    try:\\n        os.write(fd, b'PASS')\\n"
                "    except OSError:\\n        pass\\n")
        try:
            import _xxsubinterpreters as interpreters
            interpreter = interpreters.create()
            interpreters.run_string(interpreter, code)
            started.append("_xxsubinterpreters")
        except ImportError:
            pass
        try:
            import _testcapi
            _testcapi.run_in_subinterp(code)
            started.append("_testcapi")
        except ImportError:
            pass
        try:
            from test.support import interpreters as support
            support.create().run(code)
            started.append("test.support")
        except Exception:
            pass
        print("started", started)
        def f(x):
            return -1
    """
    result = _check(solution, "assert f(1) == 1\n")
    assert not result.passed
    available = [name for name in ("_xxsubinterpreters", "_testcapi") if _importable(name)]
    for name in available:  # what this interpreter ships did start inside the sandbox
        assert name in result.stdout, result.stdout


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


KILL_MOMENTS = {  # die() ends the process at once; the harness is pid 1 of its namespace, which ignores its own
    # SIGKILL, so a program dies by exiting or crashing
    "before answering": "die()\n",
    "crashes before answering": "ctypes.string_at(0)\n",
    "closes its channels": "for fd in range(3, 256):\n    try:\n        os.close(fd)\n"
                           "    except OSError:\n        pass\n",
    "in the first call": "def f(x):\n    die()\n",
    "crashes in a call": "def f(x):\n    ctypes.string_at(0)\n",
    "SystemExit in a call": "def f(x):\n    raise SystemExit(0)\n",
    "KeyboardInterrupt in a call": "def f(x):\n    raise KeyboardInterrupt\n",
    "after two answers": "calls = []\ndef f(x):\n    calls.append(x)\n    if len(calls) > 2:\n        die()\n"
                         "    return x + 1\n",
    "mid-message": "def f(x):\n    os.write(REPLY, (1000).to_bytes(4, 'big') + b'Tj')\n    die()\n",
    "garbage reply": "def f(x):\n    os.write(REPLY, os.urandom(64))\n    return x + 1\n",
    "after answering": "def f(x):\n    return x + 1\nimport threading\nthreading.Timer(0.05, die).start()\n",
    "at the goodbye": "def f(x):\n    return x + 1\nsys.modules['_dare_gym_sandbox.sandbox_harness']._finish = die\n",
    "hangs in a call": "def f(x):\n    import time\n    time.sleep(60)\n",
}
KILL_PRELUDE = textwrap.dedent("""
    import ctypes, fcntl, os, signal, stat, sys
    def reply_fd():  # the program's end of the reply channel: the one write-only pipe above stderr
        for fd in range(3, 256):
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == 1:
                    return fd
            except OSError:
                pass
    REPLY = reply_fd()
    def die():
        os._exit(0)
""")


@pytest.mark.parametrize("moment", sorted(KILL_MOMENTS))
def test_a_program_that_dies_at_any_moment_fails(moment):
    # ``f`` would pass every assert (f(x) == x + 1) if it answered; dying anywhere must still fail the run,
    # even under a test that swallows every exception with a bare except
    body = KILL_PRELUDE + KILL_MOMENTS[moment]
    if "def f" not in body:
        body += "def f(x):\n    return x + 1\n"
    swallowing = "try:\n    assert f(1) == 2\nexcept BaseException:\n    pass\nassert f(2) == 3\nassert f(3) == 4\n"
    limits = sb.SandboxLimits(timeout_s=1.5)
    results = sb.check_programs([(body, sb.CheckSpec(test=test, functions=("f",)))
                                 for test in ("assert f(1) == 2\nassert f(2) == 3\nassert f(3) == 4\n",
                                              swallowing)], limits, workers=2)
    for result in results:
        print(f"    -> {result.status:8s} {result.duration_s:5.2f}s  {result.reason[:110]}")
        assert not result.passed, result
        assert result.duration_s <= limits.timeout_s + SLACK_S
    assert _sandbox_uid_processes() == []


def test_the_test_code_never_enters_the_program_process():
    marker = f"expected-{secrets.token_hex(8)}"
    solution = """
        import gc, sys, types
        def strings(obj):
            if isinstance(obj, dict):
                return [*obj.keys(), *obj.values()]
            if isinstance(obj, (list, tuple, set, frozenset)):
                return list(obj)
            if isinstance(obj, types.CodeType):
                return list(obj.co_consts)
            return []
        def f(x):
            prefix = "expected-"
            found = [s for o in gc.get_objects() for s in strings(o)
                     if isinstance(s, str) and s.startswith(prefix) and s != prefix]
            frame, frames = sys._getframe(), 0
            while frame is not None:
                found += [v for v in frame.f_locals.values()
                          if isinstance(v, str) and v.startswith(prefix) and v != prefix]
                frame, frames = frame.f_back, frames + 1
            print("found", found, "frames", frames)
            return found[0] if found else "nothing"
    """
    result = _check(solution, f"assert f(1) == {marker!r}\n")
    assert not result.passed and marker not in result.stdout and "found []" in result.stdout


def test_builtin_exceptions_come_back_and_stop_iteration_cannot_end_a_test_loop():
    solution = """
        class MyError(ValueError):
            pass
        def f(x):
            if x < 0:
                raise MyError("negative")
            return x
        def g(x):
            raise StopIteration
    """
    expects_value_error = "try:\n    f(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\nelse:\n" \
                          "    assert False\nassert f(2) == 2\n"
    assert _check(solution, expects_value_error).passed
    # a StopIteration raised by the program must not end this loop early (it would skip the failing check)
    loop = "for value in map(g, [1, 2]):\n    pass\nassert False, 'reached'\n"
    result = _check(solution, loop, functions=("g",))
    assert not result.passed and "RuntimeError" in result.reason and "StopIteration" in result.reason


def test_values_cross_with_their_exact_types():
    values = ("[0, -1, 2**70, -(2**90), 1.5, -0.0, float('inf'), True, False, None, 'a\\udc80\\u00e9', b'\\x00\\xff',"
              " bytearray(b'ab'), (1, (2, [3])), {1, 2}, frozenset({'x'}), {(1, 2): [3], 'k': {'n': None}},"
              " 1+2j, range(1, 10, 3)]")
    solution = """
        import collections
        def echo(x):
            return x
        def views(d):
            return d.keys(), d.values(), d.items(), iter([1, 2]), collections.deque([3]), (i for i in range(3))
        def nan():
            return float('nan')
    """
    test = f"""
        import collections
        values = {values}
        back = echo(values)
        assert back == values and [type(v) for v in back] == [type(v) for v in values]
        assert str(back[5]) == '-0.0' and type(back[3]) is int and type(back[7]) is bool
        keys, vals, items, it, dq, gen = views({{'a': 1, 'b': 2}})
        assert keys == {{'a', 'b'}} and type(keys) is type({{}}.keys()) and list(vals) == [1, 2]
        assert items == {{('a', 1), ('b', 2)}} and list(it) == [1, 2] and dq == collections.deque([3])
        assert list(gen) == [0, 1, 2] and gen != [0, 1, 2]
        x = nan()
        assert x != x
    """
    assert _check(solution, test, functions=("echo", "views", "nan")).passed


def test_unencodable_arguments_from_the_test_are_an_error_not_a_failure():
    result = _check("def f(x):\n    return 1\n", "assert f(lambda: 1) == 1\n")
    assert result.status == "error" and "plain data" in result.reason


def test_setup_objects_stay_in_the_program_and_are_passed_by_reference():
    solution = """
        class Node:
            def __init__(self, value, left=None):
                self.value, self.left = value, left
        def depth(node):
            return 0 if node is None else 1 + depth(node.left)
    """
    spec = dict(program_setup="root = Node(1, Node(2, Node(3)))\nleaf = Node(9)\n", remote_names=("root", "leaf"))
    assert _check(solution, "assert depth(root) == 3\nassert depth(leaf) == 1\n", functions=("depth",), **spec).passed
    assert not _check(solution, "assert depth(root) == 2\n", functions=("depth",), **spec).passed


def test_the_checker_has_its_own_time_limit():
    # trusted test code that loops on what the program answers is killed at the deadline with the program
    limits = sb.SandboxLimits(timeout_s=1.0)
    result = _check("def f(x):\n    return 1\n", "while f(0) != 2:\n    pass\n", limits=limits)
    assert result.status == "timeout"


def test_checkers_run_in_fresh_interpreters_where_the_server_is_unavailable(monkeypatch):
    server = sb._CheckerServer()
    server.unavailable = "switched off by the test"
    monkeypatch.setattr(sb, "_CHECKER_SERVER", server)
    test = "print('checking')\nassert f(2) == 4\n"
    right = _check("def f(x):\n    return x * x\n", test)
    assert right.passed and right.checker_output == "checking\n"
    assert "AssertionError" in _check("def f(x):\n    return 0\n", test).reason
    assert not _check("import os\ndef f(x):\n    os._exit(0)\n", test).passed
    assert server._proc is None  # no server was started


def test_a_killed_checker_server_is_restarted():
    test = "assert f(2) == 4\n"
    assert _check("def f(x):\n    return x * x\n", test).passed
    first = sb._CHECKER_SERVER._proc
    assert first is not None and first.poll() is None
    first.kill()
    first.wait()
    assert _check("def f(x):\n    return x * x\n", test).passed
    assert sb._CHECKER_SERVER._proc.pid != first.pid


CALLER = """
import os, sys, time
from dare_gym.rewards import sandbox as sb
spec = sb.CheckSpec(test="assert f(1) == 1\\n", functions=("f",))
assert sb.check_program("def f(x):\\n    return x\\n", spec).passed
if os.fork() == 0:  # a forked copy of the caller gets a checker server of its own
    ok = sb.check_program("def f(x):\\n    return x\\n", spec).passed
    print("child", ok, sb._CHECKER_SERVER._proc.pid, flush=True)
    os._exit(0)
os.wait()
print("server", sb._CHECKER_SERVER._proc.pid, flush=True)
acquire = sb._UID_POOL.acquire
def announce():
    uid, sock = acquire()
    print("slot", uid, flush=True)
    return uid, sock
sb._UID_POOL.acquire = announce
sb.check_program("import time\\ntime.sleep(100)\\n", spec, sb.SandboxLimits(timeout_s=60))
"""


def test_nothing_outlives_a_caller_killed_mid_run():
    # a reward's helper process killed at its time limit: its sandboxed program, checker and server go with it
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=tempfile.gettempdir())
    caller = subprocess.Popen([sys.executable, "-c", CALLER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child_line = caller.stdout.readline().split()
        server_line = caller.stdout.readline().split()
        assert child_line[:2] == ["child", "True"] and server_line[0] == "server", (child_line, server_line)
        assert child_line[2] != server_line[1]
        server = int(server_line[1])
        slot_line = caller.stdout.readline().split()
        assert slot_line[0] == "slot", slot_line
        uid = int(slot_line[1])
        deadline = time.monotonic() + 10
        while uid not in {u for _, u in _uid_processes()} and time.monotonic() < deadline:  # it is running
            time.sleep(0.05)
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 5
        assert _sandbox_uid_processes() == [], "the program outlived its killed caller"
        while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{server}").exists() or "Z" in Path(f"/proc/{server}/stat").read_text().split()[2]
        # the killed run never cleaned up its folders: the next run to hold its slot removes them
        stale = _folders_of_slot(uid)
        assert len(stale) == 2, stale
        slot = claim_slot(uid)  # the killed run's slot is free again (another suite's run may hold it a moment)
        try:
            fresh = sb._slot_folders(uid)
            assert not any(map(os.path.exists, stale)) and all(map(os.path.isdir, fresh))
            assert set(_folders_of_slot(uid)) == set(fresh)
            for folder in fresh:
                os.rmdir(folder)
        finally:
            slot.close()
    finally:
        caller.kill()
        caller.wait()
        caller.stdout.close()


def claim_slot(uid: int, timeout_s: float = 60.0) -> socket.socket:
    """Hold the sandbox uid slot ``uid`` as the pool does (binding its abstract socket), waiting while another
    process on the host holds it; the socket releases it when closed."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0dare_gym_sandbox/uid/{uid}")
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"uid slot {uid} stayed held for {timeout_s} s") from None
            time.sleep(0.02)


def _folders_of_slot(uid: int) -> list[str]:
    tmp = tempfile.gettempdir()
    return [os.path.join(tmp, name) for name in os.listdir(tmp)
            if name.startswith((f"dare_gym_sandbox_{uid}_", f"dare_gym_checker_{uid}_"))]


# ------------------------------------------------------------------------------------------------ protocol


def test_protocol_round_trips_plain_data_and_refuses_everything_else():
    value = [1, 2**80, -0.0, float("inf"), "\ud800", b"\x00", (1, frozenset({2})), {(1,): {3}}, None, True]
    back = sandbox_protocol.decode(sandbox_protocol.encode(value))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    assert math.isnan(sandbox_protocol.decode(sandbox_protocol.encode(float("nan"))))

    class Point(tuple):
        pass

    assert type(sandbox_protocol.decode(sandbox_protocol.encode(Point((1, 2))))) is tuple
    cycle: list = []
    cycle.append(cycle)
    for bad in (object(), lambda: 1, cycle, Point, sandbox_protocol, sandbox_protocol.Handle):
        with pytest.raises(sandbox_protocol.Unencodable):
            sandbox_protocol.encode(bad)
    classes = [int, str, type, ValueError, frozenset]  # builtin classes cross by name (MBPP 533 passes int)
    assert all(a is b for a, b in zip(sandbox_protocol.decode(sandbox_protocol.encode(classes)), classes))
    good = sandbox_protocol.encode([1, "x"])
    malformed = [
        b"X",  # unknown tag
        b"l" + (10**6).to_bytes(4, "big"),  # a count larger than the bytes left
        good + b"N",  # trailing bytes
        b"s" + (2).to_bytes(4, "big") + b"\xff\xfe",  # not UTF-8
        b"S" + (1).to_bytes(4, "big") + b"l" + bytes(4),  # an unhashable set member
        b"l\x00\x00\x00\x01" * 100 + b"N",  # deeper than the cap
        b"R" + (4).to_bytes(4, "big") + b"root",  # a reference where only plain data may come
        b"H" + (1).to_bytes(8, "big"),  # a handle where only plain data may come
        b"y" + (5).to_bytes(4, "big") + b"Point",  # not a builtin class
        b"j" + bytes(3),  # cut off
    ]
    for data in malformed:
        with pytest.raises(sandbox_protocol.ProtocolError):
            sandbox_protocol.decode(data)


def test_protocol_messages_are_framed_and_capped():
    read_fd, write_fd = os.pipe()
    try:
        sandbox_protocol.write_message(write_fd, {"id": 1, "ok": [1, 2]})
        os.write(write_fd, (sandbox_protocol.MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"))
        assert sandbox_protocol.read_message(read_fd) == {"id": 1, "ok": [1, 2]}
        with pytest.raises(sandbox_protocol.ProtocolError, match="limit"):
            sandbox_protocol.read_message(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_harness_and_checker_are_real_modules_that_the_children_run():
    # the sandbox ships these very modules (compiled from their files) to its children
    boot, program_side, checker_side = sb._child_code()
    assert boot == Path(sandbox_boot.__file__).read_text()
    assert [name for name, _ in program_side] == ["sandbox_protocol", "sandbox_harness"]
    assert [name for name, _ in checker_side] == ["sandbox_protocol", "code_checker"]
    assert program_side[1][1].co_filename == sandbox_harness.__file__
    assert checker_side[1][1].co_filename == code_checker.__file__
    assert not hasattr(sb, "_HARNESS")
    error = ValueError("bad")
    assert sandbox_harness.builtin_exception_name(type("MyError", (KeyError,), {})()) == "KeyError"
    assert code_checker.describe_failure(error, {}) == "ValueError: bad"


# ------------------------------------------------------------------------------------------------ leftovers


def _sysv_ipc() -> dict[str, set[str]]:
    """Keys and ids of every System V IPC object on the host."""
    found = {}
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        found[kind] = {" ".join(line.split()[:2]) for line in lines}
    return found


def test_ipc_objects_do_not_outlive_the_run(isolated):
    if not isolated or not Path("/proc/sysvipc/shm").exists():
        pytest.skip("needs the namespaces and /proc/sysvipc")
    name = f"/dare_gym_{secrets.token_hex(4)}"
    source = f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        IPC_CREAT = 0o1000
        made = {{}}
        made["shm"] = libc.shmget(0x5A5A0001, 4096, IPC_CREAT | 0o666)
        made["msg"] = libc.msgget(0x5A5A0002, IPC_CREAT | 0o666)
        made["sem"] = libc.semget(0x5A5A0003, 1, IPC_CREAT | 0o666)
        try:
            mq_open = ctypes.CDLL("librt.so.1", use_errno=True).mq_open
        except OSError:
            mq_open = libc.mq_open
        made["mqueue"] = mq_open({name.encode()!r}, os.O_CREAT | os.O_RDWR, 0o666, None)
        try:
            with open("/dev/shm/{name[1:]}", "w") as f:
                f.write("left behind")
            made["posix_shm"] = 0
        except OSError as error:
            made["posix_shm"] = -error.errno
        print(made)
        assert all(made[k] >= 0 for k in ("shm", "msg", "sem", "mqueue")), made
    """
    before = _sysv_ipc()
    result = sb.run_program(textwrap.dedent(source))
    assert result.passed, result  # the program made every object it asked for, inside its run
    after = _sysv_ipc()
    for kind in before:
        assert after[kind] - before[kind] == set(), f"System V {kind} outlived the run: {after[kind] - before[kind]}"
    assert not Path(f"/dev/shm/{name[1:]}").exists()
    if Path("/dev/mqueue").is_dir():
        assert not Path(f"/dev/mqueue/{name[1:]}").exists()
    mq_open = _libc_mq_open()
    if mq_open is not None:  # the host's IPC namespace has no such queue
        assert mq_open(name.encode(), os.O_RDONLY) == -1 and ctypes.get_errno() == 2


def _libc_mq_open():
    for library in ("librt.so.1", None):
        try:
            function = ctypes.CDLL(library, use_errno=True).mq_open
            function.restype = ctypes.c_int
            return function
        except (OSError, AttributeError):
            continue
    return None


KEYCTL_SOURCE = """
    import ctypes, os, platform
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[platform.machine()]
    USER, USER_SESSION, SESSION, KEYCTL_SEARCH, KEYCTL_GET_PERSISTENT = -4, -5, -3, 10, 22
    def persistent():  # the uid's persistent keyring: kept by the kernel for days after its last process
        return libc.syscall(KEYCTL, KEYCTL_GET_PERSISTENT, ctypes.c_long(-1), ctypes.c_long(SESSION))
    def add(description, keyring):
        payload = b"secret of an earlier run"
        return libc.syscall(ADD_KEY, b"user", description, payload, len(payload), ctypes.c_long(keyring))
    def find(description):  # searched in the uid's own keyrings, which outlive every process of the uid
        return max(libc.syscall(KEYCTL, KEYCTL_SEARCH, ctypes.c_long(keyring), b"user", description,
                                ctypes.c_long(0)) for keyring in (USER, USER_SESSION, persistent()))
"""


@pytest.mark.parametrize("layer", ["system-call filter", "emptied keyrings (no filter)"])
def test_keys_do_not_carry_into_a_later_run(report, layer):
    if not report["private_keyrings"] or not report["unprivileged_uid"]:
        pytest.skip("needs a per-run uid and keyctl")
    plan = sb._get_plan()
    if layer == "system-call filter":
        if not report["syscall_filter"]:
            pytest.skip(f"no system-call filter here: {report['missing'].get('syscall_filter')}")
    else:  # what still holds where no filter can be installed: the harness empties the uid's keyrings
        plan = dataclasses.replace(plan, seccomp=None)
    description = f"dare_gym_{secrets.token_hex(4)}"
    store = KEYCTL_SOURCE + f"""
    keys = [add({description.encode()!r}, keyring) for keyring in (USER, SESSION, persistent())]
    print(os.getuid(), ctypes.get_errno(), *keys, find({description.encode()!r}))
    """
    look = KEYCTL_SOURCE + f"""
    print(os.getuid(), find({description.encode()!r}))
    """
    stored = sb._run(textwrap.dedent(store), sb.CheckSpec(), sb.SandboxLimits(), plan)
    assert stored.passed, stored
    uid, errno, user_key, session_key, persistent_key, found_now = map(int, stored.stdout.split())
    if plan.seccomp is not None:
        assert (user_key, session_key, persistent_key, errno) == (-1, -1, -1, 38), "no key call reaches the kernel"
    else:
        assert min(user_key, session_key) > 0 and found_now > 0, "keys can be made and found in a run"
    # the same uid slot again, claimed for this run (another suite on the host may be using the pool too)
    pool_acquire = sb._UID_POOL.acquire
    sb._UID_POOL.acquire = lambda: (uid, claim_slot(uid))
    try:
        found = sb._run(textwrap.dedent(look), sb.CheckSpec(), sb.SandboxLimits(), plan)
    finally:
        sb._UID_POOL.acquire = pool_acquire
    assert found.passed, found
    later_uid, key = map(int, found.stdout.split())
    assert later_uid == uid and key < 0, "a key stored by an earlier run of this uid was found"
    # nor did the run reach this process's session keyring
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    request_key = {"x86_64": 249, "aarch64": 218}.get(os.uname().machine)
    if request_key is not None:
        assert libc.syscall(request_key, b"user", description.encode(), None, ctypes.c_long(0)) < 0


# ------------------------------------------------------------------------ nothing of one run reaches another


def _names_on_the_way(path: str) -> list[str]:
    """``path`` and every name it resolves through, symbolic links followed one at a time (``/lib64/ld.so`` ->
    ``/usr/lib64/ld.so`` -> ...): what a root that re-creates the links must hold for the path to work."""
    parts = [p for p in path.split("/") if p]
    resolved = "/"
    for position, part in enumerate(parts):
        candidate = os.path.join(resolved, part)
        if os.path.islink(candidate):
            target = os.path.normpath(os.path.join(resolved, os.readlink(candidate)))
            return [path] + _names_on_the_way(os.path.join(target, *parts[position + 1:]))
        resolved = candidate
    return [path]


def _world_readable_folder() -> Path:
    """A folder that every user may read (the host's temporary folder is usually such a place)."""
    folder = Path(tempfile.mkdtemp(prefix="dare_gym_readable_"))
    os.chmod(folder, 0o755)
    return folder


def test_the_program_sees_only_the_allow_list(report):
    if not report["allow_listed_root"]:
        pytest.skip(f"no allow-listed root here: {report['missing'].get('allow_listed_root')}")
    allowed = [name for p in report["allow_list"] for name in _names_on_the_way(p)] + list(sb._DEVICES)
    # a copy of an answer key in a folder every user may read, as a data_files= copy would be
    secret = _world_readable_folder() / "HumanEval.jsonl"
    secret.write_text("the canonical solutions")
    source = f"""
        import json, os, sys
        allowed = {allowed!r}
        private = (os.getcwd(), "/dev/shm", "/proc")
        def covered(path):
            return any(path == a or path.startswith(a.rstrip("/") + "/") or a.startswith(path.rstrip("/") + "/")
                       for a in allowed + list(private))
        strays, stack = [], ["/"]
        while stack:  # every name of the tree, not descending into what the allow-list binds
            folder = stack.pop()
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                real = os.path.realpath(path)
                if not covered(path) and not covered(real):
                    strays.append(path)
                elif os.path.isdir(path) and not os.path.islink(path) and path not in allowed \\
                        and not any(path.startswith(a.rstrip("/") + "/") for a in allowed + list(private)):
                    stack.append(path)
        print(json.dumps(strays))
        print(json.dumps([p for p in ({str(secret)!r}, {str(REPO / "dare_gym")!r}, "/sys/fs/cgroup", "/etc/passwd",
                                      "/proc/self/cgroup", "/home", "/var") if os.path.exists(p)]))
        print(json.dumps(os.listdir("/proc") + os.listdir("/dev/shm")))
    """
    result = sb.run_program(textwrap.dedent(source))
    assert result.passed, result
    strays, present, private = (json.loads(line) for line in result.stdout.splitlines())
    assert strays == [], f"the program sees what the allow-list does not name: {strays}"
    assert present == [], present
    assert private == []


def test_an_answer_key_given_as_data_files_is_out_of_reach(data_dir):
    """A copy of the benchmark passed with ``data_files=`` (world-readable, outside DARE_GYM_DATA_DIR), read by a
    completion that execs the canonical solution: through the env, and through the reward with any limits."""
    import gzip

    import dare_gym
    from dare_gym.rewards.code import execute_humaneval

    folder = _world_readable_folder()
    copy = folder / "HumanEval.jsonl.gz"
    shutil.copy(data_dir / "humaneval" / "HumanEval.jsonl.gz", copy)
    os.chmod(copy, 0o644)
    env = dare_gym.make("humaneval-v0", data_files=str(copy))
    _, info = env.reset(options={"index": 0})
    record = env.record(0)
    with gzip.open(copy, "rt") as f:
        assert record["task_id"] in f.read()  # the key is right there on the host
    cheat = textwrap.dedent(f"""
        ```python
        import glob, gzip, json, os
        def {record['entry_point']}(*args):
            for path in [{str(copy)!r}] + glob.glob({str(folder.parent)!r} + "/**/HumanEval*", recursive=True):
                try:
                    for line in gzip.open(path, "rt"):
                        r = json.loads(line)
                        if r["task_id"] == {record['task_id']!r}:
                            space = {{}}
                            exec(r["prompt"] + r["canonical_solution"], space)
                            return space[{record['entry_point']!r}](*args)
                except OSError:
                    continue
            raise FileNotFoundError("no answer key in sight")
        ```
    """)
    _, reward, _, _, info = env.step(cheat)
    assert reward == 0.0 and not info["correct"]
    for limits in (sb.SandboxLimits(), sb.SandboxLimits(timeout_s=5, hidden_paths=())):
        result = execute_humaneval(cheat, record, limits=limits)
        assert not result.passed and "no answer key in sight" in result.reason, result
    assert execute_humaneval(f"```python\n{record['prompt']}{record['canonical_solution']}```", record).passed


ORACLE = '''
import ctypes, os, platform

CARRIED = {carried!r}  # the state a channel the test controls brings from the previous run (the control)
NAME = b"dare_gym_oracle"
FILES = ["/tmp/dare_gym_oracle", "/dev/shm/dare_gym_oracle", "/var/tmp/dare_gym_oracle",
         os.path.expanduser("~/.dare_gym_oracle"), "/dare_gym_oracle", "dare_gym_oracle"]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ADD_KEY, KEYCTL = {{"x86_64": (248, 250), "aarch64": (217, 219)}}[platform.machine()]


def keyrings():  # the uid's persistent, user and user-session keyrings: the kernel keeps them across processes
    persistent = libc.syscall(KEYCTL, 22, ctypes.c_long(-1), ctypes.c_long(-3))
    return [k for k in (persistent, -4, -5) if k != -1]


def load():
    if CARRIED is not None:
        return CARRIED
    for keyring in keyrings():
        key = libc.syscall(KEYCTL, 10, ctypes.c_long(keyring), b"user", NAME, ctypes.c_long(0))
        buffer = ctypes.create_string_buffer(64)
        size = libc.syscall(KEYCTL, 11, ctypes.c_long(key), buffer, ctypes.c_long(64)) if key > 0 else -1
        if size > 0:
            return buffer.raw[:size].decode()
    for path in FILES:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    return ""


def save(bits):
    print("STATE=" + bits, flush=True)
    for keyring in keyrings():
        libc.syscall(ADD_KEY, b"user", NAME, bits.encode(), len(bits), ctypes.c_long(keyring))
    for path in FILES:
        try:
            with open(path, "w") as f:
                f.write(bits)
        except OSError:
            pass


# What the checker asked last run: every answer but the last was right (call k+1 comes only if assert k
# passed); the last may have ended the run, so it is flipped. Beyond that, guess True.
PRIOR = [c == "1" for c in load()]
KNOWN = PRIOR[:-1] + [not PRIOR[-1]] if PRIOR else []
GIVEN = []


def {entry_point}(*args):
    answer = KNOWN[len(GIVEN)] if len(GIVEN) < len(KNOWN) else True
    GIVEN.append(answer)
    save("".join("1" if a else "0" for a in GIVEN))
    return answer
'''


@pytest.mark.parametrize("task", ["HumanEval/0", "HumanEval/3"])
def test_a_guessing_program_learns_nothing_across_runs(data_dir, task):
    """The oracle attack: a program that guesses booleans and stores what it learnt (the checker calls k+1 only
    if assert k passed) in every place that outlived a run before (the uid's keyrings, cgroup counters, files).
    With a channel the test carries for it, it passes within a run per assert; through the sandbox, never."""
    import dare_gym
    from dare_gym.rewards.code import execute_humaneval

    env = dare_gym.make("humaneval-v0")
    index = next(i for i in range(env.num_records) if env.record(i)["task_id"] == task)
    record = env.record(index)
    asserts = record["test"].count("assert candidate")
    carried, passed_at = "", None
    for run in range(1, asserts + 2):  # the control: the test is the channel
        result = execute_humaneval(ORACLE.format(carried=carried, entry_point=record["entry_point"]), record)
        if result.passed:
            passed_at = run
            break
        carried = [line[6:] for line in result.stdout.splitlines() if line.startswith("STATE=")][-1]
    assert passed_at is not None, "the oracle must work when it has a channel"
    oracle = ORACLE.format(carried=None, entry_point=record["entry_point"])
    for _ in range(asserts + 3):  # the attack: whatever channel the sandbox leaves it
        env.reset(options={"index": index})
        _, reward, _, _, info = env.step(oracle)
        assert reward == 0.0 and not info["correct"], "a guessing program learnt across runs"


def test_every_run_gets_cgroups_whose_counters_start_at_zero(report):
    if not report["memory_cgroup"]:
        pytest.skip("no memory cgroup here")
    parent = sb._get_plan().cgroups["memory"]
    before = set(parent.glob("run-*"))
    big = sb.run_program("data = bytearray(300 << 20)\nfor i in range(0, len(data), 4096):\n    data[i] = 1\n")
    assert big.passed, big
    seen: dict[Path, int] = {}

    def ours(path: Path) -> bool:
        """The cgroup holds a process of this test's tree (other suites on the host make runs too)."""
        try:
            pids = [int(line) for line in (path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return False
        for pid in pids:
            while pid > 1:
                if pid == os.getpid():
                    return True
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    break
                pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        return False

    def watch(stop):
        while not stop():
            for path in set(parent.glob("run-*")) - before:
                try:
                    if path in seen or ours(path):
                        seen[path] = max(seen.get(path, 0), int((path / "memory.max_usage_in_bytes").read_text()))
                except (OSError, ValueError):
                    pass
            time.sleep(0.005)

    import threading

    done = threading.Event()
    watcher = threading.Thread(target=watch, args=(done.is_set,))
    watcher.start()
    try:
        small = sb.run_program("import time\ntime.sleep(0.5)\n")
    finally:
        done.set()
        watcher.join()
    assert small.passed, small
    assert len(seen) == 1, f"one new cgroup for the run, got {sorted(seen)}"
    assert max(seen.values()) < 150 << 20, "the high-water mark of an earlier run is still there"
    assert not any(path.exists() for path in seen), "a run's cgroup outlived it"


def test_forked_checkers_draw_their_own_random_numbers():
    spec = sb.CheckSpec(test="import random\nprint(random.getrandbits(64))\n")
    draws = {sb.check_program("", spec).checker_output for _ in range(3)}
    assert len(draws) == 3, draws


def test_the_program_can_make_no_namespace_mount_or_key(report):
    if not report["syscall_filter"]:
        pytest.skip(f"no system-call filter here: {report['missing'].get('syscall_filter')}")
    source = """
        import ctypes, errno, os, threading
        libc = ctypes.CDLL(None, use_errno=True)
        def errno_of(result):
            return 0 if result == 0 else ctypes.get_errno()
        got = {
            "unshare(user)": errno_of(libc.unshare(0x10000000)),
            "unshare(mount)": errno_of(libc.unshare(0x00020000)),
            "mount": errno_of(libc.mount(b"none", b"/proc", b"proc", 0, None)),
            "add_key": errno_of(libc.syscall(248 if os.uname().machine == "x86_64" else 217, b"user", b"k", b"v", 1,
                                             ctypes.c_long(-4))),
        }
        threading.Thread(target=print, args=("threads still start",)).start()  # clone3 denied, clone works
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        got["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(got)
        assert got == {"unshare(user)": errno.EPERM, "unshare(mount)": errno.EPERM, "mount": errno.EPERM,
                       "add_key": errno.ENOSYS, "fork": 7}, got
    """
    result = sb.run_program(textwrap.dedent(source))
    assert result.passed and "threads still start" in result.stdout, result


def test_mbpp_references_that_pass_types_and_objects_pass(data_dir):
    """MBPP 533 passes the class ``int`` to the function; 601's tests build ``Pair`` objects of the solution's
    class through a call and pass a list of them back: both references pass, and a wrong answer still fails."""
    import dare_gym

    env = dare_gym.make("mbpp-v0", split="train")
    for task_id in (533, 601):
        index = next(i for i in range(env.num_records) if env.record(i)["task_id"] == task_id)
        env.reset(options={"index": index})
        _, reward, _, _, info = env.step(env.demonstration(env.record(index)))
        assert reward == 1.0 and info["correct"], (task_id, info)
    wrong = "```python\nclass Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n" \
            "    def __eq__(self, other):\n        return True\ndef max_chain_length(arr, n):\n    return arr[0]\n```"
    env.reset(options={"index": index})
    assert env.step(wrong)[1] == 0.0  # a Pair that equals everything stays in the program


STATE_PRELUDE = """
import ctypes, os, platform, socket, tempfile
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[platform.machine()]
try:
    librt = ctypes.CDLL("librt.so.1", use_errno=True)
except OSError:
    librt = libc
def keyrings():
    return [libc.syscall(KEYCTL, 22, ctypes.c_long(-1), ctypes.c_long(-3)), -3, -4, -5]
FILES = ["{marker}", os.path.expanduser("~/{marker}"), os.path.join(tempfile.gettempdir(), "{marker}"),
         "/tmp/{marker}", "/dev/shm/{marker}", "/var/tmp/{marker}", "/{marker}"]
"""
LEAVE = {  # ways a program might try to leave state for a later run (the marker and key name it)
    "files": "for path in FILES:\n    try:\n        open(path, 'w').write('{marker}')\n    except OSError:\n        pass",
    "environment": "os.environ['{marker}'] = '1'\nos.putenv('{marker}', '1')",
    "keys": "for keyring in keyrings():\n    libc.syscall(ADD_KEY, b'user', b'{marker}', b'x', 1, ctypes.c_long(keyring))",
    "System V IPC": "libc.shmget({key}, 4096, 0o1666)\nlibc.semget({key}, 1, 0o1666)\nlibc.msgget({key}, 0o1666)",
    "POSIX message queue": "librt.mq_open(b'/{marker}', os.O_CREAT | os.O_RDWR, 0o666, None)",
    "a process that stays": "if os.fork() == 0:\n    os.setsid()\n    s = socket.socket(socket.AF_UNIX)\n"
                            "    s.bind('\\0{marker}')\n    s.listen()\n    import time\n    time.sleep(30)",
    "memory high-water mark": "block = bytearray({megabytes} << 20)\nfor i in range(0, len(block), 4096):\n    block[i] = 1",
    "cgroup files": "for path in ('/sys/fs/cgroup/memory/memory.soft_limit_in_bytes', '/proc/self/cgroup'):\n"
                    "    try:\n        open(path, 'w').write('{megabytes}')\n    except OSError:\n        pass",
}
LOOK = """
found = [path for path in FILES if os.path.exists(path)]
found += ["environment"] if "{marker}" in os.environ else []
found += [f"key in {{k}}" for k in keyrings()
          if libc.syscall(KEYCTL, 10, ctypes.c_long(k), b"user", b"{marker}", ctypes.c_long(0)) > 0]
found += [name for name, get in (("shm", libc.shmget), ("sem", libc.semget), ("msg", libc.msgget))
          if get({key}, *((0, 0) if name != "sem" else (0, 0))) >= 0]
found += ["mqueue"] if librt.mq_open(b"/{marker}", os.O_RDONLY) >= 0 else []
probe = socket.socket(socket.AF_UNIX)
try:
    probe.connect("\\0{marker}")
    found.append("abstract socket")
except OSError:
    pass
for root in ("/sys", "/proc/self", "/proc/1"):
    found += [root] if os.path.exists(root) else []
print(found)
assert found == [], found
"""


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(st.sampled_from(sorted(LEAVE)), min_size=1, max_size=4, unique=True),
       marker=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=10, max_size=16),
       key=st.integers(1, 2**31 - 1), megabytes=st.integers(32, 256))
def test_no_state_survives_a_run(actions, marker, key, megabytes):
    """Random programs that try to leave state behind (in files, the environment, keyrings, IPC objects,
    processes, sockets, cgroup counters), each followed by a run that looks everywhere: it finds nothing."""
    fill = {"marker": f"dare_gym_{marker}", "key": key, "megabytes": megabytes}
    prelude = STATE_PRELUDE.replace("{marker}", fill["marker"])
    leave = prelude + "\n".join(LEAVE[a].format(**fill) for a in actions) + "\n"
    look = prelude + LOOK.format(**fill)
    sb.run_program(leave, sb.SandboxLimits(timeout_s=5))  # it may pass or fail: what it left is what matters
    found = sb.run_program(look, sb.SandboxLimits(timeout_s=5))
    assert found.passed, f"{actions} left state for a later run: {found.stdout or found.reason}"


def test_hidden_paths_cover_folders_inside_the_allow_list(report):
    if not report["allow_listed_root"]:
        pytest.skip(f"no allow-listed root here: {report['missing'].get('allow_listed_root')}")
    package = Path(pytest.__file__).parent  # a folder of site-packages, inside the allow-list
    source = f"import os\nprint(len(os.listdir({str(package)!r})))\n"
    assert int(sb.run_program(source).stdout) > 0
    hidden = sb.run_program(source, sb.SandboxLimits(hidden_paths=(str(package),)))
    assert hidden.passed and int(hidden.stdout) == 0, hidden
