"""Rewards: GSM8K golds against the real file, answer extraction (linear scanners that agree with the regexes
they replace), owned timeouts, registry and combination."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dare_gym.rewards import get_reward, list_rewards, register_reward, resolve_reward
from dare_gym.rewards import base as reward_base
from dare_gym.rewards.extract import (
    count_answer_blocks,
    first_ascii_digits,
    is_reasoning_then_answer,
    iter_tag_blocks,
    last_boxed,
    last_gsm8k_marker,
    last_number,
    last_tag_block,
)
from dare_gym.rewards.math import answers_match, extract_final_answer, gsm8k_gold, math_verify_reward
from dare_gym.rewards.worker import HelperError, RewardTimeout, TimeoutPool


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


def _hold_the_gil() -> str:
    re.match(r"(a+)+$", "a" * 40 + "b")  # catastrophic backtracking inside one C call: hours, GIL held
    return "finished"


class _PrivateError(ValueError):
    def __init__(self, a, b):  # an exception that cannot be rebuilt from its pickle
        super().__init__(f"{a} and {b}")


def _raise_private_error() -> None:
    raise _PrivateError(1, 2)


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
        started = time.perf_counter()
        with pytest.raises(RewardTimeout):  # a thread could not stop this one: it never releases the GIL
            pool.call(_hold_the_gil, timeout=0.5)
        assert time.perf_counter() - started < 0.5 + 5  # the limit, plus starting a helper
        with pytest.raises(HelperError, match=r"^ValueError: 1 and 2 \(test_rewards.py:\d+ in _raise_private_error\)$"):
            pool.call(_raise_private_error, timeout=10)
    finally:
        pool.close()


def test_registry_and_weighted_combination():
    assert {"math_verify", "format", "strict_format", "exact_match", "char_match"} <= set(list_rewards())
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")

    def shouting(completion, sample):
        return float(completion.isupper())

    register_reward("test_shouting", shouting, overwrite=True)
    try:
        combined = resolve_reward([("test_shouting", 2.0), ("format", 0.5)])
        result = combined("<ANSWER>X</ANSWER>", {})
        assert result.components == {"test_shouting": 1.0, "format": 0.0}
        assert result.total == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_shouting", lambda c, s: 0.0)
    finally:
        reward_base.REWARDS.pop("test_shouting")  # the property tests cover every registered reward
    with pytest.raises(ValueError, match="finite number"):
        resolve_reward([("format", float("nan"))])
    with pytest.raises(ValueError, match=r"\(reward, weight\) pair"):
        resolve_reward([("format", 1.0, 2.0)])


class _Hidden(ZeroDivisionError):
    pass


def _infinite(completion, sample):
    return float("inf")


def _raises_private(completion, sample):
    raise _Hidden("no luck")


def _text(completion, sample):
    return "high"


def _nothing(completion, sample):
    return None


@pytest.mark.parametrize("timeout_s", [None, 5.0])  # in this thread, and in a forked helper
def test_failures_are_reported_in_plain_words(timeout_s):
    reward = resolve_reward([(_infinite, 1.0), (_raises_private, 1.0), (_text, 1.0), (_nothing, 1.0)],
                            timeout_s=timeout_s)
    result = reward("x", {})
    assert result.total == 0.0
    assert result.errors["_raises_private"].startswith("ZeroDivisionError: no luck (test_rewards.py:")
    assert result.errors["_infinite"] == "returned a non-finite score inf"
    assert result.errors["_text"] == "returned str 'high', which is not a number"
    assert result.errors["_nothing"] == "returned None (a per-sample reward must return a number)"
    assert "_Hidden" not in str(result.errors) and "ScoreError" not in str(result.errors)


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


# ------------------------------------------------------------------------------ linear-time extraction
FRAGMENTS = ["<answer>", "</answer>", "<ANSWER>", "</Answer>", "<reasoning>", "</reasoning>", " ", "\n", "\t",
             "x", "7", "\\boxed{", "\\fbox{", "{", "}", "####", "-", ",", ".", "1,080", "é", "<", "/"]
FRAGMENT_TEXT = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)


def _last(items):
    return items[-1] if items else None


def _boxed_by_characters(text: str):
    """The brace matcher as first written (a loop over every character), as the oracle."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    open_brace = text.find("{", start) if start >= 0 else -1
    depth = 0
    for i in range(open_brace, len(text)) if open_brace >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            return text[open_brace + 1:i]
    return None


@settings(max_examples=400, deadline=None)
@given(FRAGMENT_TEXT)
def test_linear_extractors_agree_with_the_regexes_they_replace(text):
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    assert list(iter_tag_blocks(text)) == blocks
    assert last_tag_block(text) == _last(blocks)
    assert last_tag_block(text, ignore_case=True) == _last(re.findall(r"<answer>(.*?)</answer>", text,
                                                                       re.DOTALL | re.IGNORECASE))
    assert count_answer_blocks(text) == len(re.findall(r"<answer>\s*(\S.*?)\s*</answer>", text, re.DOTALL))
    strict = r"^\s*<reasoning>.*?</reasoning>\s*<answer>\s*\S.*?</answer>\s*$"
    assert is_reasoning_then_answer(text) == bool(re.match(strict, text, re.DOTALL))
    assert last_boxed(text) == _boxed_by_characters(text)
    assert last_gsm8k_marker(text) == _last(re.findall(r"####\s*([^\n]*)", text))
    assert last_number(text) == _last(re.findall(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text))
    assert first_ascii_digits(text, 16) == "".join(ch for ch in text if ch in "0123456789")[:16]


def test_pathological_answers_are_judged_without_parsing_them():
    assert extract_final_answer("<answer>" * 100_000) is None
    assert extract_final_answer("\\boxed{" * 100_000 + "1") == "1"  # no closed box: the last number
    assert extract_final_answer("9" * 100_000) == "9" * 100_000
    assert not answers_match("9" * 100_000, "9" * 100_000 + "0")  # longer than MAX_ANSWER_CHARS: not equal
    assert math_verify_reward("<answer>" + "{" * 50_000 + "</answer>", {"gold": "1"}) == 0.0
