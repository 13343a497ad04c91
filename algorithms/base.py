"""The algorithm protocol, the registry, and the policy-gradient skeleton the GRPO family shares.

An algorithm is one file: a config dataclass (hyper-parameters with the official recipe's defaults) and a
class the trainer drives on each batch of rollouts:

    rollout = algorithm.rollout(policy, prompts, ..., context)  # sample; the env scores rollout.completions
    buffer = rollout.buffer(rewards, group_ids, correct)        # the rows (the algorithm's own columns too)
    buffer = algorithm.advantages(buffer, group_size)          # fill buffer.advantage; may drop rows
    algorithm.prepare(policy, reference, buffer, generator, micro_batch_size)   # score π_old, π_ref
    for iteration, minibatches in algorithm.update_plan(buffer, ...):   # one optimizer step each
        for minibatch in minibatches:                                   # (default: num_iterations passes)
            loss, metrics = algorithm.backward(policy, minibatch, iteration, weight)

:class:`Algorithm` is the contract, with its defaults: how it samples and what its rows hold (``rollout``), the
sampler settings it requires, whether a reference is needed, its optimizer steps, hooks after them, and
state for checkpoints. ``backward`` defaults to ``(weight · loss(...)).backward()``; algorithms that must call
backward themselves (BGPO, once per Monte-Carlo sample) override it. Registering is the
``@register_algorithm`` line on the class; every module in ``algorithms/`` is imported by the package, so a new
algorithm is one new file.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from dare_gym.core.advantages import group_advantages, zero_variance_groups
from dare_gym.algorithms.options import (
    Clip,
    ClipHigher,
    DualClip,
    GroupAdvantages,
    KLPenalty,
    Likelihood,
    ResponseMask,
    RolloutCorrection,
    SequenceRatio,
    TokenAggregation,
    Updates,
)
from dare_gym.core.buffer import CORRECT, RolloutBuffer, SequenceBatch
from dare_gym.registries import Registry
from dare_gym.core.distributed import global_sum
from dare_gym.core.estimators import TokenScores
from dare_gym.core.uniform_estimators import make_noise_estimator  # also registers the uniform-noise estimators
from dare_gym.core.losses import (
    aggregate,
    clipped_surrogate,
    kl_penalty,
    sequence_log_ratio,
    truncated_importance_weight,
)

NOISE_PREFIX = "noise."
BATCH_TOKENS = "batch_tokens_per_row"  # the batch's active tokens / rows, on every row (loss_type: dapo)
OLD_LOGP = "old_logp"  # [N, μ − 1, L] π_old's log-probs on iterations 1..μ−1's noise (iteration 0: π_θ detached)
REF_LOGP = "ref_logp"  # [N, μ, L] π_ref's log-probs on each iteration's noise


@dataclass
class AlgorithmConfig(Updates):
    """What every algorithm's config has: ``num_iterations``. An algorithm adds the option groups of
    :mod:`dare_gym.algorithms.options` its loss reads, and its own fields."""


@dataclass
class RolloutContext:
    """What the trainer hands an algorithm's rollout beside the policy: which problem each prompt is and the
    env's own scoring, for algorithms whose rows need more than the completions' rewards (MDPO scores the
    sampler's intermediate guesses, SFT on demonstrations tokenises the gold answers, IGPO inpaints the env's
    hints)."""

    indices: Sequence[int]  # the record index of each prompt's problem
    score_texts: Callable[[int, Sequence[str]], list[float]]  # the env's rewards of texts for record i
    demonstrations: Callable[[Sequence[int]], list[str]]  # the env's gold completions of records
    env_id: str = ""
    hints: Callable[[Sequence[int], float], list[str | None]] | None = None  # the env's partial gold reasoning
    # of records (the first fraction of it; None where the task has none): IGPO's inpainting
    judge: Callable[[int, Sequence[str]], list[bool]] | None = None  # the env's verdicts on texts for record i


@dataclass
class Rollout:
    """One step's samples: ``completions`` holds one completion per prompt the trainer passed, in order (what the
    env scores); :meth:`buffer` turns them and their rewards into buffer rows, here one row per completion."""

    prompts: list[str]
    completions: list  # dare_gym.core.policy.Completion
    policy: Any
    response_mask: str = "through_stop"  # the algorithm's rule for which completion positions a loss scores

    def buffer(self, rewards: Sequence[float], group_ids: Sequence[int],
               correct: Sequence[bool] | None = None) -> RolloutBuffer:
        """Buffer rows from the scored completions (``correct``: the env's verdicts, kept as a column)."""
        buffer = RolloutBuffer.from_rollouts(
            self.prompts, self.completions, rewards, group_ids,
            completion_mask_fn=lambda ids: self.policy.response_mask(ids, self.response_mask),
            pad_token_id=self.policy.tokenizer.pad_token_id, ended_fn=self.policy.ended,
        )
        if correct is not None:
            buffer.columns[CORRECT] = torch.as_tensor(list(correct), dtype=torch.bool)
        return buffer


class Algorithm:
    """The contract between an algorithm and the trainer, with the defaults most algorithms need.

    How a step is sampled and what its rows hold:
        ``rollout_settings``: sampler settings the algorithm requires, over the config's (MDPO's tempered
        confidence). ``rollout_order = "left_to_right"``: decode one token per step, left to right, with whatever
        options the rollout's sampler needs for that (JustGRPO; :meth:`Sampler.left_to_right`).
        ``rollout(policy, prompts, ..., context)``: how a step's completions are sampled and turned into buffer
        rows. The default samples each prompt independently with the policy's sampler, one row per completion;
        an algorithm that samples otherwise (d-TreeRPO's tree of partial states) or whose rows need more (MDPO's
        step rewards, SFT's gold answers, from the :class:`RolloutContext`) returns its own :class:`Rollout`,
        whose ``completions`` the env scores and whose ``buffer`` makes the rows.
    The update:
        ``needs_reference``: whether a frozen reference model is scored (the trainer keeps one only then).
        ``update_plan``: the optimizer steps and the minibatches of each (``num_iterations`` passes by default).
        ``minibatch_unit``: a buffer column whose rows must share a minibatch (DPO's pairs), or None.
        ``distributed_unsupported``: None, or the reason the trainer gives for refusing ``strategy`` ddp/fsdp.
        ``refusal(family)``: why it cannot train a family at all (``supported_noise``), asked before loading;
        ``use_noise(noise, vocab_size=)``: train a model of that noise (``make_algorithm(..., noise=)``): an
        algorithm whose ``supported_noise`` holds ``uniform`` scores DiffusionGemma with the uniform-noise
        counterpart of its estimator (:mod:`dare_gym.core.uniform_estimators`).
        ``advantages`` → ``prepare`` → ``backward`` per minibatch (see the module docstring), then
        ``after_optimizer_step`` (PPO steps its value model there).
    Checkpoints: ``state_dict`` / ``load_state_dict`` carry any state of the algorithm's own (PPO's value model).
    """

    config: AlgorithmConfig
    name: str  # set by @register_algorithm
    rollout_settings: dict[str, Any] = {}
    rollout_order: str | None = None  # "left_to_right": one token per step (JustGRPO)
    minibatch_unit: str | None = None
    scores_response_only = False  # hide the positions after the response from the scoring forward (DARE's DPO)
    distributed_unsupported: str | None = None  # why this algorithm cannot train on several processes, if it cannot

    supported_noise: tuple[str, ...] = ("mask",)  # the model families' corruptions its estimators handle
    model_noise: str = "mask"  # the corruption of the model it trains (use_noise)
    vocab_size: int | None = None  # the ids uniform noise draws from (uniform-noise models)

    def __init__(self, config: Any, *, mask_token_id: int):
        self.config = config
        self.mask_token_id = mask_token_id

    def use_noise(self, noise: str, *, vocab_size: int | None = None) -> None:
        """Train a model that undoes ``noise`` (its family's); an unsupported one is the refusal's error."""
        if noise not in self.supported_noise:
            raise ValueError(f"{self.name} cannot train a model trained to undo {noise} noise: it estimates "
                             f"likelihoods with {', '.join(self.supported_noise)} noise")
        self.model_noise, self.vocab_size = noise, vocab_size

    @classmethod
    def refusal(cls, family) -> str | None:
        """Why this algorithm cannot train a model of ``family`` (a :class:`ModelFamily`), or None: asked before
        the model is loaded, so that an impossible pairing stops at once with the reason."""
        if family.noise not in cls.supported_noise:
            # one reason for every algorithm it applies to: the README's table numbers it once
            able = sorted(name for name, entry in ALGORITHMS.items()
                          if family.noise in entry.algorithm_class.supported_noise)
            return (f"its likelihood estimators replace tokens with [MASK] ({', '.join(cls.supported_noise)} noise), "
                    f"but {family.name} models are trained to undo {family.noise} noise"
                    + (f" (algorithms with {family.noise}-noise estimators: {', '.join(able)})" if able else ""))
        return None

    @classmethod
    def model_refusal(cls, family, model_config) -> str | None:
        """Why this algorithm cannot train one model of ``family`` whose transformers config (read without a
        weight; None where it could not be read) is ``model_config``: :meth:`refusal` unless the algorithm
        needs more than its family says (DiPO: block-causal attention, which a tiny model has only when its config
        sets a block size)."""
        return cls.refusal(family)

    @property
    def needs_reference(self) -> bool:
        """A frozen reference is kept only where the loss has a per-token KL term towards it."""
        return isinstance(self.config, KLPenalty) and self.config.beta > 0

    @property
    def response_mask(self) -> str:
        """Which completion positions the loss scores (``options.RESPONSE_MASKS``): the config's
        ``response_mask`` where it has one, else every position (EOS padding included)."""
        return self.config.response_mask if isinstance(self.config, ResponseMask) else "all"

    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator: torch.Generator | None,
                batch_size: int, settings: dict[str, Any], context: RolloutContext | None = None) -> Rollout:
        """Sample this step's completions: ``prompts`` as the vector env laid them out (``group_size``
        consecutive copies of each problem), ``settings`` the sampler's (the config's ``rollout:`` section with
        ``rollout_settings`` applied). The default: one independent completion per prompt."""
        completions = policy.generate(list(prompts), generator=generator, batch_size=batch_size, **settings)
        return Rollout(list(prompts), completions, policy, self.response_mask)

    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer:
        raise NotImplementedError

    def model_inputs(self, buffer: RolloutBuffer, device) -> SequenceBatch:
        """The scoring forward's inputs for ``buffer``'s rows (``scores_response_only``: see
        :meth:`RolloutBuffer.model_inputs`)."""
        return buffer.model_inputs(device, response_only=self.scores_response_only)

    def prepare(self, policy, reference, buffer: RolloutBuffer, generator: torch.Generator | None,
                micro_batch_size: int) -> None:
        """Score what the loss compares against (π_old, π_ref) before the optimizer steps; nothing by default."""

    def update_plan(self, buffer: RolloutBuffer, micro_batch_size: int,
                    generator: torch.Generator | None) -> Iterator[tuple[int, Iterator[RolloutBuffer]]]:
        """The optimizer steps of one update, in order: each an (iteration index, its minibatches) pair; the
        trainer accumulates the minibatches' gradients (each weighted by its share of the step's rows) and steps.
        By default ``num_iterations`` passes over the whole batch, shuffled into minibatches of about
        ``micro_batch_size`` rows (``minibatch_unit`` rows kept together); d-TreeRPO's official schedule trains
        one parent's segments at a time instead. :class:`PolicyGradient` relies on iteration 0 being one
        optimizer step (π_old's weights for all its minibatches): a subclass whose plan steps within iteration 0
        must score π_old on it too (see :meth:`PolicyGradient.prepare`)."""
        for iteration in range(self.config.num_iterations):
            yield iteration, buffer.minibatches(micro_batch_size, generator=generator, unit=self.minibatch_unit)

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
    """A registered algorithm: its config class, its class, and its presets (named sets of field values, e.g.
    d1's ``digitsort``, the recipe of the embedded default)."""

    name: str
    config_class: type
    algorithm_class: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_class) if f.init]


