"""Run by ``torchrun`` from tests/test_distributed.py (not a test module itself).

``update``: every rank takes its half of one deterministic batch of rollouts (the union batch, the same on every
process), runs one update of each algorithm and rank 0 writes the parameters; the test compares them with one
process's update on the union batch. Estimator noise is a function of each row (the same rows get the same masks
at any process count), so only the distributed update itself can make them differ.
``fail``: rank 1 reports a problem (or raises); every rank must stop with its message.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from dare_gym.core import distributed
from dare_gym.core.buffer import RolloutBuffer
from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer

ALGORITHMS = {  # the default recipe, BGPO, DPO, EBPO and d-TreeRPO, each at μ = 1: one update is one optimizer step
    "d1": {},
    "bgpo": {"name": "bgpo", "estimator_kwargs": {"mc_num": 2}},
    "dpo": {"name": "dpo"},
    "ebpo": {"name": "ebpo", "mc_num": 2},
    # trees of 2 levels, 2 × 2 leaves (= GROUP) and 6 segments each
    "dtreerpo": {"name": "dtreerpo", "num_iterations": 1, "tree_branch_factor": 2},
}
PROMPTS, GROUP = 4, 4
SORT_PROMPTS = [f"sort {1000 + 37 * g}\n" for g in range(PROMPTS)]


def config(algorithm: str, strategy: str, output: str) -> TrainConfig:
    recipe = ALGORITHMS[algorithm]
    fields = dict(prompts_per_step=PROMPTS, group_size=GROUP, max_steps=1, eval_size=0, progress=False,
                  time_limit_minutes=None, output_dir=output, strategy=strategy, learning_rate=1e-3,
                  rollout=GenerationConfig(gen_length=8, steps=8, block_length=8, temperature=1.0))
    if recipe:
        fields["algorithm"] = recipe
    return TrainConfig(**fields)


def union_batch(trainer: Trainer) -> RolloutBuffer:
    """The same rollouts on every process: a fixed seed, the same prompts, varied rewards within groups (through
    the algorithm's own rollout: d-TreeRPO's rows are the segments of its trees)."""
    policy = trainer.policy
    prompts = [prompt for prompt in SORT_PROMPTS for _ in range(GROUP)]
    rollout = trainer.algorithm.rollout(policy, prompts, group_size=GROUP, generator=torch.Generator().manual_seed(123),
                                        batch_size=len(prompts), settings=dict(gen_length=8, steps=8, block_length=8,
                                                                               temperature=1.0))
    rewards = [float(sum(c.completion_ids.tolist()) % 3) for c in rollout.completions]
    rewards[:GROUP] = [0.5] * GROUP  # one group without signal: discarded (one process) or kept inert (several)
    return rollout.buffer(rewards, [i // GROUP for i in range(len(prompts))])


def rank_share(batch: RolloutBuffer) -> RolloutBuffer:
    """This rank's rows of the union batch: the rows of its half of the prompts (whole groups, whole trees)."""
    mine = set(SORT_PROMPTS[distributed.rank() * PROMPTS // distributed.world_size():
                            (distributed.rank() + 1) * PROMPTS // distributed.world_size()])
    return batch.select(torch.tensor([i for i, prompt in enumerate(batch.prompts) if prompt in mine]))


def row_keyed_noise(sample_noise):
    """An estimator's noise drawn row by row from a generator seeded by the row's tokens."""
    def draw(batch, generator=None):
        parts = []
        for i in range(batch.input_ids.shape[0]):
            row = dataclasses.replace(batch, input_ids=batch.input_ids[i:i + 1], attention_mask=batch.attention_mask[i:i + 1],
                                      completion_mask=batch.completion_mask[i:i + 1],
                                      unmask_step=None if batch.unmask_step is None else batch.unmask_step[i:i + 1])
            key = int(sum((j + 1) * t for j, t in enumerate(batch.completion_ids[i].tolist()))) % (2**31)
            parts.append(sample_noise(row, torch.Generator().manual_seed(key)))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return draw


def row_keyed_block_masks(draw_masks):
    """EBPO's block masks drawn row by row from a generator seeded by what identifies the row at any process count:
    its block layout and its place in its group (ranks hold whole groups)."""
    def draw(blocks, rows, generator=None, u=None):
        parts = []
        for i in range(blocks.shape[0]):
            key = int(sum((j + 1) * (int(b) + 2) for j, b in enumerate(blocks[i].tolist()))) % (2**31)
            parts.append(draw_masks(blocks[i:i + 1], rows, torch.Generator().manual_seed(key + i % GROUP)))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return draw


def update(algorithm: str, strategy: str, output: str) -> dict[str, torch.Tensor]:
    import dare_gym.algorithms.ebpo as ebpo

    original_block_masks = ebpo.block_elbo_noise
    try:
        return _update(algorithm, strategy, output, ebpo)
    finally:
        ebpo.block_elbo_noise = original_block_masks  # this process may run other tests afterwards


def _update(algorithm: str, strategy: str, output: str, ebpo) -> dict[str, torch.Tensor]:
    trainer = Trainer(config(algorithm, strategy, output))
    if algorithm == "ebpo":  # EBPO draws its own block masks in prepare (it has no estimator object)
        ebpo.block_elbo_noise = row_keyed_block_masks(ebpo.block_elbo_noise)
    elif algorithm != "dtreerpo":  # d-TreeRPO's segment log-probs draw no noise
        estimator = trainer.algorithm.estimator
        estimator.sample_noise = row_keyed_noise(estimator.sample_noise)
    trainer.update(rank_share(union_batch(trainer)))
    state = distributed.full_state_dict(trainer.policy.model) if trainer.sharded else trainer.policy.model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def main() -> None:
    mode, output = sys.argv[1], Path(sys.argv[2])
    if mode == "update":
        for case in sys.argv[3:]:
            algorithm, strategy = case.split(":")
            state = update(algorithm, strategy, str(output / case.replace(":", "-")))
            if distributed.rank() == 0:
                torch.save(state, output / f"{algorithm}-{strategy}.pt")
    elif mode == "fail":
        distributed.setup("cpu")
        if sys.argv[3] == "raise" and distributed.rank() == 1:
            raise ValueError("rank 1 broke on purpose")
        distributed.raise_if_any("loss nan at step 3" if distributed.rank() == 1 else None)
    distributed.teardown()


if __name__ == "__main__":
    main()
