"""BGPO (boundary-guided policy optimisation; Lin et al., 2025): the ELBO-ratio objective made linear in the
Monte-Carlo samples, so that memory stays flat as samples grow.

With 𝓑_j the j-th stratified ELBO sample (the ``elbo`` estimator, normalised by the padded length) and
d_j = 𝓑_j − 𝓑_old,j on identical masks, the exact objective A·exp(𝓑̄ − 𝓑̄_old) needs all n graphs at once.
BGPO optimises a lower bound that is a sum over samples — A(1 + d_j) for A > 0 (eˣ ≥ 1 + x), A·e^{d_j} for
A < 0 (Jensen) — through PPO clipping (ε) and dual-clip c for A < 0, so ``backward`` runs after each sample.
Each sequence's loss is aggregated as DARE does (``compute_policy_loss_bgpo``, ``loss_agg_mode: token-mean``):
spread over its |o_i| response tokens and averaged over the batch's tokens, i.e. a length-weighted mean
Σ_i |o_i| loss_i / Σ_i |o_i|; then / n per sample. DARE's LLaDA/Dream rollouts mark every response position
(an all-ones response mask), so there every |o_i| is the generation length and the mean is over sequences
(``response_mask: all``); its SDAR/LLaDA2 rollouts stop at the first EOS (set ``response_mask: through_eos``).
Value and gradient match the original on-policy. verl's z-score advantages (std + 1e-6), uniform groups kept
with A = 0; no KL.
Followed: DARE (``dllm_core_algos.py``, ``*_dp_actor_bgpo.py``), since BGPO's own repository was not
available to read. DARE's recipe: mc_num 16, lr 5e-7, G = 8, ε = 0.2, dual-clip 3, rollout temperature 0.6.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import Clip, DualClip, GroupAdvantages, Likelihood, ResponseMask
from dare_gym.core.distributed import global_mean, gradient_sync
from dare_gym.core.losses import importance_ratio


@dataclass
class BGPOConfig(ResponseMask, Likelihood, GroupAdvantages, DualClip, Clip, AlgorithmConfig):
    dual_clip: float | None = 3.0
    advantage_std_eps: float = 1e-6
    estimator: str = "elbo"
    """fixed: BGPO's bound is over stratified ELBO samples"""
    estimator_kwargs: dict = field(default_factory=lambda: {"mc_num": 16})
    response_mask: str = "all"
    per_sample_backward: bool = True
    """one backward per Monte-Carlo sample (constant memory); false: one over all samples (memory grows with n)"""

    def check(self):
        if self.estimator != "elbo":
            raise ValueError(f"BGPO's bound is over stratified ELBO samples: estimator must be 'elbo', got {self.estimator!r}")


def sample_elbo(draw, length: torch.Tensor) -> torch.Tensor:
    """[B] one sample 𝓑_j = Σ_masked ℓ · L/x_j, divided by the padded length (DARE's normalisation)."""
    return (draw.logp * draw.masked).sum(dim=1) * draw.weight / length


def bgpo_sample_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor, *,
                     epsilon: float, dual_clip: float | None, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """BGPO's loss for one Monte-Carlo sample: the ELBO-ratio objective replaced by a bound linear in the
    sample (A > 0: A(1 + d) from eˣ ≥ 1 + x; A < 0: A·e^d by Jensen), d = 𝓑_j − 𝓑_old,j on identical masks,
    through PPO clipping (and dual-clip for A < 0). DARE spreads each sequence's loss over its tokens and takes
    the token mean, so sequences weigh by their length: Σ_i |o_i| loss_i / Σ_i |o_i| (``lengths`` = |o_i|)."""
    d = elbo - old_elbo
    ratio = torch.where(advantages > 0, 1 + d, importance_ratio(d, log_ratio_clamp))
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    if dual_clip is not None:
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, dual_clip * advantages), surrogate)
    lengths = lengths.to(surrogate.dtype)
    return global_mean(-(surrogate * lengths).sum(), lengths.sum())



@register_algorithm("bgpo", BGPOConfig)
class BGPO(PolicyGradient):
    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        """Fresh ELBO masks per iteration, and π_old's value of every sample on them."""
        iterations, samples = self.config.num_iterations, self.estimator.mc_num
        noises = self.store_noise(policy, buffer, generator)
        length = float(buffer.completion_ids.shape[1])
        old = torch.zeros(len(buffer), iterations, samples)
        for rows in buffer.row_chunks(micro_batch_size):
            sub = self.model_inputs(buffer.select(rows), policy.device)
            for k, noise in enumerate(noises):
                chunk_noise = {name: value[rows] for name, value in noise.items()}
                for j in range(samples):
                    draw = self.estimator.draw(policy.logits, sub, chunk_noise, j)
                    old[rows, k, j] = sample_elbo(draw, length).to(old)
        buffer.columns["old_elbo"] = old

    def backward(self, policy, batch, iteration, weight):
        """One forward and one backward per Monte-Carlo sample: only one graph is alive at a time."""
        inputs = self.model_inputs(batch, policy.device)
        noise = self.noise(batch, iteration, policy.device)
        advantages = batch.advantage.to(policy.device)
        tokens = inputs.completion_mask.sum(dim=1)  # |o_i|: each sequence's weight in DARE's token mean
        length = float(inputs.completion_ids.shape[1])
        samples = self.estimator.mc_num
        total, drift, pending = 0.0, 0.0, []
        for j in range(samples):
            # distributed runs synchronise gradients once: on the last sample's backward
            with gradient_sync(policy, j == samples - 1 or not self.config.per_sample_backward):
                elbo = sample_elbo(self.estimator.draw(policy.logits, inputs, noise, j), length)
                old = batch.columns["old_elbo"][:, iteration, j].to(elbo.device)
                loss = bgpo_sample_loss(elbo, old, advantages, tokens, epsilon=self.config.epsilon,
                                        dual_clip=self.config.dual_clip, log_ratio_clamp=self.config.log_ratio_clamp)
                if self.config.per_sample_backward:
                    (loss * weight / samples).backward()  # this sample's graph is freed here
                else:
                    pending.append(loss)
            total += loss.item() / samples
            drift += float((elbo.detach() - old).abs().mean()) / samples
        if pending:
            (torch.stack(pending).sum() * weight / samples).backward()
        return total, {"elbo_drift": drift, "mc_samples": float(samples)}
