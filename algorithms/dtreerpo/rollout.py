"""d-TreeRPO's tree rollout (``reference/ALGORITHMS.md`` section Q): a tree of partial denoising states per prompt.

Instead of G independent completions, each prompt grows a tree. The T denoising steps of LLaDA's semi-AR
low-confidence sampler are cut at the branch points T − ⌊kT/s⌋ (k = 0..s) into s levels; the root (the fully
masked completion) has ``root_children`` children, every later node ``branch`` children, and each child is an
independent continuation of its parent's state for one level's steps. Leaves are complete responses (the
env scores them, one per sub-env of the prompt's group); every parent → child edge is a training *segment*.

    tree = grow_trees(policy, prompt_ids, prompt_mask, fan_out=[4, 4], steps=128, block_length=32, ...)
    tree.leaves()                                # [prompts · 16] complete responses, prompt-major
    segment_buffer(tree, prompts, rewards, policy)   # one buffer row per non-root node

Nodes are stored level-major (roots, then level 1, ...) and prompt-major inside a level, so a node's id is its
row in :class:`TreeNodes` and children always come after their parent. Denoising uses the policy's family
forward (:func:`dare_gym.samplers.llada.continue_denoising`) and draws from the trainer's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dare_gym.core.buffer import RolloutBuffer
from dare_gym.core.policy import eval_mode
from dare_gym.samplers.llada import continue_denoising

NOT_YET = -1  # unmask_step of a position its node has not committed


def branch_points(steps: int, levels: int) -> list[int]:
    """The tree's branch points in remaining denoising steps, root first: T − ⌊kT/s⌋ for k = 0..s.

    ``branch_points(128, 2) == [128, 64, 0]``: two levels of 64 steps. Level k runs the global steps
    ``T − points[k] .. T − points[k + 1] − 1``."""
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= steps:
        raise ValueError(f"tree_contraction_factor (the number of levels) must be an integer in 1..steps={steps}, "
                         f"got {levels!r}")
    return [steps - (k * steps) // levels for k in range(levels + 1)]


@dataclass
class TreeNodes:
    """Every node of a batch of trees, level-major; ``node i`` is row i of each tensor."""

    completion_ids: torch.Tensor  # [N, L] the node's state: committed tokens, the mask token elsewhere
    unmask_step: torch.Tensor  # [N, L] the global step that committed each token (NOT_YET where masked)
    commit_logp: torch.Tensor  # [N, L] each committed token's log-prob in the forward that committed it
    parent: torch.Tensor  # [N] the parent's node id (-1 for roots)
    tree: torch.Tensor  # [N] which prompt's tree
    depth: torch.Tensor  # [N] 0 for roots, s for leaves
    step: torch.Tensor  # [N] the node's branch point: denoising steps still to run below it (0 for leaves)
    prompt_ids: torch.Tensor  # [P, W] the trees' prompts, left-padded
    prompt_mask: torch.Tensor  # [P, W]
    steps: int  # T

    @property
    def leaf(self) -> torch.Tensor:
        return self.step == 0

    def leaves(self) -> torch.Tensor:
        """Node ids of the leaves, prompt-major (a prompt's leaves are consecutive)."""
        return self.leaf.nonzero().squeeze(1)


@torch.no_grad()
def grow_trees(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, fan_out: Sequence[int], steps: int,
               gen_length: int, block_length: int, temperature: float, remasking: str = "low_confidence",
               generator: torch.Generator | None = None, batch_size: int = 256) -> TreeNodes:
    """One tree per prompt row: level k gives every node of level k ``fan_out[k]`` children, each denoised
    independently from its parent's state through level k's steps (``len(fan_out)`` levels). Rows are decoded
    ``batch_size`` at a time, in eval mode."""
    points = branch_points(steps, len(fan_out))
    for k, count in enumerate(fan_out):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"fan-out of level {k} must be a positive integer, got {count!r}")
    prompts, width = prompt_ids.shape
    device, mask_id = prompt_ids.device, policy.mask_token_id
    state = torch.full((prompts, gen_length), mask_id, dtype=torch.long, device=device)
    levels = [dict(completion_ids=state, unmask_step=torch.full_like(state, NOT_YET),
                   commit_logp=torch.zeros(state.shape, dtype=torch.float32, device=device),
                   parent=torch.full((prompts,), -1, dtype=torch.long, device=device),
                   tree=torch.arange(prompts, device=device))]
    first_id = 0
    with eval_mode(policy.model):
        for k, count in enumerate(fan_out):
            parents = levels[-1]
            rows = len(parents["tree"])
            child = {name: value.repeat_interleave(count, dim=0) for name, value in parents.items()}
            child["parent"] = torch.arange(first_id, first_id + rows, device=device).repeat_interleave(count)
            for start in range(0, len(child["tree"]), batch_size):
                part = slice(start, start + batch_size)
                trees = child["tree"][part]
                x = torch.cat([prompt_ids[trees], child["completion_ids"][part]], dim=1)
                attention = torch.cat([prompt_mask[trees], torch.ones_like(child["completion_ids"][part])], dim=1)
                continue_denoising(policy, x, attention, width, child["unmask_step"][part], child["commit_logp"][part],
                                   first_step=steps - points[k], last_step=steps - points[k + 1], steps=steps,
                                   block_length=block_length, temperature=temperature, remasking=remasking,
                                   generator=generator)
                child["completion_ids"][part] = x[:, width:]
            first_id += rows
            levels.append(child)
    depth = torch.cat([torch.full_like(level["tree"], d) for d, level in enumerate(levels)])
    return TreeNodes(
        **{name: torch.cat([level[name] for level in levels]) for name in levels[0]},
        depth=depth, step=torch.tensor(points, device=device)[depth], prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        steps=steps,
    )


