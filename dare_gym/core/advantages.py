"""Group advantages from rewards, which every GRPO-style algorithm shares: small pure functions over tensors
(MDPO's step advantages and PPO's GAE live in their algorithms' files).

Rows are laid out group by group: rewards ``[G*n]`` hold ``n`` groups of ``G`` consecutive completions of the
same prompt (the layout ``make_vec(..., group_size=G)`` produces).
"""

from __future__ import annotations

import torch

from dare_gym.core.distributed import global_sum

STD_EPS = 1e-4
SCALE_CHOICES = ("group", "batch", "none")
BASELINE_CHOICES = ("mean", "rloo")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be a flat tensor whose length is a multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_rewards: str = "group", baseline: str = "mean",
    population_std: bool = False, std_eps: float = STD_EPS,
) -> torch.Tensor:
    """GRPO advantages.

    baseline: ``mean`` subtracts the group mean; ``rloo`` the mean of the *other* members (leave one out).
    scale_rewards: divide by the std (+1e-4) of the ``group``, of the whole ``batch``, or ``none``; the std is
    the unbiased one unless ``population_std`` (TraceRL's z-score). ``std_eps`` is the constant added to the
    std (1e-4 as TRL; verl's GRPO adds 1e-6).
    """
    if scale_rewards not in SCALE_CHOICES:
        raise ValueError(f"scale_rewards must be one of {SCALE_CHOICES}, got {scale_rewards!r}")
    if baseline not in BASELINE_CHOICES:
        raise ValueError(f"baseline must be one of {BASELINE_CHOICES}, got {baseline!r}")
    grouped = _grouped(rewards.double(), group_size)
    if baseline == "mean":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
    else:
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs group_size >= 2")
        others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        centred = grouped - others
    unbiased = not population_std
    if scale_rewards == "group":
        centred = _scaled(centred, grouped.std(dim=1, unbiased=unbiased, keepdim=True) + std_eps)
    elif scale_rewards == "batch":  # the global batch's std: its sums over the ranks of a distributed run
        values = rewards.double()
        count, total, squares = (global_sum(v) for v in (values.new_tensor(values.numel()), values.sum(),
                                                        values.pow(2).sum()))
        variance = (squares - total**2 / count) / (count - 1 if unbiased else count).clamp(min=1)
        centred = _scaled(centred, variance.clamp(min=0).sqrt() + std_eps)
    return centred.flatten().to(rewards.dtype)


def _scaled(centred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """centred / scale, and 0 where the scale is 0 (a uniform group with ``std_eps=0``: TraceRL's z-score
    returns zeros there)."""
    return torch.where(scale > 0, centred / scale.clamp(min=torch.finfo(scale.dtype).tiny), torch.zeros_like(centred))


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: groups whose members all scored the same (they carry no GRPO signal)."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)
