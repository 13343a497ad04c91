"""Envs: registration, Gymnasium conformance, record selection, info contents, vector groups, data errors."""

from __future__ import annotations

import json

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dare_gym
from dare_gym.envs.data import DataFormatError
from dare_gym.registry import gymnasium_id
from dare_gym.spaces import UnicodeText

PROCEDURAL = ["digitsort-v0", "groupsort-v0", "countdown-v0", "sudoku4-v0"]
FILE_BACKED = ["gsm8k-v0", "math500-v0", "math-v0"]
MATH_TRAIN_RECORD = {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra",
                     "solution": "$1+1=\\boxed{2}$."}


def local_kwargs(env_id: str, split: str, tmp_path) -> dict:
    """Arguments that build ``split`` of ``env_id`` from local files: MATH's train split is not in
    shared/data, so math-v0's comes from a one-record file in MATH's layout."""
    if env_id == "math-v0" and split == "train":
        path = tmp_path / "math_train.jsonl"
        path.write_text(json.dumps(MATH_TRAIN_RECORD) + "\n")
        return {"split": split, "data_files": str(path)}
    return {"split": split}


def test_every_env_is_registered_in_both_places():
    assert set(PROCEDURAL + FILE_BACKED) <= set(dare_gym.list_envs())
    for env_id in dare_gym.list_envs():
        assert gymnasium_id(env_id) in gymnasium.registry


@pytest.mark.parametrize("env_id", PROCEDURAL)
def test_check_env_procedural(env_id):
    check_env(dare_gym.make(env_id), skip_render_check=False)
    check_env(gymnasium.make(gymnasium_id(env_id)).unwrapped)


@pytest.mark.parametrize("env_id", FILE_BACKED)
def test_check_env_file_backed(env_id, data_dir, tmp_path):
    check_env(dare_gym.make(env_id, **local_kwargs(env_id, "train", tmp_path)))


def test_every_registered_env_passes_check_env_on_every_split(data_dir, tmp_path):
    for env_id in dare_gym.list_envs():
        if env_id.startswith("rg/"):
            continue  # the optional reasoning-gym family has a test of its own below
        env_class = type(dare_gym.make(env_id, split="test"))
        assert env_class.splits, f"{env_id} declares no splits for `dare-gym envs`"
        for split in env_class.splits:
            env = dare_gym.make(env_id, **local_kwargs(env_id, split.name, tmp_path))
            check_env(env)
            if split.size is not None and "data_files" not in local_kwargs(env_id, split.name, tmp_path):
                assert env.num_records == split.size, (env_id, split.name)


def test_every_env_trains_on_a_split_disjoint_from_its_held_out_split(data_dir, tmp_path):
    """The default split is a training split wherever the task has one, and shares no problem with the
    held-out split (procedural streams by construction or by holding the held-out problems out)."""
    from dare_gym.envs.splits import guard_held_out

    for env_id in dare_gym.list_envs():
        if env_id.startswith("rg/"):
            continue
        env_class = type(dare_gym.make(env_id, split="test"))
        default = env_class.default_split()
        if len(env_class.splits) > 1:
            assert default == "train", env_id
        if env_id == "humaneval-v0":
            continue  # one split only: training on it is refused (test_splits.py)
        train = dare_gym.make(env_id, **local_kwargs(env_id, default, tmp_path))
        held_out = dare_gym.make(env_id, split=env_class.eval_split)
        account = guard_held_out([train], held_out)
        assert "share no record" in account or "never drawn" in account, (env_id, account)


def test_unicode_text_space_accepts_real_prompts():
    space = UnicodeText(50)
    assert space.contains("Janet’s ducks lay 16 eggs — ¿cuántos? 🦆\n")
    assert not space.contains("x" * 51)
    assert not space.contains(b"bytes")
    assert not gymnasium.spaces.Text(50).contains("two words")  # why the subclass exists


def test_unknown_env_names_the_closest_match():
    with pytest.raises(gymnasium.error.NameNotFound, match="Did you mean 'gsm8k-v0'"):
        dare_gym.make("gsm8k-v1")


def test_gsm8k_reset_index_is_file_order_and_info_has_no_gold(data_dir):
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()
    env = dare_gym.make("gsm8k-v0", split="test")
    assert env.num_records == len(lines) == 1319
    for index in (0, 7, 1318):
        record = json.loads(lines[index])
        prompt, info = env.reset(options={"index": index})
        assert prompt.startswith(record["question"])
        gold = record["answer"].split("####")[-1].strip()
        assert all(gold not in str(value) for key, value in info.items() if key != "index")
        assert "answer" not in info and "gold" not in info
        _, reward, terminated, truncated, step_info = env.step(f"<answer>{gold}</answer>")
        assert (reward, terminated, truncated, step_info["correct"]) == (1.0, True, False, True)
        assert step_info["reward_components"] == {"math_verify": 1.0}
        assert "gold" not in step_info and "answer" not in step_info