def segment_buffer(tree: TreeNodes, prompts: Sequence[str], rewards: Sequence[float], policy,
                   response_mask: str = "through_eos") -> RolloutBuffer:
    """One buffer row per segment (parent → child edge, i.e. per non-root node), level-major.

    ``completion_ids`` is the child's state x_c and the column ``parent_ids`` its parent's x_p; the segment's
    tokens are those masked in x_p and committed in x_c. ``unmask_step`` holds each committed token's global
    step and T where x_c is still masked (those positions are real inputs the forward attends to).
    ``completion_mask`` marks the positions ``response_mask`` keeps (the official code: up to and including the
    child's first EOS; :meth:`DiffusionPolicy.response_mask`). ``reward`` is the
    env's reward on leaves (``rewards``, one per leaf in :meth:`TreeNodes.leaves` order) and NaN on inner
    nodes; ``group_id`` is the parent's node id (siblings share it). Columns ``node``, ``parent``, ``depth`` and
    ``tree`` give the trees' shape for the values and the schedule of :mod:`dare_gym.algorithms.dtreerpo`."""
    leaves = tree.leaves().cpu()
    if len(rewards) != len(leaves):
        raise ValueError(f"need one reward per leaf ({len(leaves)}), got {len(rewards)}")
    node_reward = torch.full((len(tree.tree),), float("nan"))
    node_reward[leaves] = torch.as_tensor(list(rewards), dtype=torch.float32)
    rows = (tree.parent >= 0).nonzero().squeeze(1).cpu()
    cpu = {name: getattr(tree, name).cpu() for name in ("completion_ids", "unmask_step", "parent", "tree", "depth")}
    child = cpu["completion_ids"][rows]
    trees = cpu["tree"][rows]
    # each segment's prompt exactly as the sampler laid it out (left-padded), the layout the buffer keeps
    prompt_ids, prompt_mask = tree.prompt_ids.cpu()[trees], tree.prompt_mask.cpu()[trees]
    unmask_step = cpu["unmask_step"][rows]
    return RolloutBuffer(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=child,
        completion_mask=policy.response_mask(child, response_mask),
        unmask_step=unmask_step.masked_fill(unmask_step == NOT_YET, tree.steps),
        reward=node_reward[rows], group_id=cpu["parent"][rows],
        prompts=[prompts[t] for t in trees.tolist()], completions=[policy.decode(ids) for ids in child],
        columns={"parent_ids": cpu["completion_ids"][cpu["parent"][rows]], "node": rows, "parent": cpu["parent"][rows],
                 "depth": cpu["depth"][rows], "tree": trees},
        pad_token_id=policy.tokenizer.pad_token_id,
    )


__all__ = ["NOT_YET", "TreeNodes", "branch_points", "grow_trees", "segment_buffer"]
