"""Math answer rewards: extract the final answer from a completion and judge it against the gold with
math-verify, under a time limit this module owns (see :mod:`dare_gym.rewards.worker`)."""

from __future__ import annotations

import functools
import re
from typing import Mapping

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.worker import RewardTimeout, run_with_timeout

VERIFY_TIMEOUT_S = 5.0

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_GSM8K_MARKER = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces matched."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_brace = text.find("{", start)
    if open_brace < 0:
        return None
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer, by the first convention that matches: the last ``<answer>`` block
    (and a ``\\boxed`` inside it), else the last ``\\boxed{}``, else GSM8K's ``#### x`` line, else the last
    number in the text."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        inner = tagged[-1].strip()
        return last_boxed(inner) or inner
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = _GSM8K_MARKER.findall(text)
    if marker:
        return marker[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K's gold number: the text after the final ``####``, thousands separators removed."""
    marker = _GSM8K_MARKER.findall(answer_field)
    if not marker:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got ...{answer_field[-60:]!r}")
    return marker[-1].replace(",", "").strip()


def _strip_number_commas(answer: str) -> str:
    # "1,080" is a thousands separator, not a tuple; math-verify would read it as (1, 80).
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    """math-verify's parse, cached in the helper process: a GRPO group shares one gold, parsed once."""
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=None)


def _verify_in_process(gold: str, prediction: str) -> bool:
    """math-verify with its signal-based timeouts disabled: the caller enforces the limit."""
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(prediction)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


@functools.lru_cache(maxsize=65536)
def answers_match(gold: str, prediction: str, timeout: float = VERIFY_TIMEOUT_S, shortcut: bool = True) -> bool:
    """Whether ``prediction`` is mathematically equal to ``gold`` (math-verify). Identical strings short-cut
    (``shortcut=False`` sends them to math-verify too, for benchmarks); anything else runs in a helper process
    that is killed after ``timeout`` seconds (then: not equal)."""
    gold, prediction = _strip_number_commas(gold.strip()), _strip_number_commas(prediction.strip())
    if not prediction:
        return False
    if shortcut and prediction == gold:
        return True
    try:
        return bool(run_with_timeout(_verify_in_process, gold, prediction, timeout=timeout))
    except RewardTimeout:
        return False


def gold_answer(sample: Mapping) -> str:
    """The record's gold final answer: ``gold`` if the env set it, else derived from ``answer``."""
    if "gold" in sample:
        return str(sample["gold"])
    if "answer" in sample:
        answer = str(sample["answer"])
        return gsm8k_gold(answer) if "####" in answer else answer
    raise KeyError("the sample has neither a 'gold' nor an 'answer' field")


@register_reward("math_verify")
def math_verify_reward(completion: str, sample: Mapping) -> float:
    """1.0 if the completion's final answer equals the gold answer under math-verify, else 0.0."""
    prediction = extract_final_answer(completion)
    if prediction is None:
        return 0.0
    return 1.0 if answers_match(gold_answer(sample), prediction) else 0.0