def test_gsm8k_reads_data_files_and_names_malformed_lines(tmp_path):
    good = tmp_path / "mini.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n\n")
    env = dare_gym.make("gsm8k-v0", data_files=str(good))
    assert env.num_records == 1
    env.reset(options={"index": 0})
    assert env.step("The answer is 2.")[1] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        dare_gym.make("gsm8k-v0", data_files=str(bad))
    missing_field = tmp_path / "field.jsonl"
    missing_field.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataFormatError, match=r"record 1 lacks field\(s\) \['answer'\]"):
        dare_gym.make("gsm8k-v0", data_files=str(missing_field))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        dare_gym.make("gsm8k-v0", data_files=str(tmp_path / "nowhere.jsonl"))


def test_gsm8k_reads_the_data_dir_variable_and_trains_on_train(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "2*3?", "answer": "#### 6"}) + "\n")
    (tmp_path / "gsm8k" / "train.jsonl").write_text(
        "".join(json.dumps({"question": f"{n}+1?", "answer": f"#### {n + 1}"}) + "\n" for n in range(3)))
    monkeypatch.setenv("DARE_GYM_DATA_DIR", str(tmp_path))
    env = dare_gym.make("gsm8k-v0")
    assert env.split == "train" and env.num_records == 3 and env.source.endswith("train.jsonl")
    test = dare_gym.make("gsm8k-v0", split="test")
    assert test.num_records == 1 and test.source.endswith("test.jsonl")


def test_digitsort_records_are_deterministic_and_test_is_held_out():
    train, test = dare_gym.make("digitsort-v0"), dare_gym.make("digitsort-v0", split="test")
    assert train.record(5) == dare_gym.make("digitsort-v0").record(5)
    test_digits = {test.record(i)["digits"] for i in range(test.num_records)}
    train_digits = {train.record(i)["digits"] for i in range(5000)}
    assert len(test_digits) > 450 and not test_digits & train_digits
    with pytest.raises(IndexError, match=r"\[0, 500\)"):
        test.reset(options={"index": 500})


def test_groupsort_answers_are_long_each_group_sorted_and_test_is_held_out():
    train, test = dare_gym.make("groupsort-v0"), dare_gym.make("groupsort-v0", split="test")
    record = train.record(3)
    assert record == dare_gym.make("groupsort-v0").record(3)
    groups, gold = record["groups"].split(), record["gold"].split()
    assert len(groups) == 17 and gold == ["".join(sorted(g)) for g in groups]
    assert len(record["gold"]) == train.answer_chars == 67  # >= 64 tokens of the character tokenizer
    test_groups = {test.record(i)["groups"] for i in range(test.num_records)}
    assert len(test_groups) == 500 and not test_groups & {train.record(i)["groups"] for i in range(3000)}
    prompt, _ = test.reset(options={"index": 0})
    _, reward, *_, info = test.step(test.record(0)["gold"])
    assert prompt.startswith("sort ") and reward == 1.0 and info["correct"]
    short = dare_gym.make("groupsort-v0", num_groups=2, group_size=4)
    assert len(short.record(0)["gold"]) == short.answer_chars == 9
    with pytest.raises(ValueError, match="group_size must be an integer in \\[2, 8\\], got 9"):
        dare_gym.make("groupsort-v0", group_size=9)


def test_step_reports_correct_and_components_and_rejects_misuse():
    env = dare_gym.make("digitsort-v0", split="test")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("123")
    prompt, _ = env.reset(options={"index": 0})
    gold = "".join(sorted(prompt.split()[1]))
    _, reward, *_, info = env.step(gold)
    assert reward == 1.0 and info["correct"] and info["reward_components"] == {"char_match": 1.0}
    env.reset(options={"index": 0})
    _, reward, *_, info = env.step(gold[:-1] + "x")
    assert reward == pytest.approx(5 / 6) and not info["correct"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(gold)  # the episode ended
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"idx": 1})


def test_custom_and_weighted_rewards_plug_in_through_make():
    def length_bonus(completion, sample):
        return len(completion) / 10

    env = dare_gym.make("digitsort-v0", reward=[("exact_match", 1.0), (length_bonus, 0.5)])
    prompt, _ = env.reset(options={"index": 1})
    gold = "".join(sorted(prompt.split()[1]))
    _, reward, *_, info = env.step(gold)
    assert info["reward_components"] == {"exact_match": 1.0, "length_bonus": 0.6}
    assert reward == pytest.approx(1.0 + 0.5 * 0.6)


def test_a_raising_reward_scores_zero_with_the_reason():
    def broken(completion, sample):
        raise RuntimeError("checker exploded")

    env = dare_gym.make("digitsort-v0", reward=[("char_match", 1.0), (broken, 1.0)])
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step("012345")
    assert terminated and info["reward_components"]["broken"] == 0.0
    assert "checker exploded" in info["reward_errors"]["broken"]
    assert reward == pytest.approx(info["reward_components"]["char_match"])


