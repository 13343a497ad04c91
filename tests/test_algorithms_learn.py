"""Every algorithm learns: from the tiny model's SFT checkpoint, a short run on the embedded default task
raises held-out reward. Settings come from experiments/configs/compare_default.yaml (the same file
`dare-gym compare` uses), so the comparison in the README and these tests run one recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dare_gym.algorithms import list_algorithms
from dare_gym.tools.compare import plan_comparison
from dare_gym.core.config import dataclass_from_dict
from dare_gym.train.trainer import Trainer, TrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "compare_default.yaml"
STEPS = 10
COMPARE_POLICY = "tiny"  # compare_default.yaml's policy (full attention)
BLOCK_CAUSAL_ONLY = {"dipo": "test_dipo_learns_on_the_block_causal_builtin_policy"}
"""Algorithms that refuse the comparison's full-attention policy, each with the test below where it learns."""


def refuses_compare_policy(algorithm: str) -> bool:
    from dare_gym.algorithms import get_algorithm
    from dare_gym.core.loading import policy_config, policy_family

    family = policy_family(COMPARE_POLICY)
    return get_algorithm(algorithm).algorithm_class.model_refusal(family, policy_config(COMPARE_POLICY)) is not None


def test_every_algorithm_the_comparison_policy_refuses_has_its_own_learning_test():
    refused = {name for name in list_algorithms() if refuses_compare_policy(name)}
    assert refused == set(BLOCK_CAUSAL_ONLY)
    assert all(callable(globals()[test]) for test in BLOCK_CAUSAL_ONLY.values())


@pytest.mark.parametrize("algorithm", [name for name in list_algorithms() if not refuses_compare_policy(name)])
def test_algorithm_raises_heldout_reward(algorithm, tmp_path):
    plan = plan_comparison([algorithm], [0], STEPS * 128, config_path=CONFIG, overrides=["eval_size=200"])
    assert not plan.config_errors, plan.config_errors
    settings = plan.run_config(algorithm, seed=0, output_dir=tmp_path)
    settings.update(eval_every=STEPS)
    summary = Trainer(dataclass_from_dict(TrainConfig, settings)).train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    before = history[0]["heldout_reward"]
    after = [r for r in history if "heldout_reward" in r][-1]["heldout_reward"]
    assert after >= before + 0.015, f"{algorithm}: held-out reward {before:.3f} -> {after:.3f} in {STEPS} steps"


def test_dipo_learns_on_the_block_causal_builtin_policy(tmp_path):
    """tiny-block (blocks of 4, block-diffusion rollouts) on groupsort at DiPO's own defaults: two steps of 4
    prompts × 4 completions raise held-out greedy reward and exact accuracy (BENCHMARKS.md: seeds 0-2)."""
    from dare_gym.train.trainer import GenerationConfig

    config = TrainConfig(
        policy="tiny-block", env="groupsort-v0", algorithm={"name": "dipo"}, prompts_per_step=4, group_size=4,
        max_steps=2, time_limit_minutes=None, learning_rate=1e-4, eval_size=32, eval_every=2, save_every=1000,
        rollout=GenerationConfig(temperature=1.0), evaluation=GenerationConfig(temperature=0.0),
        output_dir=str(tmp_path), progress=False, seed=1,
    )
    summary = Trainer(config).train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    evaluations = [r for r in history if "heldout_reward" in r]
    before, after = evaluations[0], evaluations[-1]
    assert after["heldout_reward"] >= before["heldout_reward"] + 0.003, (before, after)
    assert after["heldout_accuracy"] >= before["heldout_accuracy"] + 2 / 32, (before, after)


@pytest.mark.parametrize("algorithm", ["dpo", "vrpo"])
def test_preference_algorithms_fit_hh_rlhf_pairs(algorithm, data_dir, tiny_policy):
    """The HH-RLHF loader feeds DPO/VRPO: a few updates on real pairs raise their implicit reward margin."""
    import copy

    import torch

    from dare_gym.algorithms import build_config, make_algorithm
    from dare_gym.core.buffer import RolloutBuffer
    from dare_gym.envs.preference import load_hh_rlhf

    with pytest.warns(UserWarning, match="skipped"):
        pairs = load_hh_rlhf("harmless-base", "test")[:8]
    policy = copy.copy(tiny_policy)
    policy.model = copy.deepcopy(tiny_policy.model)
    reference = copy.copy(tiny_policy)
    buffer = RolloutBuffer.from_pairs(policy, pairs, max_prompt_tokens=96, max_response_tokens=32)
    assert len(buffer) == 16 and buffer.completions[0] == pairs[0].chosen
    config = build_config(algorithm, {"beta": 1.0, "estimator_kwargs": {"mc_num": 2}})
    method = make_algorithm(algorithm, config, mask_token_id=policy.mask_token_id)
    buffer = method.advantages(buffer, 2)
    assert len(buffer) == 16 and buffer.columns["chosen"][::2].all()
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    margins = []
    for _ in range(8):
        method.prepare(policy, reference, buffer, generator, micro_batch_size=16)
        optimizer.zero_grad()
        _, metrics = method.backward(policy, buffer, 0, 1.0)
        optimizer.step()
        margins.append(metrics["reward_margin"])
    assert margins[-1] > margins[0] + 0.05, margins
