"""The interop examples under experiments/, run briefly: dare_gym rewards inside TRL's GRPOTrainer, and dare_gym
envs stepped by tianshou's vector envs."""

from __future__ import annotations

import importlib.util
from pathlib import Path


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_dare_gym_reward_reads_the_record_from_trl_columns():
    example = load_example("trl_rewards_example")
    exact = example.as_trl_reward("exact_match")
    # TRL's call: prompts, completions, the dataset's columns by name, plus its own extras
    scores = exact(["sort 321\n", "sort 321\n", "sort 90\n"], ["123", "132", "09"],
                   digits=["321", "321", "90"], gold=["123", "123", "09"], trainer_state=object(),
                   completion_ids=[[1], [2], [3]])
    assert scores == [1.0, 0.0, 1.0] and exact.__name__ == "exact_match"
    weighted = example.as_trl_reward([("exact_match", 1.0), ("char_match", 0.5)], name="mix")
    conversational = [[{"role": "assistant", "content": "123"}]]
    assert weighted([[{"role": "user", "content": "sort 321\n"}]], conversational, gold=["123"]) == [1.5]
    assert weighted.__name__ == "mix"


def test_grpo_trainer_runs_a_step_with_dare_gym_rewards(tmp_path):
    example = load_example("trl_rewards_example")
    summary = example.main(["--steps", "1", "--output", str(tmp_path)])
    assert summary["steps"] == 1
    logged = summary["log"][0]
    assert {"rewards/exact_match/mean", "rewards/char_match/mean"} <= set(logged)
    assert 0.0 <= logged["rewards/char_match/mean"] <= 1.0
    assert (tmp_path / "trl_log.json").is_file()


def test_tianshou_subprocess_workers_score_code_in_parallel(data_dir, tmp_path):
    example = load_example("tianshou_example")
    result = example.main(["--env", "humaneval-v0", "--workers", "4", "--output", str(tmp_path / "out.json")])
    # reference solutions pass, empty bodies fail, and the workers agree with the env stepped in-process
    assert result["rewards"] == [1.0, 0.0, 1.0, 0.0] == result["sequential_rewards"]
    assert result["correct"] == [True, False, True, False] and all(result["terminated"])


def test_tianshou_dummy_vector_env_steps_a_procedural_env():
    import numpy as np

    example = load_example("tianshou_example")
    venv = example.make_vector_env("digitsort-v0", 3, subprocess=False, split="test")
    try:
        prompts, infos = example.reset_to_records(venv, [0, 1, 2])
        assert [i["index"] for i in infos] == [0, 1, 2] and all(p.startswith("sort ") for p in prompts)
        answers = ["".join(sorted(p.split()[1])) for p in prompts]
        _, rewards, terminated, _, step_infos = venv.step(np.array([answers[0], "x", answers[2]], dtype=object))
    finally:
        venv.close()
    assert list(rewards) == [1.0, 0.0, 1.0] and all(terminated)
    assert [i["correct"] for i in step_infos] == [True, False, True]