def test_make_vec_groups_share_a_problem():
    vec = dare_gym.make_vec("digitsort-v0", num_envs=12, group_size=4)
    prompts, infos = vec.reset(seed=3)
    assert len(prompts) == 12 and vec.num_groups == 3
    for group in range(3):
        assert len(set(prompts[4 * group : 4 * group + 4])) == 1
    assert len(set(prompts)) == 3
    assert infos["group_id"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    again, _ = dare_gym.make_vec("digitsort-v0", num_envs=12, group_size=4).reset(seed=3)
    assert again == prompts
    _, rewards, terminated, truncated, step_infos = vec.step(["0"] * 12)
    assert rewards.shape == (12,) and terminated.all() and not truncated.any()
    assert step_infos["final_info"]["correct"].dtype == np.bool_
    with pytest.raises(ValueError, match="multiple of group_size=5"):
        dare_gym.make_vec("digitsort-v0", num_envs=12, group_size=5)
    with pytest.raises(ValueError, match="one completion per sub-env"):
        vec.step(["0"])


def test_reasoning_gym_tasks_are_envs_scored_by_score_answer():
    env = dare_gym.make("rg/basic_arithmetic-v0", split="test")
    assert "rg/basic_arithmetic-v0" in dare_gym.list_envs() and env.num_records == 500
    check_env(env)
    prompt, info = env.reset(options={"index": 3})
    record = env.record(3)
    assert record["question"] in prompt and record["answer"] not in str(info)
    _, reward, *_, step_info = env.step(f"so <answer>{record['answer']}</answer>")
    assert reward == 1.0 and step_info["correct"]
    env.reset(options={"index": 3})
    assert env.step("<answer>not a number</answer>")[1] == 0.0
    assert gymnasium.make("dare_gym/rg.basic_arithmetic-v0", split="test").unwrapped.num_records == 500
    train = dare_gym.make("rg/chain_sum-v0")
    assert train.record(0) != dare_gym.make("rg/chain_sum-v0", split="test").record(0)
    from dare_gym.envs.reasoning_gym import task_ids

    assert len(task_ids()) > 90
    for env_id in task_ids()[:: max(1, len(task_ids()) // 12)]:  # a spread of tasks
        check_env(dare_gym.make(env_id, split="test"))


def test_code_envs_score_canonical_solutions_and_reject_hostile_ones(data_dir):
    env = dare_gym.make("humaneval-v0")
    assert env.num_records == 164
    check_env(env)
    prompt, info = env.reset(options={"index": 0})
    record = env.record(0)
    assert record["prompt"] in prompt and "canonical_solution" not in info
    _, reward, *_, step_info = env.step(record["canonical_solution"])
    assert reward == 1.0 and step_info["correct"]
    env.reset(options={"index": 0})
    assert env.step("    import os\n    os._exit(0)\n")[1] == 0.0
    mbpp = dare_gym.make("mbpp-v0", split="test")
    assert mbpp.num_records == 500 and mbpp.record(0)["task_id"] == 11
    train = dare_gym.make("mbpp-v0")
    assert train.split == "train" and train.num_records == 464 and train.record(0)["task_id"] == 511
    check_env(mbpp)
    mbpp.reset(options={"index": 0})
    assert mbpp.step(mbpp.demonstration(mbpp.record(0)))[1] == 1.0
    assert dare_gym.make("mbpp-v0", split="prompt").num_records == 10


def test_code_rewards_score_a_vector_batch_in_parallel(data_dir):
    vec = dare_gym.make_vec("humaneval-v0", num_envs=4, group_size=2)
    vec.reset(options={"indices": [0, 1]})
    env = dare_gym.make("humaneval-v0")
    good = [env.record(0)["canonical_solution"], "    return None\n", env.record(1)["canonical_solution"], "    pass\n"]
    _, rewards, *_, infos = vec.step(good)
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert infos["final_info"]["correct"].tolist() == [True, False, True, False]


def test_an_over_long_completion_is_truncated_to_the_action_space_with_the_reason():
    def seen(completion, sample):  # the score says what the reward saw (it may run in a helper process)
        return float(len(completion)) if completion.startswith(gold) else -1.0

    env = dare_gym.make("digitsort-v0", reward=[("char_match", 1.0), (seen, 1.0)])
    limit = env.action_space.max_length
    prompt, _ = env.reset(options={"index": 0})
    gold = "".join(sorted(prompt.split()[1]))
    _, _, terminated, _, info = env.step(gold + "x" * (2 * limit))
    assert info["reward_components"]["seen"] == limit  # scored, but only up to the limit
    assert terminated and info["correct"] is False
    assert info["action_truncated"] == (f"the completion has {2 * limit + len(gold)} characters, more than the "
                                        f"action space's max_length={limit}: only its first {limit} were scored")
    env.reset(options={"index": 0})
    assert "action_truncated" not in env.step(gold)[4]
