"""Advantages from rewards: small pure functions over tensors.

Rows are laid out group by group: rewards ``[G*n]`` hold ``n`` groups of ``G`` consecutive completions of the
same prompt (the layout ``make_vec(..., group_size=G)`` produces).
"""

from __future__ import annotations

import torch

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
    rewards: torch.Tensor, group_size: int, *, scale_rewards: str = "group", baseline: str = "mean"
) -> torch.Tensor:
    """GRPO advantages.

    baseline: ``mean`` subtracts the group mean; ``rloo`` the mean of the *other* members (leave one out).
    scale_rewards: divide by the unbiased std (+1e-4) of the ``group``, of the whole ``batch``, or ``none``.
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
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        centred = centred / (rewards.double().std() + STD_EPS)
    return centred.flatten().to(rewards.dtype)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: groups whose members all scored the same (they carry no GRPO signal)."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)
