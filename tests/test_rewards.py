"""Rewards: GSM8K golds against the real file, answer extraction, owned timeouts, registry and combination."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dare_gym.rewards import get_reward, list_rewards, register_reward, resolve_reward
from dare_gym.rewards.math import answers_match, extract_final_answer, gsm8k_gold, math_verify_reward
from dare_gym.rewards.worker import RewardTimeout, TimeoutPool


def _wrong_final_number(answer: str) -> str:
    head, _, final = answer.rpartition("####")
    value = int(final.strip().replace(",", ""))
    return f"{head}#### {value + 7}"


def test_every_gsm8k_gold_solution_is_correct_and_a_wrong_final_number_is_not(data_dir):
    records = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(records) == 1319
    wrong_accepted, gold_rejected = [], []
    for number, record in enumerate(records):
        sample = {"gold": gsm8k_gold(record["answer"])}
        if math_verify_reward(record["answer"], sample) != 1.0:
            gold_rejected.append(number)
        if math_verify_reward(_wrong_final_number(record["answer"]), sample) != 0.0:
            wrong_accepted.append(number)
    assert gold_rejected == [] and wrong_accepted == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so <answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("the area is $\\boxed{\\sqrt{2}+\\frac{1}{3}}$.", "\\sqrt{2}+\\frac{1}{3}"),
        ("Step 1...\n#### 1,080", "1,080"),
        ("I think 3 apples and then 17 pears", "17"),
        ("no number here", None),
    ],
)
def test_final_answer_extraction(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "gold,prediction,equal",
    [
        ("72", "72", True),
        ("1080", "1,080", True),
        ("0.5", "\\frac{1}{2}", True),
        ("18", "18.0", True),
        ("-5", "-5", True),
        ("72", "73", False),
        ("3", "\\frac{1}{3}", False),
        ("10", "", False),
    ],
)
def test_answers_match_uses_math_verify(gold, prediction, equal):
    assert answers_match(gold, prediction) is equal


def test_math_verify_works_outside_the_main_thread():
    golds = [("0.5", f"\\frac{{{i}}}{{{2 * i}}}") for i in range(1, 25)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pair: answers_match(*pair), golds))
    assert all(results)
    assert threading.current_thread() is threading.main_thread()


def _sleep_then_return(seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


def _raise_value_error() -> None:
    raise ValueError("bad input 123")


def test_timeout_pool_kills_overrunning_calls_and_recovers():
    pool = TimeoutPool(max_workers=1)
    try:
        started = time.perf_counter()
        with pytest.raises(RewardTimeout, match="0.5 s limit"):
            pool.call(_sleep_then_return, 30.0, timeout=0.5)
        assert time.perf_counter() - started < 5
        assert pool.call(_sleep_then_return, 0.0, timeout=10) == "finished"  # a fresh helper took over
        with pytest.raises(ValueError, match="bad input 123"):
            pool.call(_raise_value_error, timeout=10)
    finally:
        pool.close()


def test_registry_and_weighted_combination():
    assert {"math_verify", "format", "strict_format", "exact_match", "char_match"} <= set(list_rewards())
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")

    def shouting(completion, sample):
        return float(completion.isupper())

    register_reward("test_shouting", shouting, overwrite=True)
    combined = resolve_reward([("test_shouting", 2.0), ("format", 0.5)])
    result = combined("<ANSWER>X</ANSWER>", {})
    assert result.components == {"test_shouting": 1.0, "format": 0.0}
    assert result.total == 2.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_shouting", lambda c, s: 0.0)
    with pytest.raises(ValueError, match="finite number"):
        resolve_reward([("format", float("nan"))])
    with pytest.raises(ValueError, match=r"\(reward, weight\) pair"):
        resolve_reward([("format", 1.0, 2.0)])


def test_non_finite_scores_are_reported_not_propagated():
    result = resolve_reward(lambda c, s: float("inf"))("x", {})
    assert result.total == 0.0 and re.search("non-finite", next(iter(result.errors.values())))


def test_format_rewards():
    fmt, strict = get_reward("format"), get_reward("strict_format")
    assert fmt("work... <answer>7</answer>", {}) == 1.0
    assert fmt("<answer></answer>", {}) == 0.0
    assert fmt("<answer>1</answer><answer>2</answer>", {}) == 0.0
    assert strict("<reasoning>2+5</reasoning>\n<answer>7</answer>", {}) == 1.0
    assert strict("7 <answer>7</answer>", {}) == 0.0


def test_char_match_gives_dense_credit():
    reward = get_reward("char_match")
    assert reward("012345", {"gold": "012345"}) == 1.0
    assert reward("012399", {"gold": "012345"}) == pytest.approx(4 / 6)
    assert reward("0123456", {"gold": "012345"}) == pytest.approx(6 / 7)  # extra characters cost
    assert reward("", {"gold": "012345"}) == 0.0
