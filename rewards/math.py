"""Math answer rewards: extract the final answer from a completion (in linear time, see
:mod:`dare_gym.rewards.extract`) and judge it against the gold with math-verify, under a time limit this module
owns (see :mod:`dare_gym.rewards.worker`)."""

from __future__ import annotations

import functools
import re
from typing import Mapping

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.extract import last_boxed, last_gsm8k_marker, last_number, last_tag_block
from dare_gym.rewards.worker import RewardTimeout, alarm, in_helper, run_with_timeout

VERIFY_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 1000  # a longer final answer is judged wrong without parsing it (MATH-500's golds: <= 53)
_CACHED_CHARS = 1000  # pairs longer than this are not kept in the verdict cache

__all__ = ["answers_match", "extract_final_answer", "gold_answer", "gsm8k_gold", "last_boxed", "math_verify_reward"]


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer, by the first convention that matches: the last ``<answer>`` block
    (and a ``\\boxed`` inside it), else the last ``\\boxed{}``, else GSM8K's ``#### x`` line, else the last
    number in the text. Linear in the text's length."""
    tagged = last_tag_block(text, "<answer>", "</answer>", ignore_case=True)
    if tagged is not None:
        inner = tagged.strip()
        return last_boxed(inner) or inner
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = last_gsm8k_marker(text)
    if marker is not None:
        return marker.strip()
    return last_number(text)


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K's gold number: the text after the final ``####``, thousands separators removed."""
    marker = last_gsm8k_marker(answer_field)
    if marker is None:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got ...{answer_field[-60:]!r}")
    return marker.replace(",", "").strip()


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


def _import_math_verify() -> None:
    """Import math-verify and sympy (about a second) before a helper's first call, outside its time limit."""
    import math_verify  # noqa: F401

    _parse("1")


def _verify(gold: str, prediction: str, timeout: float) -> bool:
    """math-verify under a hard limit: in a helper process already (the reward runs there under its term's
    limit), an alarm stops sympy after ``timeout``; elsewhere the check is sent to a helper that is killed."""
    try:
        if in_helper():
            with alarm(timeout):
                return _verify_in_process(gold, prediction)
        return bool(run_with_timeout(_verify_in_process, gold, prediction, timeout=timeout))
    except RewardTimeout:
        return False


_verify_cached = functools.lru_cache(maxsize=65536)(_verify)


def answers_match(gold: str, prediction: str, timeout: float = VERIFY_TIMEOUT_S, shortcut: bool = True) -> bool:
    """Whether ``prediction`` is mathematically equal to ``gold`` (math-verify). Identical strings short-cut
    (``shortcut=False`` sends them to math-verify too, for benchmarks); an answer longer than
    ``MAX_ANSWER_CHARS`` is not equal; anything else is verified under a hard limit of ``timeout`` seconds
    (then: not equal). Verdicts on short pairs are cached."""
    gold, prediction = _strip_number_commas(gold.strip()), _strip_number_commas(prediction.strip())
    if not prediction or len(prediction) > MAX_ANSWER_CHARS:
        return False
    if shortcut and prediction == gold:
        return True
    if len(gold) + len(prediction) <= _CACHED_CHARS:
        return _verify_cached(gold, prediction, timeout)
    return _verify(gold, prediction, timeout)


answers_match.cache_clear = _verify_cached.cache_clear  # benchmarks time uncached verification


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


# Loaded once per helper process before its first call, so that no call's limit pays for the import.
_verify_in_process.warm_up = _import_math_verify
math_verify_reward.warm_up = _import_math_verify
