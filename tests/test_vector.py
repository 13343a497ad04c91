"""make_vec is a well-behaved gymnasium.vector.VectorEnv: SAME_STEP autoreset that keeps GRPO groups, infos
laid out as SyncVectorEnv lays them out, and Gymnasium's own vector wrappers on top."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from dare_gym.envs.base import TextTaskEnv
from dare_gym.envs.sorting import DigitSortEnv
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.wrappers.vector import DictInfoToList, RecordEpisodeStatistics

import dare_gym
from dare_gym.vector import GroupedTextVectorEnv


def sorted_digits(prompt: str) -> str:
    return "".join(sorted(prompt.split()[1]))


def structure(infos: dict) -> dict:
    """Keys and array dtypes of a vector info dict, nested dicts included."""
    return {key: structure(value) if isinstance(value, dict) else (value.dtype.kind, value.shape)
            for key, value in infos.items()}


def test_declares_same_step_autoreset_and_steps_again_without_reset():
    vec = dare_gym.make_vec("digitsort-v0", num_envs=6, group_size=3)
    assert isinstance(vec, VectorEnv) and vec.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    prompts, _ = vec.reset(seed=0)
    for _ in range(4):  # each step scores the completions and hands back the next prompts
        answers = [sorted_digits(p) for p in prompts]
        new_prompts, rewards, terminated, truncated, infos = vec.step(answers)
        assert rewards.tolist() == [1.0] * 6 and terminated.all() and not truncated.any()
        assert infos["final_info"]["correct"].all() and infos["_final_info"].all()
        assert infos["final_obs"].tolist() == [""] * 6  # the ended episodes' last observation
        for group in range(2):  # every group shares one new problem, and groups differ
            assert len(set(new_prompts[3 * group : 3 * group + 3])) == 1
        assert new_prompts[0] != new_prompts[3]
        assert infos["group_id"].tolist() == [0, 0, 0, 1, 1, 1]
        assert [f"sort {vec.envs[i].record(int(infos['index'][i]))['digits']}\n" for i in range(6)] == list(new_prompts)
        prompts = new_prompts


def test_autoreset_is_seeded_and_leaves_explicit_resets_unchanged():
    def run(steps_between: int):
        vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2)
        vec.reset(seed=7)
        autoreset = [vec.step(["0"] * 4)[0] for _ in range(steps_between)]
        return autoreset, vec.reset()[0]

    (first, after_two), (_, after_none) = run(2), run(0)
    assert after_two == after_none  # autoreset draws from a stream of its own
    assert run(2)[0] == first  # and that stream is seeded by reset(seed=...)


def test_infos_match_sync_vector_env_layout_and_values():
    """Same records, same completions: our infos equal SyncVectorEnv(SAME_STEP)'s, plus group_id."""
    completions = ["012345", "99", "x" * 3, "0"]
    sync = SyncVectorEnv([lambda: dare_gym.make("digitsort-v0") for _ in range(4)],
                         autoreset_mode=AutoresetMode.SAME_STEP)
    sync_reset = sync.reset(options={"index": 5})[1]
    _, sync_rewards, _, _, sync_infos = sync.step(tuple(completions))
    vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2)
    ours_reset = vec.reset(options={"indices": [5, 5]})[1]
    _, rewards, _, _, infos = vec.step(completions)

    assert {k: v for k, v in structure(ours_reset).items() if "group_id" not in k} == structure(sync_reset)
    ours = {k: v for k, v in structure(infos).items() if k not in ("index", "_index", "group_id", "_group_id")}
    theirs = {k: v for k, v in structure(sync_infos).items() if k not in ("index", "_index")}
    assert ours == theirs  # final_obs, final_info (with reward_components as a dict of arrays), split
    np.testing.assert_array_equal(rewards, sync_rewards)
    for key in ("index", "correct"):
        np.testing.assert_array_equal(infos["final_info"][key], sync_infos["final_info"][key])
    np.testing.assert_allclose(infos["final_info"]["reward_components"]["char_match"],
                               sync_infos["final_info"]["reward_components"]["char_match"])


def test_record_episode_statistics_counts_one_step_episodes():
    vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "missing autoreset_mode" warning either
        wrapped = RecordEpisodeStatistics(vec, buffer_length=100)
    prompts, _ = wrapped.reset(seed=1)
    totals = []
    for step in range(3):
        answers = [sorted_digits(p) if i % 2 == 0 else "0" for i, p in enumerate(prompts)]
        prompts, rewards, _, _, infos = wrapped.step(answers)
        episode = infos["episode"]
        np.testing.assert_allclose(episode["r"], rewards)  # each episode's return is its one reward
        assert episode["l"].tolist() == [1, 1, 1, 1] and infos["_episode"].all()
        totals += rewards.tolist()
    assert wrapped.episode_count == 12 and list(wrapped.length_queue) == [1] * 12
    np.testing.assert_allclose(sorted(wrapped.return_queue), sorted(totals))


def test_dict_info_to_list_gives_one_dict_per_sub_env():
    wrapped = DictInfoToList(dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2))
    _, reset_infos = wrapped.reset(seed=2)
    assert [info["group_id"] for info in reset_infos] == [0, 0, 1, 1]
    _, _, _, _, infos = wrapped.step(["0"] * 4)
    assert len(infos) == 4 and all(set(info["final_info"]) == {"index", "correct", "reward_components"}
                                   for info in infos)
    assert infos[0]["final_info"]["index"] == reset_infos[0]["index"]


def test_an_over_long_completion_is_truncated_with_the_reason():
    def length(completion, sample):  # the score says what the reward saw (it may run in a helper process)
        return float(len(completion))

    vec = dare_gym.make_vec("digitsort-v0", num_envs=2, group_size=2, reward=length)
    limit = vec.single_action_space.max_length
    vec.reset(seed=0)
    _, rewards, _, _, infos = vec.step(["1" * (limit + 10), "short"])
    final = infos["final_info"]
    assert rewards.tolist() == [limit, 5]  # the reward never saw the whole over-long completion
    assert final["_action_truncated"].tolist() == [True, False]
    reason = final["action_truncated"][0]
    assert f"{limit + 10} characters" in reason and f"max_length={limit}" in reason


def test_rejects_bad_arguments():
    vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2)
    with pytest.raises(ValueError, match="one index per group"):
        vec.reset(options={"indices": [1]})
    with pytest.raises(ValueError, match="unknown reset option"):
        vec.reset(options={"reset_mask": np.ones(4, bool)})
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="one completion per sub-env"):
        vec.step(["0"])


def test_vector_env_serves_demonstrations_and_scores_many_texts_of_a_record():
    vec = dare_gym.make_vec("digitsort-v0", num_envs=4, group_size=2)
    _, infos = vec.reset(seed=0)
    index = int(infos["index"][0])
    gold = vec.demonstrations([index])[0]
    assert vec.score_texts(index, [gold, "x"]) == [1.0, vec.envs[0].reward_fn("x", vec.envs[0].record(index)).total]

    class WithoutGold(DigitSortEnv):
        demonstration = TextTaskEnv.demonstration

    with pytest.raises(NotImplementedError, match="WithoutGold has no demonstrations"):
        GroupedTextVectorEnv([WithoutGold()]).demonstrations([0])
