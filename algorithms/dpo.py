"""DPO for diffusion LMs (Rafailov et al., 2023; LLaDA 1.5's form): preferences scored with ELBO estimates.

    loss = −log σ( β [ (𝓑_θ(y_w) − 𝓑_ref(y_w)) − (𝓑_θ(y_l) − 𝓑_ref(y_l)) ] )

Pairs come from the policy's own rollouts ranked by the verifiable reward: in every group whose rewards
differ, the best completion is chosen and the worst rejected. (Offline pairs, e.g. HH-RLHF, go through
:meth:`RolloutBuffer.from_pairs`.) 𝓑 is the stratified ELBO (``elbo`` estimator), scored for the policy and
the frozen reference on the same masks; like DARE, each ELBO is divided by the response length, which sets
β's scale. Each response is scored up to and including its first EOS (DARE appends one EOS and hides the
padding). Followed: DARE (``_forward_process_vrpo``; LLaDA 1.5's own code is not public). Defaults (DARE):
β = 0.2, lr 5e-7, one ELBO sample (VRPO, in ``vrpo.py``, uses 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import Likelihood, ResponseMask, is_number

from dare_gym.core.distributed import global_mean


@dataclass
class DPOConfig(ResponseMask, Likelihood, AlgorithmConfig):
    beta: float = 0.2
    """DPO's inverse temperature (not a KL weight: the reference is always used)"""
    estimator: str = "elbo"
    estimator_kwargs: dict = field(default_factory=lambda: {"mc_num": 1})
    length_normalize: bool = True
    """divide each ELBO by the response length (sets beta's scale)"""

    def check(self):
        if not (is_number(self.beta) and self.beta > 0):
            raise ValueError(f"DPO's beta must be a number > 0, got {self.beta!r}")


def best_and_worst_pairs(reward: torch.Tensor, group_id: torch.Tensor) -> tuple[list[int], list[int], list[bool]]:
    """Row indices of (chosen, rejected), each group's highest- and lowest-reward rows, and whether they differ
    (a group whose rewards are all equal gives no preference)."""
    chosen, rejected, informative = [], [], []
    for group in torch.unique(group_id):
        rows = (group_id == group).nonzero().flatten()
        rewards = reward[rows]
        chosen.append(int(rows[rewards.argmax()]))
        rejected.append(int(rows[rewards.argmin()]))
        informative.append(bool(rewards.max() > rewards.min()))
    return chosen, rejected, informative


def dpo_pair_losses(policy_chosen: torch.Tensor, reference_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """[pairs] −log σ(β[(𝓑θ(y_w) − 𝓑ref(y_w)) − (𝓑θ(y_l) − 𝓑ref(y_l))]), DPO with (ELBO) log-likelihoods."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def dpo_loss(policy_chosen: torch.Tensor, reference_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss, the mean of :func:`dpo_pair_losses` over the pairs."""
    return dpo_pair_losses(policy_chosen, reference_chosen, policy_rejected, reference_rejected, beta).mean()



@register_algorithm("dpo", DPOConfig)
class DPO(PolicyGradient):
    minibatch_unit = "pair_id"  # a chosen row and its rejected row always share a minibatch
    scores_response_only = True  # DARE scores each response through its EOS with the padding hidden

    @property
    def needs_reference(self) -> bool:
        return True

    def advantages(self, buffer, group_size):
        """Turn the groups into (chosen, rejected) pairs; rows alternate chosen, rejected."""
        chosen, rejected, informative = best_and_worst_pairs(buffer.reward, buffer.group_id)
        order = [row for pair in zip(chosen, rejected) for row in pair]
        buffer = buffer.select(torch.tensor(order, dtype=torch.long))
        buffer.columns["pair_id"] = torch.arange(len(order)) // 2
        buffer.columns["chosen"] = (torch.arange(len(order)) % 2 == 0)
        buffer.advantage = torch.zeros(len(order))
        return buffer.discard(~torch.tensor(informative, dtype=torch.bool).repeat_interleave(2))

    def loss(self, policy, batch, iteration):
        inputs, scores, _, ref_logp = self.score(policy, batch, iteration)
        present = scores.scored
        elbo, ref_elbo = scores.sequence(), (ref_logp * present).sum(dim=1)
        if self.config.length_normalize:  # the response's length (its EOS included)
            length = inputs.attention_mask[:, inputs.prompt_length:].sum(dim=1).clamp(min=1)
            elbo, ref_elbo = elbo / length, ref_elbo / length
        chosen = batch.columns["chosen"].to(elbo.device)
        order = torch.argsort(batch.columns["pair_id"].to(elbo.device) * 2 + (~chosen).long())
        elbo, ref_elbo, chosen = elbo[order], ref_elbo[order], chosen[order]
        pair_losses = dpo_pair_losses(elbo[chosen], ref_elbo[chosen], elbo[~chosen], ref_elbo[~chosen],
                                      self.config.beta)
        active = batch.active_rows().to(elbo.device)[order][chosen]  # pairs kept for distributed runs score nothing
        loss = global_mean((pair_losses * active).sum(), active.sum())
        margin = (elbo[chosen] - ref_elbo[chosen]) - (elbo[~chosen] - ref_elbo[~chosen])
        return loss, {"reward_margin": float(self.config.beta * margin.detach().mean()),
                      "pair_accuracy": float((margin > 0).float().mean())}
