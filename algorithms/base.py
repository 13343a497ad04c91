"""The algorithm protocol, the registry, and the policy-gradient skeleton the GRPO family shares.

An algorithm is one file: a config dataclass (hyper-parameters with the official recipe's defaults) and a
class the trainer drives on each batch of rollouts:

    buffer = algorithm.advantages(buffer, group_size)          # fill buffer.advantage; may drop rows
    algorithm.prepare(policy, reference, buffer, generator, micro_batch_size)   # score π_old, π_ref
    for iteration in range(num_iterations):                     # one optimizer step each
        for minibatch in buffer.minibatches(...):
            loss, metrics = algorithm.backward(policy, minibatch, iteration, weight)

:class:`Algorithm` is the contract, with its defaults: what a rollout must record (``rollout_needs``), the sampler
settings it requires, whether a reference is needed, the minibatch unit, hooks after the optimizer step, and
state for checkpoints. ``backward`` defaults to ``(weight · loss(...)).backward()``; algorithms that must call
backward themselves (BGPO, once per Monte-Carlo sample) override it. Registering is the
``@register_algorithm`` line on the class; every module in ``algorithms/`` is imported by the package, so a new
algorithm is one new file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dare_gym.advantages import (
    BASELINE_CHOICES,
    SCALE_CHOICES,
    group_advantages,
    zero_variance_groups,
)
from dare_gym.buffer import RolloutBuffer
from dare_gym.distributed import active_rows, discard_rows, global_sum
from dare_gym.estimators import TokenScores, make_estimator
from dare_gym.losses import (
    KL_ESTIMATORS,
    LOSS_TYPES,
    aggregate,
    clipped_surrogate,
    kl_penalty,
    sequence_log_ratio,
    truncated_importance_weight,
)

NOISE_PREFIX = "noise."
BATCH_TOKENS = "batch_tokens_per_row"  # the batch's active tokens / rows, on every row (loss_type: dapo)


@dataclass
class AlgorithmConfig:
    """Fields every algorithm has."""

    num_iterations: int = 1
    """μ: optimizer updates per batch of rollouts"""
    beta: float = 0.0
    """KL weight towards the frozen reference (0: no reference model is kept)"""


@dataclass
class Rollout:
    """One step's samples: ``completions`` holds one completion per prompt the trainer passed, in order (what the
    env scores); :meth:`buffer` turns them and their rewards into buffer rows, here one row per completion."""

    prompts: list[str]
    completions: list  # dare_gym.policy.Completion
    policy: Any

    def buffer(self, rewards: Sequence[float], group_ids: Sequence[int]) -> RolloutBuffer:
        return RolloutBuffer.from_rollouts(
            self.prompts, self.completions, rewards, group_ids, completion_mask_fn=self.policy.completion_mask,
            pad_token_id=self.policy.tokenizer.pad_token_id,
        )


class Algorithm:
    """The contract between an algorithm and the trainer, with the defaults most algorithms need.

    What a rollout must record and how it is sampled:
        ``rollout_needs``: extra columns the trainer adds to the buffer — ``"step_predictions"`` (the sampler's
        x̂₀ at every step, scored by the env: ``step_reward``, MDPO) and ``"demonstrations"`` (the env's gold
        answers, tokenised: ``demonstration_ids``, SFT on demonstrations).
        ``rollout_settings``: sampler settings the algorithm requires, over the config's (``"gen_length"`` as a
        value means the rollout's completion length: JustGRPO decodes left to right, one token per step).
        ``rollout(policy, prompts, ...)``: how a step's completions are sampled and turned into buffer rows. The
        default samples each prompt independently with the policy's sampler, one row per completion; an
        algorithm that samples otherwise (d-TreeRPO's tree of partial states) overrides it and returns its own
        :class:`Rollout`, whose ``completions`` the env scores and whose ``buffer`` makes the rows.
    The update:
        ``needs_reference``: whether a frozen reference model is scored (the trainer keeps one only then).
        ``minibatch_unit``: a buffer column whose rows must share a minibatch (DPO's pairs), or None.
        ``distributed_unsupported``: None, or the reason the trainer gives for refusing ``strategy`` ddp/fsdp.
        ``advantages`` → ``prepare`` → ``backward`` per minibatch (see the module docstring), then
        ``after_optimizer_step`` (PPO steps its value model there).
    Checkpoints: ``state_dict`` / ``load_state_dict`` carry any state of the algorithm's own (PPO's value model).
    """

    config: AlgorithmConfig
    name: str  # set by @register_algorithm
    rollout_needs: tuple[str, ...] = ()
    rollout_settings: dict[str, Any] = {}
    minibatch_unit: str | None = None
    distributed_unsupported: str | None = None  # why this algorithm cannot train on several processes, if it cannot

    def __init__(self, config: Any, *, mask_token_id: int):
        self.config = config
        self.mask_token_id = mask_token_id

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0

    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator: torch.Generator | None,
                batch_size: int, settings: dict[str, Any]) -> Rollout:
        """Sample this step's completions: ``prompts`` as the vector env laid them out (``group_size``
        consecutive copies of each problem), ``settings`` the sampler's (the config's ``rollout:`` section with
        ``rollout_settings`` applied). The default: one independent completion per prompt."""
        completions = policy.generate(list(prompts), generator=generator, batch_size=batch_size,
                                      record_predictions="step_predictions" in self.rollout_needs, **settings)
        return Rollout(list(prompts), completions, policy)

    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer:
        raise NotImplementedError

    def prepare(self, policy, reference, buffer: RolloutBuffer, generator: torch.Generator | None,
                micro_batch_size: int) -> None:
        """Score what the loss compares against (π_old, π_ref) before the optimizer steps; nothing by default."""

    def loss(self, policy, batch: RolloutBuffer, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def backward(self, policy, batch: RolloutBuffer, iteration: int, weight: float) -> tuple[float, dict]:
        """``(weight · loss).backward()``; algorithms that call backward several times (BGPO) override it."""
        loss, metrics = self.loss(policy, batch, iteration)
        (loss * weight).backward()
        return loss.item(), metrics

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step; nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; nothing by default."""


