"""The task suite: math, Countdown, Sudoku and preference pairs, on generated data and the real files."""

from __future__ import annotations

import gzip
import json

import pytest

import dare_gym
from dare_gym.envs.countdown import check_solution, make_problem
from dare_gym.envs.data import DataFormatError
from dare_gym.envs.preference import PreferenceDataset, load_hh_rlhf, split_transcript
from dare_gym.envs.sudoku import count_solutions, is_valid_solution, make_puzzle
from dare_gym.rewards.countdown import countdown_solves, evaluate_expression
from dare_gym.rewards.math import last_boxed
from dare_gym.rewards.sudoku import answer_grid, sudoku_reward

# ----------------------------------------------------------------------------------------------- math


def test_math500_boxed_golds_are_judged_correct(data_dir):
    env = dare_gym.make("math500-v0", split="test")
    assert env.num_records == 500
    misses = []
    for index in range(env.num_records):
        env.reset(options={"index": index})
        record = env.record(index)
        _, reward, *_, info = env.step(f"The answer is $\\boxed{{{record['answer']}}}$.")
        if reward != 1.0 or not info["correct"]:
            misses.append((index, record["answer"]))
    assert len(misses) <= 5, misses  # at least 99%


def test_math500_golds_agree_with_the_last_boxed_of_the_solution(data_dir):
    env = dare_gym.make("math500-v0", split="test")
    assert all(last_boxed(env.record(i)["solution"]) == env.record(i)["answer"] for i in range(500))