ALGORITHMS: Registry = Registry("algorithm")
PRESET = "preset"  # the key of an algorithm section that names a preset


def register_algorithm(name: str, config_class: type, *, presets: dict[str, dict[str, Any]] | None = None):
    """Class decorator: ``@register_algorithm("d1", DiffuGRPOConfig, presets={"digitsort": {...}})``. Every
    preset is checked now: a preset naming a field the config lacks is a bug of the algorithm's file."""

    def add(cls: type) -> type:
        if name in ALGORITHMS and ALGORITHMS[name].algorithm_class is not cls:
            raise ValueError(f"an algorithm named {name!r} is already registered")
        entry = AlgorithmEntry(name, config_class, cls, dict(presets or {}))
        for preset, values in entry.presets.items():
            unknown = sorted(set(values) - set(entry.fields))
            if unknown:
                raise ValueError(f"{name}: preset {preset!r} sets {', '.join(unknown)}, which are not fields of "
                                 f"{config_class.__name__}")
        ALGORITHMS.add(name, entry, overwrite=True)
        cls.name = name
        return cls

    return add


def list_algorithms() -> list[str]:
    return ALGORITHMS.names()


def get_algorithm(name: str) -> AlgorithmEntry:
    return ALGORITHMS.lookup(name)


def expand_preset(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a ``preset`` key replaced by the preset's field values (the options' own values win)."""
    options = dict(options)
    preset = options.pop(PRESET, None)
    if preset is None:
        return options
    entry = get_algorithm(name)
    if preset not in entry.presets:
        known = ", ".join(sorted(entry.presets)) or "none"
        raise ValueError(f"{name} has no preset {preset!r}; its presets: {known}")
    return {**copy.deepcopy(entry.presets[preset]), **options}


def build_config(name: str, options: dict[str, Any], *, where: str = "algorithm") -> Any:
    """Algorithm ``name``'s config from its defaults, an optional ``preset`` and ``options``, with errors that
    name the bad field and the algorithm's fields."""
    from dare_gym.core.config import ConfigError, dataclass_from_dict

    entry = get_algorithm(name)
    try:
        options = expand_preset(name, options)
    except ValueError as error:
        raise ConfigError(f"{where}.{PRESET}: {error}") from None
    unknown = sorted(set(options) - set(entry.fields))
    if unknown:
        raise ConfigError(f"{', '.join(f'{where}.{u}' for u in unknown)}: {name} has no such field; the fields of "
                          f"{name} are {', '.join(sorted(entry.fields))} (`dare-gym algorithms {name}`)")
    return dataclass_from_dict(entry.config_class, options, where=where)


