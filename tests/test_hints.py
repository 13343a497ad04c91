"""The env hint API (the partial gold reasoning IGPO inpaints) on the real data files, and the sampler's prefill
(completion tokens it keeps and never remasks)."""

from __future__ import annotations

import pytest

import dare_gym
from dare_gym.envs.base import leading_fraction


def test_leading_fraction_cuts_at_word_or_character_boundaries():
    text = "one two  three four"
    assert leading_fraction(text, 0.5) == "one two"
    assert leading_fraction(text, 0.51) == "one two  three"  # rounded up: 3 of 4 words, spacing kept
    assert leading_fraction(text, 1.0) == text
    assert leading_fraction(text, 0.0) == ""
    assert leading_fraction("0123456789", 0.25, unit="chars") == "012"
    with pytest.raises(ValueError, match="hint fraction must be a number in \\[0, 1\\], got 1.5"):
        leading_fraction(text, 1.5)
    with pytest.raises(ValueError, match="unit must be 'words' or 'chars', got 'lines'"):
        leading_fraction(text, 0.5, unit="lines")


def test_gsm8k_hint_is_the_rationale_without_annotations_or_final_answer():
    env = dare_gym.make("gsm8k-v0")
    record = env.record(0)  # Natalia's clips: "Natalia sold 48/2 = <<48/2=24>>24 clips in May. ... #### 72"
    full = env.hint(record, 1.0)
    assert full == ("Natalia sold 48/2 = 24 clips in May.\n"
                    "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert "####" not in full and "<<" not in full
    assert env.hint(record, 0.25) == "Natalia sold 48/2 = 24"  # 5 of the 19 words (ceil(0.25 · 19))
    assert full.startswith(env.hint(record, 0.6))
    with pytest.raises(ValueError, match="got -0.1"):
        env.hint(record, -0.1)


def test_math_hint_is_the_leading_part_of_the_solution():
    env = dare_gym.make("math-v0", split="test")
    record = env.record(0)
    assert env.hint(record, 1.0) == record["solution"]
    half = env.hint(record, 0.5)
    words = record["solution"].split()
    assert half.split() == words[:(len(words) + 1) // 2]
    assert "\\boxed" not in half  # the answer sits at the end of the solution
    math500 = dare_gym.make("math500-v0")
    assert math500.hint(math500.record(3), 1.0) == math500.record(3)["solution"]


def test_sorting_hints_are_the_leading_characters_of_the_gold_answer():
    digits = dare_gym.make("digitsort-v0")
    record = digits.record(7)
    assert digits.hint(record, 1.0) == record["gold"] == "".join(sorted(record["digits"]))
    assert digits.hint(record, 0.5) == record["gold"][:3]
    groups = dare_gym.make("groupsort-v0")
    record = groups.record(2)
    assert groups.hint(record, 1 / 3) == record["gold"][:len(record["gold"]) // 3 + 1]


def test_tasks_without_reasoning_have_no_hint_and_the_vector_env_collects_them():
    countdown = dare_gym.make("countdown-v0")
    assert countdown.hint(countdown.record(0), 0.5) is None
    vector = dare_gym.make_vec("digitsort-v0", 2, group_size=2)
    first, second = vector.envs[0].record(3), vector.envs[0].record(4)
    assert vector.hints([3, 4], 0.5) == [first["gold"][:3], second["gold"][:3]]
