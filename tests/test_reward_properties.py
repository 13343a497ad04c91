"""Property tests for every registered reward: arbitrary text never raises, scores are finite and in the
declared range, and pathological completions (a megabyte of openers, deep nesting, huge numbers, unicode junk)
return within the time limit plus a second, with the reason recorded when the limit stopped them. Also: hung
rewards stopped in parallel, a hung reward never keeping its process alive, where each kind of reward runs,
timeouts and failures inside envs, and TRL-style batched rewards."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dare_gym
import dare_gym.envs.reasoning_gym  # noqa: F401  (registers the "reasoning_gym" reward, tested below too)
from dare_gym.rewards import base as reward_base
from dare_gym.rewards import batched, get_reward, list_rewards, register_reward, resolve_reward
from dare_gym.rewards.base import LINEAR_CHARS_PER_S

SAMPLES = {
    "math_verify": {"gold": "\\frac{7}{2}"},
    "format": {},
    "strict_format": {},
    "exact_match": {"gold": "012345"},
    "char_match": {"gold": "012345"},
    "countdown": {"numbers": [30, 100, 93], "target": 23},
    "sudoku": {"puzzle": "3102200002100320", "solution": "3142243142131324"},
    "humaneval": {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
                  "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"},
    "mbpp": {"task_id": 0, "text": "add", "code": "def add(a, b):\n    return a + b", "test_setup_code": "",
             "test_list": ["assert add(1, 2) == 3"], "challenge_test_list": []},
}
SAMPLES["reasoning_gym"] = {
    "question": "Calculate 5 - 3 - 6.", "answer": "-4",
    "metadata": {"source_dataset": "basic_arithmetic", "source_index": 0, "expression": "5 - 3 - 6"},
}
SLOW = {"humaneval", "mbpp"}  # a fresh sandboxed process per call
TIME_LIMIT_S = 15.0
NORMAL = {"math_verify": "so $\\boxed{\\frac{7}{2}}$", "exact_match": "012345", "char_match": "012345",
          "countdown": "<answer>100 - 93 + 30 - 14</answer>", "sudoku": "<answer>3142243142131324</answer>",
          "humaneval": "    return a + b\n", "mbpp": "def add(a, b):\n    return a + b", "reasoning_gym": "<answer>-4</answer>"}

MIB = 1 << 20
_JUNK = random.Random(0)
PATHOLOGICAL = {
    "answer openers": "<answer>" * (MIB // 8),
    "boxed openers": "\\boxed{" * (MIB // 7),
    "deep braces": "\\boxed{" + "{" * 300_000 + "}" * 300_000,
    "deep parentheses": "<answer>" + "(" * 200_000 + "1" + ")" * 200_000 + "</answer>",
    "huge number": "9" * 100_000,
    "a megabyte of text": ("The answer is 42, since 6 * 7 = 42. " * (MIB // 36 + 1))[:MIB],
    "unicode junk": "".join(chr(_JUNK.choice([_JUNK.randrange(0x20, 0xD800), _JUNK.randrange(0xE000, 0x110000)]))
                            for _ in range(100_000)),
    "code fences": "```python\n" * (MIB // 10),
    "reasoning tags": "<reasoning>" + "</reasoning> <answer>" * (MIB // 21),
}
LIMIT_S = 1.5  # small, to keep the suite fast: 1 MiB still fits the in-process budget of linear_time rewards

TEXT = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=2000),
    st.builds(lambda a, b: f"{a}<answer>{b}</answer>", st.text(max_size=50), st.text(max_size=80)),
    st.builds(lambda a: f"\\boxed{{{a}}}", st.text(alphabet="0123456789+-*/^(){}\\frac sqrt.,", max_size=60)),
)


def test_every_registered_reward_has_a_property_test_sample():
    assert set(list_rewards()) <= set(SAMPLES), "add a sample for the new reward to SAMPLES"


@pytest.mark.parametrize("name", sorted(set(SAMPLES) & set(list_rewards())))
def test_reward_properties(name):
    reward = get_reward(name)
    low, high = reward.value_range

    @settings(max_examples=12 if name in SLOW else 60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(TEXT)
    def check(completion):
        started = time.perf_counter()
        score = reward(completion, SAMPLES[name])
        assert time.perf_counter() - started < TIME_LIMIT_S
        assert isinstance(score, float) and math.isfinite(score)
        assert low <= score <= high

    check()


def test_a_hanging_reward_times_out_inside_an_env_and_the_run_goes_on():
    def hangs(completion, sample):
        time.sleep(30)
        return 1.0

    env = dare_gym.make("digitsort-v0", reward=[("char_match", 1.0), (hangs, 1.0)], reward_timeout_s=0.5)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step("012345")  # stopped at the limit: its error says so
    assert terminated and info["reward_errors"]["hangs"] == "timed out after 0.5 s (stopped)"
    assert reward == pytest.approx(info["reward_components"]["char_match"])


@pytest.mark.parametrize("timeout_s", [None, 60.0])  # in this thread; in a forked helper
def test_trl_style_batched_rewards_plug_in(timeout_s):
    calls = []

    def length_penalty(prompts, completions, **columns):
        calls.append((list(prompts), list(completions), sorted(columns)))  # seen here only without a limit
        if sorted(columns) != ["digits", "gold"] or len(prompts) != len(completions) or not all(prompts):
            raise ValueError(f"wrong arguments: {sorted(columns)}, {len(prompts)} prompts")
        return [None if c == "skip" else -len(c) / 10 for c in completions]

    vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2, reward=[("char_match", 1.0), (length_penalty, 1.0)],
                            reward_timeout_s=timeout_s)
    prompts, _ = vec.reset(seed=0)
    _, rewards, _, _, infos = vec.step(["012345", "skip", "1", "99"])
    infos = infos["final_info"]  # the scored episodes (the vector env auto-resets in the same step)
    assert "reward_errors" not in infos
    if timeout_s is None:
        assert len(calls) == 1  # one call for the whole batch
        assert calls[0][0] == list(prompts) and calls[0][2] == ["digits", "gold"]
    else:
        assert calls == []  # it ran in a copy of this process
    assert infos["reward_components"]["length_penalty"][2] == pytest.approx(-0.1)
    assert infos["reward_not_applicable"][1] == ["length_penalty"] and not infos["_reward_not_applicable"][0]
    assert rewards[1] == pytest.approx(infos["reward_components"]["char_match"][1])

    @batched
    def constant(p, c, **kw):
        return [0.5] * len(c)

    env = dare_gym.make("digitsort-v0", reward=constant)
    env.reset(seed=1)
    assert env.step("0")[1] == 0.5


def test_a_batched_reward_returning_the_wrong_count_scores_zero_with_the_reason():
    def short(prompts, completions, **columns):
        return [1.0]

    vec = dare_gym.make_vec("digitsort-v0", num_envs=2, group_size=2, reward=short)
    vec.reset(seed=0)
    _, rewards, *_, infos = vec.step(["1", "2"])
    errors = infos["final_info"]["reward_errors"]["short"]
    assert rewards.tolist() == [0.0, 0.0] and "returned 1 scores for 2" in errors[0]


def _warm(reward, name: str) -> None:
    """Score a normal completion first, so that a helper for this reward is started and loaded (start-up is
    not part of any call's limit; see dare_gym.rewards.worker)."""
    reward.score_many([NORMAL.get(name, "<answer>7</answer>")], [SAMPLES[name]])


@pytest.mark.parametrize("name", sorted(set(SAMPLES) & set(list_rewards())))
def test_pathological_completions_return_within_the_limit(name):
    reward = resolve_reward(name, timeout_s=LIMIT_S)
    low, high = get_reward(name).value_range
    _warm(reward, name)
    for label, completion in PATHOLOGICAL.items():
        started = time.perf_counter()
        result = reward.score_many([completion], [SAMPLES[name]])[0]
        elapsed = time.perf_counter() - started
        error = result.errors.get(name, "")
        assert elapsed < LIMIT_S + 1, f"{name} on {label}: {elapsed:.1f} s ({error or 'no error'})"
        assert math.isfinite(result.total) and low <= result.total <= high, (name, label, result)
        if elapsed >= LIMIT_S + 0.5:  # nothing runs past the limit: the limit stopped it, and the reason says so
            assert error == f"timed out after {LIMIT_S:g} s (stopped)", (name, label, error)
        if "timed out" in error:
            assert result.total == 0.0
            _warm(reward, name)  # its helper was killed: start the next one outside the measured time


def test_every_registered_reward_declares_where_it_may_run():
    linear = {name for name in list_rewards() if get_reward(name).linear_time}
    assert linear == {"format", "strict_format", "exact_match", "char_match", "countdown", "sudoku"}
    assert MIB <= LIMIT_S * LINEAR_CHARS_PER_S  # so the test above also runs them in this thread on 1 MiB


@pytest.mark.parametrize("kind", ["sleeps", "holds the GIL"])
def test_hung_completions_are_stopped_in_parallel_at_their_limit(kind, tmp_path):
    """Eight hung calls run at once: each, once started, waits until all eight have started (a barrier of
    files) before it hangs, so all eight reach the barrier only if they run side by side. No wall-clock bound:
    the limit is generous, so that forking eight copies of this process on a loaded machine fits in it."""
    limit = 6.0

    def hangs(completion, sample):
        Path(tmp_path, f"started-{os.getpid()}").touch()
        while len(list(tmp_path.glob("started-*"))) < 8:
            time.sleep(0.01)
        Path(tmp_path, f"saw-all-{os.getpid()}").touch()
        if kind == "sleeps":
            time.sleep(60)
        else:
            re.match(r"(a+)+$", "a" * 40 + "b")  # backtracking for hours inside one C call
        return 1.0

    reward = resolve_reward([("char_match", 1.0), (hangs, 1.0)], timeout_s=limit)
    results = reward.score_many(["012345"] * 8, [{"gold": "012345"}] * 8)
    assert len(list(tmp_path.glob("saw-all-*"))) == 8, "the eight calls did not all run at once"
    assert [r.errors for r in results] == [{"hangs": f"timed out after {limit:g} s (stopped)"}] * 8
    assert [r.total for r in results] == [1.0] * 8  # the other term still counts


class _Huge:
    """A score object whose conversion to float calls back into user code (and is slow)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __float__(self):
        time.sleep(self.seconds)
        return 1.0


@pytest.mark.parametrize("timeout_s", [None, 30.0])  # in this thread; in a forked helper
def test_a_value_that_is_no_float_score_scores_zero_with_the_reason(timeout_s):
    from fractions import Fraction

    values = {"huge int": 10**400, "huge Fraction": Fraction(10**400, 7), "text of a number": "1.0",
              "bytes": b"1", "complex": 1j, "a number too long to print": 10**5000, "nan": float("nan")}
    reasons = {"huge int": "too large for a float score", "huge Fraction": "too large for a float score",
               "text of a number": "returned str '1.0', which is not a number", "bytes": "which is not a number",
               "complex": "which is not a number", "a number too long to print": "too large for a float score",
               "nan": "non-finite score"}
    names = sorted(values)

    def odd(completion, sample):
        return values[completion]

    env = dare_gym.make_vec("digitsort-v0", num_envs=len(names), reward=[("char_match", 1.0), (odd, 1.0)],
                            reward_timeout_s=timeout_s)
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step(names)  # no OverflowError escapes: every term is still scored
    infos = infos["final_info"]
    for position, name in enumerate(names):
        assert reasons[name] in infos["reward_errors"]["odd"][position], (name, infos["reward_errors"]["odd"])
        assert infos["reward_components"]["odd"][position] == 0.0
        assert rewards[position] == pytest.approx(infos["reward_components"]["char_match"][position])


def test_a_slow_conversion_of_a_score_runs_under_the_limit():
    # float() of a returned object runs the reward's code: in the helper, under the limit (not in this process)
    def slow(completion, sample):
        return _Huge(30.0)

    results = resolve_reward(slow, timeout_s=1.0).score_many(["a", "b", "c", "d"], [{}] * 4)
    assert [r.errors for r in results] == [{"slow": "timed out after 1 s (stopped)"}] * 4


def test_system_exit_in_a_reward_without_a_limit_scores_zero_and_the_batch_goes_on():
    def exits(completion, sample):
        if completion == "exit":
            raise SystemExit(3)
        return 0.5

    results = resolve_reward(exits, timeout_s=None).score_many(["a", "exit", "b"], [{}] * 3)
    assert [r.total for r in results] == [0.5, 0.0, 0.5]
    assert results[1].errors["exits"].startswith("SystemExit: 3 (")


@pytest.mark.parametrize("child", ["returns too", "stays behind"])
def test_a_reward_that_forks_gets_its_own_score_and_its_child_is_stopped(tmp_path, child):
    """A reward that calls os.fork(): with both processes returning, each completion still gets its own score
    (replies are matched to their calls, and only the helper answers); a child left running is killed."""

    def forks(completion, sample):
        pid = os.fork()
        if child == "stays behind":
            if pid == 0:
                Path(tmp_path, f"child-{os.getpid()}").touch()
                time.sleep(120)
            while not Path(tmp_path, f"child-{pid}").exists():  # it is running when the call returns
                time.sleep(0.01)
        return float(len(completion))

    completions = ["x" * n for n in range(1, 9)]
    results = resolve_reward(forks, timeout_s=30.0).score_many(completions, [{}] * 8)
    assert [r.total for r in results] == [float(n) for n in range(1, 9)]
    assert not any(r.errors for r in results)
    children = [int(path.name.split("-")[1]) for path in tmp_path.glob("child-*")]
    assert len(children) == (8 if child == "stays behind" else 0)
    assert _wait_for(lambda: not any(_running(pid) for pid in children), 10), "a reward's child outlived its call"


def test_a_linear_time_reward_runs_in_this_thread_only_when_it_must_finish_in_time():
    seen = []

    def length(completion, sample):
        seen.append(len(completion))  # visible only when called in this process
        return 1.0

    register_reward("test_linear_length", length, linear_time=True)
    try:
        budget = int(0.1 * LINEAR_CHARS_PER_S)
        results = resolve_reward("test_linear_length", timeout_s=0.1).score_many(["x" * budget, "x" * (budget + 1)],
                                                                               [{}, {}])
    finally:
        reward_base.REWARDS.pop("test_linear_length")
    assert [r.total for r in results] == [1.0, 1.0] and not any(r.errors for r in results)
    assert seen == [budget]  # the longer one ran in a helper process


def test_a_batch_form_that_overruns_falls_back_to_one_call_per_completion():
    def exact(completion, sample):
        return float(completion == sample["gold"])

    def hanging_batch(completions, samples):
        time.sleep(60)

    def quick_batch(completions, samples):
        return [0.25] * len(completions)

    completions, samples = ["a", "b", "c"], [{"gold": "a"}, {"gold": "x"}, {"gold": "c"}]
    exact.batch_fn = quick_batch
    assert [r.total for r in resolve_reward(exact, timeout_s=5).score_many(completions, samples)] == [0.25] * 3
    exact.batch_fn = hanging_batch  # stopped at its limit, then each completion scored on its own
    results = resolve_reward(exact, timeout_s=0.5).score_many(completions, samples)
    assert [r.total for r in results] == [1.0, 0.0, 1.0] and not any(r.errors for r in results)


HUNG_SCRIPT = """
import os, sys, time

def hang(pid_file):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)