def resolved_section(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The algorithm section a run records: its name, its preset if any, and every field's value."""
    config = build_config(name, options)
    section = {"name": name}
    if options.get(PRESET) is not None:
        section[PRESET] = options[PRESET]
    return {**section, **dataclasses.asdict(config)}


def make_algorithm(name: str, config: Any, *, mask_token_id: int | None, noise: str = "mask",
                   vocab_size: int | None = None) -> Algorithm:
    """Algorithm ``name`` with ``config``, for a model that undoes ``noise`` (its family's ``noise``; uniform noise
    draws from ``vocab_size`` ids)."""
    entry = get_algorithm(name)
    if not isinstance(config, entry.config_class):
        raise TypeError(f"algorithm {name!r} takes a {entry.config_class.__name__}, got {type(config).__name__}")
    algorithm = entry.algorithm_class(config, mask_token_id=mask_token_id)
    if noise != "mask":
        algorithm.use_noise(noise, vocab_size=vocab_size)
    return algorithm


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0


# ------------------------------------------------------------------------------- the GRPO skeleton


@dataclass
class GRPOConfig(RolloutCorrection, ResponseMask, Likelihood, SequenceRatio, TokenAggregation, GroupAdvantages,
                 KLPenalty, DualClip, ClipHigher, Clip, AlgorithmConfig):
    """Every option of the GRPO skeleton below, with the names TRL users know: the config of the GRPO variants
    whose loss is exactly the skeleton's (d1, coupled-GRPO). Other algorithms compose only the groups they read."""


class PolicyGradient(Algorithm):
    """What the GRPO-style algorithms share: group advantages, an estimator scored on shared noise for π_θ,
    π_old and π_ref (``prepare``, ``score``), the per-token clipped surrogate with a KL penalty (``token_loss``),
    the rollout/train correction and ``loss_type``'s aggregation. Each algorithm writes its own ``loss`` from
    these pieces (d1's is the plainest: ``algorithms/d1.py``)."""

    config: GRPOConfig
    population_std = False  # TraceRL z-scores with the population std

    def __init__(self, config, *, mask_token_id: int):
        super().__init__(config, mask_token_id=mask_token_id)
        self.estimator = self.build_estimator(mask_token_id)

    def build_estimator(self, mask_token_id: int):
        """The config's likelihood estimator (for a uniform-noise model, its uniform counterpart); an algorithm
        with a fixed one (JustGRPO) overrides this."""
        return make_noise_estimator(self.config.estimator, mask_token_id=mask_token_id, noise=self.model_noise,
                                    vocab_size=self.vocab_size, **self.config.estimator_kwargs)

    def use_noise(self, noise: str, *, vocab_size: int | None = None) -> None:
        super().use_noise(noise, vocab_size=vocab_size)
        self.estimator = self.build_estimator(self.mask_token_id)

    # advantages ---------------------------------------------------------------------------------------
    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer:
        buffer.advantage = group_advantages(
            buffer.reward, group_size, scale_rewards=self.config.scale_rewards, baseline=self.config.baseline,
            population_std=self.population_std, std_eps=self.config.advantage_std_eps,
        )
        if self.config.drop_zero_variance_groups:
            flat = zero_variance_groups(buffer.reward, group_size).repeat_interleave(group_size)
            buffer = buffer.discard(flat)
        return buffer

    # score π_old and π_ref on each iteration's noise --------------------------------------------------------
    def store_noise(self, policy, buffer: RolloutBuffer, generator) -> list[dict[str, torch.Tensor]]:
        """Draw the estimator's noise for each inner iteration and keep it in the buffer (rows first)."""
        inputs = self.model_inputs(buffer, policy.device)
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
        rows = buffer.active_rows()
        mean = global_sum(buffer.completion_mask.sum().float()) / global_sum(rows.sum().float()).clamp(min=1)
        buffer.columns[BATCH_TOKENS] = torch.where(rows, mean, torch.zeros_like(mean))

    @torch.no_grad()
    def prepare(self, policy, reference, buffer: RolloutBuffer, generator, micro_batch_size: int = 64) -> None:
        """Draw each iteration's noise and score π_ref on all of them and π_old on iterations 1..μ−1.

        Iteration 0 needs no π_old forward: the default ``update_plan`` makes it one optimizer step over the
        whole batch, so every minibatch of it is scored with π_old's own weights on that iteration's noise, and
        π_old's log-probs there are π_θ's, detached (what :meth:`score` uses). The official codes score it
        anyway (d1 computes all μ iterations' old log-probs at generation time); the values are the same, the
        forward is spare — one of the six forwards a batch of the default recipe took (π_old, π_ref and π_θ on each of
        its two iterations; BENCHMARKS.md)."""
        self.record_batch_tokens(buffer)
        noises = self.store_noise(policy, buffer, generator)
        scorers = []
        if len(noises) > 1:
            scorers.append((OLD_LOGP, policy, noises[1:]))
        if self.needs_reference:
            scorers.append((REF_LOGP, reference, noises))
        chunks = buffer.row_chunks(micro_batch_size)
        chunk_inputs = [self.model_inputs(buffer.select(rows), policy.device) for rows in chunks]
        # A noise-free estimator (trajectory replay) gives every iteration the same inputs: score them once.
        deterministic = getattr(self.estimator, "deterministic", False)
        for column, scorer, iterations in scorers:
            per_iteration = []
            for noise in iterations[:1] if deterministic else iterations:
                scores = [
                    self.estimator.token_logp(scorer.logits, inputs, {k: v[rows] for k, v in noise.items()}).logp
                    for rows, inputs in zip(chunks, chunk_inputs)
                ]
                per_iteration.append(torch.cat(scores).cpu())
            if deterministic:
                per_iteration *= len(iterations)
            buffer.columns[column] = torch.stack(per_iteration, dim=1)

    def noise(self, batch: RolloutBuffer, iteration: int, device) -> dict[str, torch.Tensor]:
        return {
            name[len(NOISE_PREFIX):]: value[:, iteration].to(device)
            for name, value in batch.columns.items()
            if name.startswith(NOISE_PREFIX)
        }

    def score(self, policy, batch: RolloutBuffer, iteration: int):
        """This iteration's estimate under π_θ, with π_old's and π_ref's on the same noise."""
        inputs = self.model_inputs(batch, policy.device)
        scores = self.estimator.token_logp(policy.logits, inputs, self.noise(batch, iteration, policy.device))
        device = scores.logp.device
        # iteration 0 is on-policy (see prepare): π_old there is π_θ detached; the column holds iterations 1..μ−1
        old = batch.columns[OLD_LOGP][:, iteration - 1].to(device) if iteration > 0 else scores.logp.detach()
        ref = batch.columns[REF_LOGP][:, iteration].to(device) if REF_LOGP in batch.columns else None
        return inputs, scores, old, ref

    # the clipped surrogate with a KL penalty -----------------------------------------------------------
    def token_loss(self, scores: TokenScores, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token −clipped surrogate (+ β·KL) and the diagnostics every GRPO variant logs."""
        config = self.config
        logp = scores.logp
        # the optional groups: an algorithm without ClipHigher, DualClip, SequenceRatio or KLPenalty has none
        if isinstance(config, SequenceRatio) and config.importance_sampling_level == "sequence":
            logp = old_logp + sequence_log_ratio(logp, old_logp, mask)
        per_token, clip_active = clipped_surrogate(
            logp, old_logp, advantages[:, None], epsilon_low=config.epsilon,
            epsilon_high=config.epsilon_high if isinstance(config, ClipHigher) else None,
            dual_clip=config.dual_clip if isinstance(config, DualClip) else None,
            log_ratio_clamp=config.log_ratio_clamp,
        )
        metrics: dict[str, float] = {}
        if isinstance(config, KLPenalty) and config.beta > 0 and ref_logp is not None:
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
        if not isinstance(self.config, RolloutCorrection) or self.config.rollout_is_cap is None:
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
                         num_active_tokens=share, rows=batch.active_rows())