@dataclass(frozen=True)
class AlgorithmEntry:
    name: str
    config_class: type
    algorithm_class: type


ALGORITHMS: dict[str, AlgorithmEntry] = {}


def register_algorithm(name: str, config_class: type):
    """Class decorator: ``@register_algorithm("d1", DiffuGRPOConfig)``."""

    def add(cls: type) -> type:
        if name in ALGORITHMS and ALGORITHMS[name].algorithm_class is not cls:
            raise ValueError(f"an algorithm named {name!r} is already registered")
        ALGORITHMS[name] = AlgorithmEntry(name, config_class, cls)
        cls.name = name
        return cls

    return add


def list_algorithms() -> list[str]:
    return sorted(ALGORITHMS)


def get_algorithm(name: str) -> AlgorithmEntry:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(list_algorithms())}") from None


def build_config(name: str, options: dict[str, Any], *, where: str = "algorithm") -> Any:
    """The algorithm's config dataclass from a dict, with errors that name the bad field and value."""
    from dare_gym.config import dataclass_from_dict

    return dataclass_from_dict(get_algorithm(name).config_class, options, where=where)


def make_algorithm(name: str, config: Any, *, mask_token_id: int) -> Algorithm:
    entry = get_algorithm(name)
    if not isinstance(config, entry.config_class):
        raise TypeError(f"algorithm {name!r} takes a {entry.config_class.__name__}, got {type(config).__name__}")
    return entry.algorithm_class(config, mask_token_id=mask_token_id)


