"""No training on the held-out set: the trainer's guard refuses overlapping file splits (or warns when
allowed), and procedural training streams never draw a held-out problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dare_gym
from dare_gym.tools.cli import main
from dare_gym.core.config import ConfigError
from dare_gym.envs.countdown import make_problem
from dare_gym.envs.splits import SplitOverlapError, SplitOverlapWarning, guard_held_out
from dare_gym.train.trainer import TrainConfig, Trainer


def gsm8k_file(path, questions) -> str:
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {n}"}) + "\n" for n, q in enumerate(questions)))
    return str(path)


def test_training_on_the_evaluation_split_is_refused_or_warned(data_dir):
    train, held_out = dare_gym.make("gsm8k-v0", split="test"), dare_gym.make("gsm8k-v0", split="test")
    with pytest.raises(SplitOverlapError, match=r"the training split is the evaluation split, gsm8k-v0 split 'test' "
                                                r".*Either train on split 'train'.*allow_eval_overlap: true"):
        guard_held_out([train], held_out, eval_size=500)
    with pytest.warns(SplitOverlapWarning, match="allow_eval_overlap is set, so training goes ahead although the "
                                                 "training split is the evaluation split"):
        guard_held_out([train], held_out, eval_size=500, allow_overlap=True)


def test_humaneval_has_no_training_split(data_dir):
    env = dare_gym.make("humaneval-v0")
    assert env.split == "test"
    with pytest.raises(SplitOverlapError, match="humaneval-v0 has no other split, so train on another env"):
        guard_held_out([env], dare_gym.make("humaneval-v0", split="test"))


def test_records_in_common_between_different_files_are_found_by_fingerprint(tmp_path):
    held_out = dare_gym.make("gsm8k-v0", split="test", data_files=gsm8k_file(
        tmp_path / "test.jsonl", ["What is 1+1?", "What is 2+2?", "What is 3+3?", "What is 4+4?"]))
    # Two of the same problems, written with other whitespace and golds, among new ones.
    train = dare_gym.make("gsm8k-v0", data_files=gsm8k_file(
        tmp_path / "train.jsonl", ["What is 5+5?", "What  is\n4+4?", "What is 6+6?", "What is 3+3? "]))
    with pytest.raises(SplitOverlapError, match=r"2 of the 4 evaluation records of gsm8k-v0 split 'test' .* are also "
                                                r"in the training split gsm8k-v0 split 'train' .*evaluation record 2: "
                                                r"'What is 3\+3\?'"):
        guard_held_out([train], held_out)
    # Only what evaluation scores counts: the first eval_size records.
    assert "share no record" in guard_held_out([train], held_out, eval_size=2)
    assert guard_held_out([train], held_out, eval_size=0) == "no evaluation: nothing to hold out"


def test_a_procedural_stream_never_draws_a_held_out_problem(tmp_path):
    """Countdown's training stream can generate d1-style problems; held out, they are redrawn."""
    train = dare_gym.make("countdown-v0")
    drawn = train.draw_indices(np.random.default_rng(0), size=40)
    problems = [make_problem(i, 3 if i % 2 == 0 else 4) for i in drawn[:20]]
    path = tmp_path / "cd.jsonl"
    path.write_text("".join(json.dumps({"input": ",".join(map(str, p["numbers"][::-1])), "output": str(p["target"])})
                            + "\n" for p in problems))
    held_out = dare_gym.make("countdown-v0", split="test", data_files=str(path))
    assert "the 20 evaluation records" in guard_held_out([train], held_out)
    redrawn = train.draw_indices(np.random.default_rng(0), size=40)
    held = set(held_out.fingerprints())
    assert not {train.fingerprint(train.record(i)) for i in redrawn} & held
    assert redrawn[20:] == drawn[20:]  # draws that are not held out stay as they were
    assert all(new != old for new, old in zip(redrawn[:20], drawn[:20]))  # held-out ones are redrawn
    assert all(train.fingerprint(train.record(i)) not in held
               for i in (train.reset(seed=s)[1]["index"] for s in range(50)))
    train.reset(options={"index": drawn[0]})  # an explicit index still selects that record


def test_the_trainer_refuses_the_test_split_and_the_cli_says_why(data_dir, tiny_policy, capsys):
    config = TrainConfig(env="gsm8k-v0", env_kwargs={"split": "test"}, prompts_per_step=1, group_size=2,
                         eval_size=10, progress=False)
    with pytest.raises(ConfigError, match="the training split is the evaluation split, gsm8k-v0 split 'test'"):
        Trainer(config, policy=tiny_policy)
    with pytest.warns(SplitOverlapWarning):
        Trainer(TrainConfig(**{**vars(config), "allow_eval_overlap": True}), policy=tiny_policy)
    assert main(["train", "env=gsm8k-v0", "env_kwargs={split: test}", "prompts_per_step=1", "group_size=2"]) == 2
    assert "allow_eval_overlap: true" in capsys.readouterr().err


def test_default_train_runs_hold_out_the_eval_split(tiny_policy):
    trainer = Trainer(TrainConfig(prompts_per_step=2, group_size=2, eval_size=50, progress=False), policy=tiny_policy)
    held = set(trainer.eval_env.fingerprints(limit=50))
    assert all(env._held_out == held for env in trainer.train_env.envs)