def test_math_full_split_takes_the_last_brace_matched_boxed(data_dir):
    env = dare_gym.make("math-v0", split="test")
    assert env.num_records == 5000
    line = (data_dir / "math" / "test.jsonl").read_text().splitlines()[0]
    assert env.record(0)["gold"] == last_boxed(json.loads(line)["solution"])
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed{unclosed {") is None
    env.reset(options={"index": 0})
    assert env.step(f"<answer>{env.record(0)['gold']}</answer>")[1] == 1.0
    env.reset(options={"index": 0})
    assert env.step("<answer>123456789</answer>")[1] == 0.0


def test_math_info_never_holds_the_answer(data_dir):
    env = dare_gym.make("math500-v0", split="test")
    for index in range(0, 500, 50):
        _, info = env.reset(options={"index": index})
        assert "answer" not in info and "gold" not in info and "solution" not in info


# ------------------------------------------------------------------------------------------ countdown


def test_generated_countdown_problems_are_solvable_and_seeded():
    for index in range(200):
        for count in (3, 4):
            problem = make_problem(index, count)
            assert len(problem["numbers"]) == count and check_solution(problem)
            assert problem == make_problem(index, count)
    env = dare_gym.make("countdown-v0")
    sizes = {len(env.record(i)["numbers"]) for i in range(10)}
    assert sizes == {3, 4}


@pytest.mark.parametrize(
    "expression,numbers,target,solves",
    [
        ("(100 - 93) + 30", [30, 100, 93], 37, True),
        ("100 - 93 + 30 = 37", [30, 100, 93], 37, True),
        ("30 * 2", [30, 100, 93], 60, False),                  # wrong multiset
        ("(100 - 93) + 30 + 30", [30, 100, 93], 67, False),     # a number used twice
        ("100 / (93 - 93) + 30", [30, 100, 93, 93], 30, False),  # division by zero
        ("7 / 2 * 2", [7, 2, 2], 7, True),                       # exact fractions
        ("__import__('os').system('true')", [1], 1, False),
        ("2 ** 10", [2, 10], 1024, False),
        ("(" * 300 + "1" + ")" * 300, [1], 1, False),
        ("abs(-3)", [3], 3, False),
    ],
)
def test_countdown_checker(expression, numbers, target, solves):
    assert countdown_solves(expression, numbers, target) is solves


def test_countdown_test_split_reads_d1s_file(data_dir):
    env = dare_gym.make("countdown-v0", split="test")
    first = json.loads((data_dir / "d1" / "countdown_cd3_test.jsonl").read_text().splitlines()[0])
    assert env.num_records == 256
    assert env.record(0) == {"numbers": [int(x) for x in first["input"].split(",")], "target": int(first["output"])}
    prompt, info = env.reset(options={"index": 0})
    assert info["numbers"] == [30, 100, 93] and "23" in prompt
    assert env.step("<answer>100 - 93 + 30</answer>")[1] == 0.0
    env.reset(options={"index": 0})
    assert env.step("I think <answer>93 - (100 - 30)</answer>")[1] == 1.0


def test_countdown_rejects_malformed_lines(tmp_path):
    path = tmp_path / "cd.jsonl"
    path.write_text('{"input": "1,2,3", "output": "6"}\n{"input": "1,x", "output": "6"}\n')
    with pytest.raises(DataFormatError, match=r"cd\.jsonl:2: record 2: field 'input' must be comma-separated"):
        dare_gym.make("countdown-v0", split="test", data_files=str(path))


def test_evaluate_expression_value():
    value, used = evaluate_expression("(1 + 2) * 3 - 4 / 8")
    assert value == 8.5 and sorted(used) == [1, 2, 3, 4, 8]


# --------------------------------------------------------------------------------------------- sudoku


def test_generated_sudoku_puzzles_have_unique_solutions():
    for index in range(100):
        problem = make_puzzle(index, 6)
        assert count_solutions(problem["puzzle"]) == 1
        assert is_valid_solution(problem["solution"], problem["puzzle"])
        assert sum(c != "0" for c in problem["puzzle"]) >= 6


def test_sudoku_partial_credit_worked_example():
    sample = {"puzzle": "3102200002100320", "solution": "3142243142131324"}
    empty = [i for i, c in enumerate(sample["puzzle"]) if c == "0"]
    assert len(empty) == 8
    assert sudoku_reward("<answer>3142243142131324</answer>", sample) == 1.0
    wrong_two = list("3142243142131324")
    wrong_two[empty[0]], wrong_two[empty[1]] = "9", "9"
    assert sudoku_reward(f"<answer>{''.join(wrong_two)}</answer>", sample) == pytest.approx(6 / 8)
    assert answer_grid("<answer>31 42\n24</answer>") == "3142240000000000"
    assert sudoku_reward("no answer", sample) == 0.0


def test_sudoku_test_split_keeps_leading_zeros_and_accepts_any_valid_solution(data_dir):
    env = dare_gym.make("sudoku4-v0", split="test")
    assert env.num_records == 500
    puzzles = [env.record(i)["puzzle"] for i in range(500)]
    assert all(len(p) == 16 for p in puzzles) and any(p.startswith("0") for p in puzzles)
    for index, puzzle in enumerate(puzzles):
        env.reset(options={"index": index})
        _, reward, *_, info = env.step(f"<answer>{env.record(index)['solution']}</answer>")
        assert reward == 1.0 and info["correct"]
    # Some of d1's puzzles have several solutions: any valid one is correct (the d1 reward still compares
    # with the listed solution).
    multi = next(i for i, p in enumerate(puzzles) if count_solutions(p) > 1)
    listed = env.record(multi)["solution"]
    other = next(g for g in _all_solutions(puzzles[multi]) if g != listed)
    env.reset(options={"index": multi})
    _, reward, *_, info = env.step(f"<answer>{other}</answer>")
    assert info["correct"] and reward < 1.0


def _all_solutions(puzzle: str) -> list[str]:
    if "0" not in puzzle:
        return [puzzle]
    at = puzzle.index("0")
    out = []
    for digit in "1234":
        candidate = puzzle[:at] + digit + puzzle[at + 1 :]
        if count_solutions(candidate, 1):
            out += _all_solutions(candidate)
    return [g for g in out if is_valid_solution(g, puzzle)]


# --------------------------------------------------------------------------------------- preferences


def test_hh_rlhf_pairs_split_at_the_last_assistant_turn(data_dir):
    with pytest.warns(UserWarning, match="skipped 5 of 2312"):
        pairs = load_hh_rlhf("harmless-base", "test")
    assert len(pairs) == 2307 and len(pairs.skipped) == 5
    raw = json.loads(gzip.open(data_dir / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt").readline())
    first = pairs[0]
    assert first.prompt.endswith("\n\nAssistant:") and first.prompt + first.chosen == raw["chosen"]
    assert first.prompt + first.rejected == raw["rejected"]
    assert all(p.prompt.count("\n\nHuman:") >= 1 for p in pairs)


def test_preference_dataset_from_records_and_errors(tmp_path):
    data = PreferenceDataset.from_records([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert data[0].chosen == "a" and len(data) == 1
    with pytest.raises(DataFormatError, match=r"record 1 lacks field\(s\) \['rejected'\]"):
        PreferenceDataset.from_records([{"prompt": "q", "chosen": "a"}])
    assert split_transcript("\n\nHuman: hi\n\nAssistant: yo") == ("\n\nHuman: hi\n\nAssistant:", " yo")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}) + "\n")
    with pytest.raises(ValueError, match="record 1"):
        load_hh_rlhf(data_files=str(bad), on_mismatch="error")