def config_as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def check_clamps(config, names=("log_ratio_clamp", "kl_clamp")) -> None:
    """The config's clamp fields ``names`` are positive numbers or null."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{name} must be a number > 0 or null, got {value!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0


# ------------------------------------------------------------------------------- the GRPO skeleton


@dataclass
class PolicyGradientConfig(AlgorithmConfig):
    """GRPO options with the names TRL users know. Subclasses set their paper's defaults."""

    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    """ratio clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"""
    epsilon_high: float | None = None
    """upper clip range (DAPO's clip-higher); null: same as epsilon"""
    dual_clip: float | None = None
    """cap the loss of negative-advantage tokens at -c·A (c > 1); null: no cap"""
    kl_estimator: str = "k3"
    """KL estimator towards the reference: k1, k2 or k3"""
    loss_type: str = "bnpo"
    """token-loss reduction: grpo (mean of sequence means), bnpo (token mean of each minibatch), dr_grpo
    (sum / B·L), dapo (sum / the active tokens of the whole batch, across minibatches)"""
    scale_rewards: str = "group"
    """advantage scaling: divide by the group's std (group), the batch's (batch), or none"""
    baseline: str = "mean"
    """advantage baseline: the group mean, or rloo (leave-one-out mean)"""
    importance_sampling_level: str = "token"
    """token ratios, or sequence (GSPO's length-normalised sequence ratio)"""
    drop_zero_variance_groups: bool = True
    """skip groups whose rewards are all equal (they carry no signal)"""
    estimator: str = "d1"
    """likelihood estimator: d1, random_ratio, coupled, elbo, elbo_pair, block, trajectory, exact_ar"""
    estimator_kwargs: dict = field(default_factory=dict)
    """the estimator's options, e.g. {p_mask_prompt: 0.15}, {mc_num: 8}, {shrink: 1}"""
    log_ratio_clamp: float | None = None
    """clamp log(π_θ/π_old) to [-c, c] before exponentiating it (verl uses 20); null: no clamp"""
    kl_clamp: float | None = None
    """clamp each token's KL estimate to [-c, c] (verl clamps k3 to 10); null: no clamp"""
    rollout_is_cap: float | None = None
    """weight each token's loss by min(π_old/π_rollout, cap), the truncated importance weight that corrects
    rollouts from approximate caches (fast_dllm); needs the trajectory estimator; null: off"""

    def __post_init__(self):
        if self.rollout_is_cap is not None:
            if not self.rollout_is_cap > 0:
                raise ValueError(f"rollout_is_cap must be > 0 or null, got {self.rollout_is_cap!r}")
            if self.estimator != "trajectory":
                raise ValueError("rollout_is_cap compares each token's log-prob in the state that committed it: it "
                                 f"needs estimator 'trajectory', got {self.estimator!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations!r}")
        check_clamps(self)
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon!r} / epsilon_high {self.epsilon_high!r}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 or null, got {self.dual_clip!r}")
        for name, value, choices in (
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("scale_rewards", self.scale_rewards, SCALE_CHOICES),
            ("baseline", self.baseline, BASELINE_CHOICES),
            ("importance_sampling_level", self.importance_sampling_level, ("token", "sequence")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class PolicyGradient(Algorithm):
    """Group advantages, an estimator scored on shared noise for π_θ, π_old and π_ref, and a clipped
    surrogate with a KL penalty, aggregated by ``loss_type``. Subclasses choose defaults and may replace
    ``loss`` (how the per-token terms are combined) or ``backward``."""

    config: PolicyGradientConfig
    population_std = False  # TraceRL z-scores with the population std

    def __init__(self, config: PolicyGradientConfig, *, mask_token_id: int):
        super().__init__(config, mask_token_id=mask_token_id)
        self.estimator = make_estimator(config.estimator, mask_token_id=mask_token_id, **config.estimator_kwargs)

    # advantages ---------------------------------------------------------------------------------------
    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer:
        buffer.advantage = group_advantages(
            buffer.reward, group_size, scale_rewards=self.config.scale_rewards, baseline=self.config.baseline,
            population_std=self.population_std,
        )
        if self.config.drop_zero_variance_groups:
            flat = zero_variance_groups(buffer.reward, group_size).repeat_interleave(group_size)
            buffer = discard_rows(buffer, flat)
        return buffer

    # score π_old and π_ref on each iteration's noise --------------------------------------------------------
    def store_noise(self, policy, buffer: RolloutBuffer, generator) -> list[dict[str, torch.Tensor]]:
        """Draw the estimator's noise for each inner iteration and keep it in the buffer (rows first)."""
        inputs = buffer.model_inputs(policy.device)
        noises = [self.estimator.sample_noise(inputs, generator) for _ in range(self.config.num_iterations)]
        for name in noises[0]:
            buffer.columns[NOISE_PREFIX + name] = torch.stack([n[name] for n in noises], dim=1).cpu()
        return noises

    @staticmethod
    def record_batch_tokens(buffer: RolloutBuffer) -> None:
        """Give every row the batch's mean count of active tokens (the completion tokens a loss counts, up to
        and including the first EOS), so that any minibatch's rows sum to its share of the batch's total:
        ``loss_type: dapo`` divides by it, and the weighted minibatch losses add up to Σ_batch ℓ / N_batch
        (TRL's normaliser over the whole accumulated batch) however the batch is split."""
        rows = active_rows(buffer)
        mean = global_sum(buffer.completion_mask.sum().float()) / global_sum(rows.sum().float()).clamp(min=1)
        buffer.columns[BATCH_TOKENS] = torch.where(rows, mean, torch.zeros_like(mean))

    @torch.no_grad()
    def prepare(self, policy, reference, buffer: RolloutBuffer, generator, micro_batch_size: int = 64) -> None:
        self.record_batch_tokens(buffer)
        noises = self.store_noise(policy, buffer, generator)
        scorers = []
        if len(noises) > 1:  # with μ = 1 the update is on-policy and π_old is π_θ detached
            scorers.append(("old_logp", policy))
        if self.needs_reference:
            scorers.append(("ref_logp", reference))
        chunks = buffer.row_chunks(micro_batch_size)
        chunk_inputs = [buffer.select(rows).model_inputs(policy.device) for rows in chunks]
        # A noise-free estimator (trajectory replay) gives every iteration the same inputs: score them once.
        distinct = noises[:1] if getattr(self.estimator, "deterministic", False) else noises
        for column, scorer in scorers:
            per_iteration = []
            for noise in distinct:
                scores = [
                    self.estimator.token_logp(scorer.logits, inputs, {k: v[rows] for k, v in noise.items()}).logp
                    for rows, inputs in zip(chunks, chunk_inputs)
                ]
                per_iteration.append(torch.cat(scores).cpu())
            per_iteration *= len(noises) // len(distinct)
            buffer.columns[column] = torch.stack(per_iteration, dim=1)

    def noise(self, batch: RolloutBuffer, iteration: int, device) -> dict[str, torch.Tensor]:
        return {
            name[len(NOISE_PREFIX):]: value[:, iteration].to(device)
            for name, value in batch.columns.items()
            if name.startswith(NOISE_PREFIX)
        }

    def score(self, policy, batch: RolloutBuffer, iteration: int):
        """This iteration's estimate under π_θ, with π_old's and π_ref's on the same noise."""
        inputs = batch.model_inputs(policy.device)
        scores = self.estimator.token_logp(policy.logits, inputs, self.noise(batch, iteration, policy.device))
        device = scores.logp.device
        old = batch.columns["old_logp"][:, iteration].to(device) if "old_logp" in batch.columns else scores.logp.detach()
        ref = batch.columns["ref_logp"][:, iteration].to(device) if "ref_logp" in batch.columns else None
        return inputs, scores, old, ref

    # the clipped surrogate with a KL penalty -----------------------------------------------------------
    def token_loss(self, scores: TokenScores, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token −clipped surrogate (+ β·KL) and the diagnostics every GRPO variant logs."""
        config = self.config
        logp = scores.logp
        if config.importance_sampling_level == "sequence":
            logp = old_logp + sequence_log_ratio(logp, old_logp, mask)
        per_token, clip_active = clipped_surrogate(
            logp, old_logp, advantages[:, None], epsilon_low=config.epsilon, epsilon_high=config.epsilon_high,
            dual_clip=config.dual_clip, log_ratio_clamp=config.log_ratio_clamp,
        )
        metrics: dict[str, float] = {}
        if config.beta > 0 and ref_logp is not None:
            kl = kl_penalty(scores.logp, ref_logp, config.kl_estimator, clamp=config.kl_clamp)
            per_token = per_token + config.beta * kl
            metrics["kl_ref"] = masked_mean(kl.detach(), mask)
        log_ratio = (scores.logp - old_logp).detach()
        metrics["approx_kl_old"] = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)
        metrics["clip_fraction"] = masked_mean(clip_active, mask)
        if scores.entropy is not None:
            metrics["entropy"] = masked_mean(scores.entropy, mask)
        metrics["scored_tokens"] = float(mask.sum())
        return per_token, metrics

    def loss(self, policy, batch: RolloutBuffer, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        mask = inputs.completion_mask.bool() & scores.scored
        per_token, metrics = self.token_loss(scores, old_logp, ref_logp, batch.advantage.to(scores.logp.device), mask)
        per_token = self.correct_for_rollout(per_token, old_logp, batch, mask, metrics)
        return self.aggregate(per_token, mask, batch), metrics

    def correct_for_rollout(self, per_token: torch.Tensor, old_logp: torch.Tensor, batch: RolloutBuffer,
                            mask: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor:
        """Where this estimator scores each token in the state the sampler committed it in (trajectory replay),
        compare π_old with the sampler's own log-prob of it: log ``rollout_logp_gap`` (mean |log π_old −
        log π_rollout|, > 0 when an approximate cache drew the rollout) and, with ``rollout_is_cap``, weight the
        per-token loss by the truncated importance weight min(π_old/π_rollout, cap)."""
        if not getattr(self.estimator, "scores_commit_states", False) or "commit_logp" not in batch.columns:
            return per_token
        gap = (old_logp - batch.columns["commit_logp"].to(old_logp.device)).detach()
        metrics["rollout_logp_gap"] = masked_mean(gap.abs(), mask)
        if self.config.rollout_is_cap is None:
            return per_token
        weight = truncated_importance_weight(gap, self.config.rollout_is_cap)
        metrics["rollout_is_weight"] = masked_mean(weight, mask)
        return per_token * weight

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, batch: RolloutBuffer) -> torch.Tensor:
        """``loss_type``'s reduction of this minibatch's per-token loss; dapo's normaliser is the minibatch's
        share of the whole batch's active tokens (recorded by ``prepare``)."""
        share = None
        if self.config.loss_type == "dapo":
            if BATCH_TOKENS not in batch.columns:
                raise ValueError("loss_type 'dapo' needs the batch's token count: call prepare(...) on the whole "
                                 "batch before the loss of its minibatches")
            share = float(batch.columns[BATCH_TOKENS].sum())
        return aggregate(per_token, mask, self.config.loss_type, max_completion_length=per_token.shape[1],
                         num_active_tokens=share, rows=active_rows(batch))

