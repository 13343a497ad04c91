"""PPO with a value model over denoising steps (TraceRL's value path; Wang et al., 2025).

A value model — a copy of the backbone with a zero-initialised Linear(hidden → 1, no bias) head — reads the
same replayed states as the policy (the ``trajectory`` estimator: the state before each step, scoring the
tokens that step committed) and gives a value V_k per token. Step-level GAE runs over the steps s = 1..S:
r*_s is the mean token reward of step s (the verifiable reward sits on the last step's tokens), V*_s the mean
token value, and

    R*_s = r*_s + γR*_{s+1},  δ*_s = r*_s − V*_s + γV*_{s+1},  A*_s = δ*_s + γλA*_{s+1};
    token level: A_k = r_k − V_k + γV*_{next} + γλA*_{next},  R_k = r_k + γR*_{next}.

The policy minimises TraceRL's row loss with A_k, normalised by L₁ as in the official value path (which
exists for block-causal models only: ``train_sdar_policy.py`` / ``train_sdar_value.py``); the value model its
clipped loss ½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), summed over targets / L₁, with its own
optimizer (lr 5e-6).
Defaults: γ = λ = 1, ε = 0.2, value trained every step; no KL here (TraceRL's is against π_old).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, masked_mean, register_algorithm
from dare_gym.algorithms.options import Clip, Likelihood, ResponseMask
from dare_gym.core.losses import clipped_surrogate, trace_row_losses


@dataclass
class PPOConfig(ResponseMask, Likelihood, Clip, AlgorithmConfig):
    gamma: float = 1.0
    """γ: discount over denoising steps"""
    lam: float = 1.0
    """λ of step-level GAE"""
    value_learning_rate: float = 5e-6
    """learning rate of the value model's own optimizer"""
    value_epsilon: float = 0.2
    """clip range of the value loss"""
    normalize_advantages: bool = False
    """whiten the token advantages over the batch (standard PPO practice; off in TraceRL's value path)"""
    estimator: str = "trajectory"
    estimator_kwargs: dict = field(default_factory=lambda: {"shrink": 1})
    response_mask: str = "before_eos"

    def check(self):
        if self.estimator != "trajectory":
            raise ValueError(f"PPO's step-level GAE needs the trajectory estimator, got {self.estimator!r}")


