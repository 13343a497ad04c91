"""Property tests for every registered reward: arbitrary text never raises, scores are finite and in the
declared range, and each call returns within its time limit. Also: timeouts and failures inside envs, and
TRL-style batched rewards."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dare_gym
import dare_gym.envs.reasoning_gym  # noqa: F401  (registers the "reasoning_gym" reward, tested below too)
from dare_gym.rewards import batched, get_reward, list_rewards

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
    started = time.perf_counter()
    _, reward, terminated, _, info = env.step("012345")
    assert time.perf_counter() - started < 3
    assert terminated and "timed out after 0.5 s" in info["reward_errors"]["hangs"]
    assert reward == pytest.approx(info["reward_components"]["char_match"])


def test_trl_style_batched_rewards_plug_in():
    calls = []

    def length_penalty(prompts, completions, **columns):
        calls.append((list(prompts), list(completions), sorted(columns)))
        return [None if c == "skip" else -len(c) / 10 for c in completions]

    vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2, reward=[("char_match", 1.0), (length_penalty, 1.0)])
    prompts, _ = vec.reset(seed=0)
    _, rewards, _, _, infos = vec.step(["012345", "skip", "1", "99"])
    infos = infos["final_info"]  # the scored episodes (the vector env auto-resets in the same step)
    assert len(calls) == 1  # one call for the whole batch
    assert calls[0][0] == list(prompts) and calls[0][2] == ["digits", "gold"]
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