def hangs(completion, sample):
    hang(sys.argv[2])
    return 1.0

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import hung_reward  # by its module name, so that a spawned helper can import it too
    from dare_gym.rewards import resolve_reward
    from dare_gym.rewards.worker import RewardTimeout, TimeoutPool

    kind, pid_file, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if kind == "forked":
        print(resolve_reward(hung_reward.hangs, timeout_s=limit)("x", {}).errors["hangs"], flush=True)
    else:
        try:
            TimeoutPool().call(hung_reward.hang, pid_file, timeout=limit)
        except RewardTimeout as error:
            print(error, flush=True)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("kind", ["forked", "spawned"])
def test_a_hung_reward_never_keeps_its_process_alive(tmp_path, kind):
    script, pid_file = tmp_path / "hung_reward.py", tmp_path / "helper.pid"
    script.write_text(textwrap.dedent(HUNG_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    # stopped at the limit: the process reports it and exits, and the helper is gone
    done = subprocess.run([sys.executable, str(script), kind, str(pid_file), "0.5"], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "0.5 s" in done.stdout and not _running(int(pid_file.read_text()))

    # the process killed outright while its reward hangs: the kernel takes the helper with it
    pid_file.unlink()
    process = subprocess.Popen([sys.executable, str(script), kind, str(pid_file), "60"], env=env)
    try:
        assert _wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60)
        helper = int(pid_file.read_text())
        assert _running(helper)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert _wait_for(lambda: not _running(helper), 10)
    finally:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------------------- math answers
GSM8K_RECORD = {"question": "How many eggs does she sell?", "answer": "She sells 16 + 2 = 18 eggs.\n#### 18"}
WRONG_BUT_LENIENT = [  # what math-verify alone scored correct for the gold 18
    "\\boxed{19 = 18}", "<answer>19 = 18</answer>", "\\boxed{100 = 18}", "\\boxed{17 + 2 = 18}",
    "\\boxed{18 \\text{ (or maybe 19)}}", "\\boxed{18\\%}", "\\boxed{\\{18\\}}", "<answer>18 or 19</answer>",
    "\\boxed{18 = x}", "\\boxed{x = 18 = 19}", "\\boxed{19 == 18}", "\\boxed{19 \\equiv 18}", "\\boxed{19 \\to 18}",
    "\\boxed{19 \\Rightarrow 18}", "\\boxed{19 := 18}", "\\boxed{18~19}",
]
RIGHT_BUT_MISSED = ["<answer>18 dollars</answer>", "<answer>18 eggs</answer>", "<answer>1.8e1</answer>",
                    "\\boxed{18 \\text{ eggs}}", "\\boxed{x = 18}", "\\boxed{f(3) = 18}", "\\boxed{18}", "#### 18",
                    "\\boxed{18\\,000 / 1{,}000}"]
BOMBS = ["10^{10^{10^{10}}}", "9^{9^{9}}", "9^9^9", "(10^{7})!", "\\prod_{k=1}^{10^{7}} k", "2^{10^{9}}",
         "\\int_0^{10^{6}} e^{x^{2}} \\sin(x^{99}) dx", "\\binom{10^{9}}{10^{5}}", "2^{1000000000}", "100000!"]


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm8k") / "one.jsonl"
    path.write_text(json.dumps(GSM8K_RECORD) + "\n")
    return str(path)


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_math_answers_that_hedge_or_disagree_are_wrong_and_plain_ones_right(gsm8k_file, timeout_s):
    env = dare_gym.make_vec("gsm8k-v0", num_envs=len(WRONG_BUT_LENIENT + RIGHT_BUT_MISSED), data_files=gsm8k_file,
                            reward_timeout_s=timeout_s)
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step(WRONG_BUT_LENIENT + RIGHT_BUT_MISSED)
    infos = infos["final_info"]
    verdicts = dict(zip(WRONG_BUT_LENIENT + RIGHT_BUT_MISSED, zip(rewards.tolist(), infos["correct"].tolist())))
    assert {c: v for c, v in verdicts.items() if c in WRONG_BUT_LENIENT} == {c: (0.0, False) for c in WRONG_BUT_LENIENT}
    assert {c: v for c, v in verdicts.items() if c in RIGHT_BUT_MISSED} == {c: (1.0, True) for c in RIGHT_BUT_MISSED}


def test_an_interval_is_not_a_point_and_each_form_says_why():
    from dare_gym.rewards.math import answer_form_problem, answers_match

    point = "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert not answers_match(point, "\\left[3,\\frac{\\pi}{2}\\right]")
    assert answers_match(point, "(3, \\frac{\\pi}{2})") and answers_match("[1, 2)", "\\left[1,2\\right)")
    assert "an interval is not a point" in answer_form_problem(point, "[3, \\frac{\\pi}{2}]")
    assert answer_form_problem("18", "18\\%") == "a percentage where the answer is not one"
    assert answer_form_problem("18", "\\{18\\}") == "a set where the answer is not one"
    assert answer_form_problem("18", "18 \\text{ (or maybe 19)}").startswith("a hedge: text with a number")
    assert answers_match("18\\%", "18\\%") and answers_match("\\{1, 2\\}", "\\{2, 1\\}")  # when the gold is one
    assert answers_match("y = 2x + 3", "y=2x+3")  # a gold equation is compared as one


def test_math_bombs_are_refused_before_sympy_and_correct_is_computed_once(gsm8k_file):
    """Expressions of a few characters whose value sympy would compute for minutes in C code (where no alarm
    stops it): each is named too big and scores 0 without reaching the limit. ``info["correct"]`` reuses the
    reward's verdict: one verification per step, not two."""
    from dare_gym.rewards import math as math_rewards

    for bomb in BOMBS:
        assert math_rewards.answer_form_problem("18", bomb) is not None, bomb
    env = dare_gym.make_vec("gsm8k-v0", num_envs=len(BOMBS), data_files=gsm8k_file, reward_timeout_s=20.0)
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step([f"\\boxed{{{bomb}}}" for bomb in BOMBS])
    assert rewards.tolist() == [0.0] * len(BOMBS) and not infos["final_info"]["correct"].any()
    assert "reward_errors" not in infos["final_info"], "a bomb reached sympy and ran into the limit"

    single = dare_gym.make("gsm8k-v0", data_files=gsm8k_file, reward_timeout_s=None)  # verified in this process
    math_rewards.answers_match.cache_clear()
    for completion in ("\\boxed{\\frac{36}{2}}", "\\boxed{17.5}"):
        single.reset(options={"index": 0})
        before = math_rewards._verify_cached.cache_info()
        _, _, _, _, info = single.step(completion)
        after = math_rewards._verify_cached.cache_info()
        assert (after.hits + after.misses) - (before.hits + before.misses) == 1, "verified twice for one step"
        assert info["correct"] == (completion == "\\boxed{\\frac{36}{2}}")