class ValueModel(nn.Module):
    """The policy's network, copied, with a scalar head on the last hidden state in place of the LM head."""

    def __init__(self, policy):
        super().__init__()
        self.family, self.block_size = policy.family, policy.block_size  # the forward goes through the family
        backbone = copy.deepcopy(policy.model)
        if hasattr(backbone, "merge_and_unload"):  # a LoRA policy: the value model is a plain full copy
            backbone = backbone.merge_and_unload()
        self.backbone = backbone.train().requires_grad_(True)
        output = self.backbone.get_output_embeddings()
        self.head = nn.Linear(output.in_features, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self._hidden = None
        output.register_forward_hook(lambda module, args, result: setattr(self, "_hidden", args[0]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._hidden = None
        self.family.forward(self.backbone, input_ids, attention_mask, block_size=self.block_size)
        if self._hidden is None or self._hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"PPO's value model reads the input of the model's output layer; this "
                             f"{self.family.name} model computes its logits without calling that layer "
                             "(a tied head?), so it cannot have a value model")
        hidden = self.family.align(self._hidden, attention_mask)  # position i: the state that predicts token i
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # values in float32 under bf16 weights


def step_gae(step_rewards: torch.Tensor, step_values: torch.Tensor, step_present: torch.Tensor,
             gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over denoising steps (TraceRL's value path): with r*_s and V*_s the
    step-level reward and value ([N, S], steps beyond a rollout's last marked absent),
    R*_s = r*_s + γR*_{s+1}, δ*_s = r*_s − V*_s + γV*_{s+1}, A*_s = δ*_s + γλA*_{s+1}. Returns (A*, R*)."""
    advantages = torch.zeros_like(step_rewards)
    returns = torch.zeros_like(step_rewards)
    next_value = torch.zeros_like(step_rewards[:, 0])
    next_advantage = torch.zeros_like(next_value)
    next_return = torch.zeros_like(next_value)
    for s in reversed(range(step_rewards.shape[1])):
        present = step_present[:, s]
        delta = step_rewards[:, s] - step_values[:, s] + gamma * next_value
        advantage = delta + gamma * lam * next_advantage
        ret = step_rewards[:, s] + gamma * next_return
        advantages[:, s] = torch.where(present, advantage, torch.zeros_like(advantage))
        returns[:, s] = torch.where(present, ret, torch.zeros_like(ret))
        next_value = torch.where(present, step_values[:, s], next_value)
        next_advantage = torch.where(present, advantage, next_advantage)
        next_return = torch.where(present, ret, next_return)
    return advantages, returns


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       epsilon: float) -> torch.Tensor:
    """PPO's clipped value loss per token: ½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -epsilon, epsilon)
    return 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())



@register_algorithm("ppo", PPOConfig)
class PPO(PolicyGradient):
    distributed_unsupported = "its value model has an optimizer of its own and is not distributed yet"

    def __init__(self, config: PPOConfig, *, mask_token_id: int):
        super().__init__(config, mask_token_id=mask_token_id)
        self.value_model: ValueModel | None = None
        self.value_optimizer: torch.optim.Optimizer | None = None
        self._pending_state = None

    def _ensure_value_model(self, policy) -> ValueModel:
        if self.value_model is None:
            self.value_model = ValueModel(policy).to(policy.device)
            self.value_optimizer = torch.optim.AdamW(self.value_model.parameters(), lr=self.config.value_learning_rate)
            if self._pending_state is not None:
                self.load_state_dict(self._pending_state)
        return self.value_model

    def _token_values(self, batch_inputs, groups: torch.Tensor) -> torch.Tensor:
        """[B, L] each token's value, read on the state before the step that committed it."""
        values = torch.zeros(groups.shape, device=groups.device)
        for g in range(int(groups.max()) + 1):
            targets = groups == g
            if not targets.any():
                continue
            state = batch_inputs.completion_ids.masked_fill(groups >= g, self.estimator.mask_token_id)
            step_values = self.value_model(torch.cat([batch_inputs.prompt_ids, state], dim=1), batch_inputs.attention_mask)
            values = torch.where(targets, step_values[:, batch_inputs.prompt_length:], values)
        return values

    def advantages(self, buffer, group_size):
        return buffer  # GAE needs the values: computed in prepare

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        super().prepare(policy, reference, buffer, generator, micro_batch_size)  # step groups as noise
        self._ensure_value_model(policy)
        inputs = buffer.model_inputs(policy.device)
        groups = buffer.columns["noise.step_group"][:, 0].to(policy.device)
        values = self._token_values(inputs, groups)
        steps = int(groups.max()) + 1
        present = torch.stack([(groups == s).any(dim=1) for s in range(steps)], dim=1)
        counts = torch.stack([(groups == s).sum(dim=1) for s in range(steps)], dim=1).clamp(min=1)
        step_values = torch.stack([(values * (groups == s)).sum(dim=1) for s in range(steps)], dim=1) / counts
        last = present.long().cumsum(dim=1).argmax(dim=1)  # each rollout's final step carries the reward
        step_rewards = torch.zeros_like(step_values)
        step_rewards[torch.arange(len(buffer)), last] = buffer.reward.to(step_rewards)
        step_adv, step_ret = step_gae(step_rewards, step_values, present, self.config.gamma, self.config.lam)
        # Token level: A_k = r_k − V_k + γV*_next + γλA*_next, R_k = r_k + γR*_next (next: the following step).
        next_value = torch.cat([step_values[:, 1:] * present[:, 1:], torch.zeros_like(step_values[:, :1])], dim=1)
        next_adv = torch.cat([step_adv[:, 1:], torch.zeros_like(step_adv[:, :1])], dim=1)
        next_ret = torch.cat([step_ret[:, 1:], torch.zeros_like(step_ret[:, :1])], dim=1)
        index = groups.clamp(min=0)
        token_reward = step_rewards.gather(1, index)
        gamma, lam = self.config.gamma, self.config.lam
        advantage = token_reward - values + gamma * next_value.gather(1, index) + gamma * lam * next_adv.gather(1, index)
        returns = token_reward + gamma * next_ret.gather(1, index)
        valid = groups >= 0
        if self.config.normalize_advantages:
            mean, std = advantage[valid].mean(), advantage[valid].std()
            advantage = (advantage - mean) / (std + 1e-8)
        buffer.columns["token_advantage"] = torch.where(valid, advantage, 0.0).cpu()
        buffer.columns["token_return"] = torch.where(valid, returns, 0.0).cpu()
        buffer.columns["old_value"] = values.cpu()
        buffer.advantage = torch.zeros(len(buffer))

    def loss(self, policy, batch, iteration):
        config = self.config
        inputs, scores, old_logp, _ = self.score(policy, batch, iteration)
        device = scores.logp.device
        valid = inputs.completion_mask.bool() & scores.scored
        advantage = batch.columns["token_advantage"].to(device)
        surrogate, clip_active = clipped_surrogate(scores.logp, old_logp, advantage, epsilon_low=config.epsilon,
                                                   log_ratio_clamp=config.log_ratio_clamp)
        groups = batch.columns["noise.step_group"][:, iteration].to(device)
        values = self._token_values(inputs, groups)
        value_loss = clipped_value_loss(values, batch.columns["old_value"].to(device),
                                        batch.columns["token_return"].to(device), config.value_epsilon)
        targets = [draw.masked & valid for draw in scores.draws]
        padded_length = surrogate.shape[1]  # L₁
        policy_loss = trace_row_losses(surrogate, targets, padded_length).mean()
        critic_loss = trace_row_losses(value_loss, targets, padded_length).mean()
        metrics = {"value_loss": critic_loss.item(), "clip_fraction": masked_mean(clip_active, valid),
                   "value_mean": masked_mean(values.detach(), valid), "entropy": masked_mean(scores.entropy, valid)}
        return policy_loss + critic_loss, metrics  # the value loss's gradient only reaches the value model

    def after_optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), 1.0)
        self.value_optimizer.step()
        self.value_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        if self.value_model is None:
            return {}
        return {"value_model": self.value_model.state_dict(), "value_optimizer": self.value_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.value_model is None:  # built lazily from the policy: restore once it exists
            self._pending_state = state
            return
        self.value_model.load_state_dict(state["value_model"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self._pending_state = None
