"""The option groups an algorithm's config is composed of: one small dataclass per concern.

An algorithm's config holds only the fields its loss reads. It inherits the groups it uses (mixins first, its
base ``AlgorithmConfig`` last, so that ``num_iterations`` and the groups list in reading order) and re-declares
a field to give it its official default::

    @dataclass
    class SPGConfig(ResponseMask, Likelihood, GroupAdvantages, AlgorithmConfig):
        num_iterations: int = 4
        estimator: str = "block"

so ``dare-gym algorithms d1`` lists exactly what d1 reads, and setting a field an algorithm does not have
(``algorithm.beta`` for SPG, which has no KL term) is an error that names the algorithm's fields. The names are
TRL's where TRL has one (``epsilon``, ``beta``, ``loss_type``, ``scale_rewards``, ``num_iterations``).

Each group checks its own fields in ``check``; a config's ``__post_init__`` runs the ``check`` of every group
it is made of, then its own ``check`` if it defines one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dare_gym.core.advantages import BASELINE_CHOICES, SCALE_CHOICES
from dare_gym.core.losses import KL_ESTIMATORS, LOSS_TYPES

RESPONSE_MASKS = ("all", "through_eos", "through_stop", "before_eos")
"""Which completion positions a loss scores: every position (EOS padding included: DARE's LLaDA/Dream actors),
those up to and including the first EOS (d1 and TRL), up to and including the first stop token, EOS or
end-of-turn (the EOT of chat models), or those before the first EOS (TraceRL, whose pad token is the EOS)."""


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_or_null(name: str, value) -> None:
    if value is not None and not (is_number(value) and value > 0):
        raise ValueError(f"{name} must be a number > 0 or null, got {value!r}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass
class OptionGroup:
    """Base of every option group and algorithm config: runs each class's own ``check`` after init."""

    def __post_init__(self):
        for klass in reversed(type(self).__mro__):
            check = vars(klass).get("check")
            if check is not None:
                check(self)


@dataclass
class Updates(OptionGroup):
    num_iterations: int = 1
    """μ: optimizer updates per batch of rollouts"""

    def check(self):
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            raise ValueError(f"num_iterations must be an integer >= 1, got {self.num_iterations!r}")


@dataclass
class Clip(OptionGroup):
    epsilon: float = 0.2
    """ratio clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon]"""
    log_ratio_clamp: float | None = None
    """clamp log(π_θ/π_old) to [-c, c] before exponentiating it (verl uses 20); null: no clamp"""

    def check(self):
        if not (is_number(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        _positive_or_null("log_ratio_clamp", self.log_ratio_clamp)


@dataclass
class ClipHigher(OptionGroup):
    epsilon_high: float | None = None
    """upper clip range (DAPO's clip-higher): the ratio is clipped to [1 - epsilon, 1 + epsilon_high]; null:
    epsilon"""

    def check(self):
        if self.epsilon_high is not None and not (is_number(self.epsilon_high) and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_high must be a number >= 0 or null, got {self.epsilon_high!r}")


@dataclass
class DualClip(OptionGroup):
    dual_clip: float | None = None
    """cap the loss of negative-advantage tokens at -c·A (c > 1); null: no cap"""

    def check(self):
        if self.dual_clip is not None and not (is_number(self.dual_clip) and self.dual_clip > 1):
            raise ValueError(f"dual_clip must be a number > 1 or null, got {self.dual_clip!r}")


@dataclass
class KLPenalty(OptionGroup):
    beta: float = 0.0
    """weight of the per-token KL towards the frozen reference (0: no reference model is kept)"""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3"""
    kl_clamp: float | None = None
    """clamp each token's KL estimate to [-c, c] (verl clamps k3 to 10); null: no clamp"""

    def check(self):
        if not (is_number(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _positive_or_null("kl_clamp", self.kl_clamp)


@dataclass
class GroupAdvantages(OptionGroup):
    scale_rewards: str = "group"
    """advantage scaling: divide by the group's std (group), the batch's (batch), or none"""
    baseline: str = "mean"
    """advantage baseline: the group mean, or rloo (leave-one-out mean)"""
    drop_zero_variance_groups: bool = False
    """drop groups whose rewards are all equal from the batch (false: they stay with advantage 0 and count in the
    loss's normaliser, as TRL and verl keep them)"""
    advantage_std_eps: float = 1e-4
    """added to the reward std of the z-score (TRL: 1e-4; verl, which DARE builds on: 1e-6)"""

    def check(self):
        if not (is_number(self.advantage_std_eps) and self.advantage_std_eps >= 0):
            raise ValueError(f"advantage_std_eps must be a number >= 0, got {self.advantage_std_eps!r}")
        _choice("scale_rewards", self.scale_rewards, SCALE_CHOICES)
        _choice("baseline", self.baseline, BASELINE_CHOICES)
        if not isinstance(self.drop_zero_variance_groups, bool):
            raise ValueError(f"drop_zero_variance_groups must be true or false, got {self.drop_zero_variance_groups!r}")


@dataclass
class TokenAggregation(OptionGroup):
    loss_type: str = "bnpo"
    """token-loss reduction: grpo (mean of sequence means), bnpo (token mean of each minibatch), dr_grpo
    (sum / B·L), dapo (sum / the active tokens of the whole batch, across minibatches)"""

    def check(self):
        _choice("loss_type", self.loss_type, LOSS_TYPES)


@dataclass
class SequenceRatio(OptionGroup):
    importance_sampling_level: str = "token"
    """token ratios, or sequence (GSPO's length-normalised sequence ratio)"""

    def check(self):
        _choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))


@dataclass
class Likelihood(OptionGroup):
    estimator: str = "d1"
    """likelihood estimator: d1, random_ratio, coupled, elbo, elbo_pair, block, quadrature, trajectory, exact_ar"""
    estimator_kwargs: dict = field(default_factory=dict)
    """the estimator's options, e.g. {p_mask_prompt: 0.15}, {mc_num: 8}, {shrink: 1}"""

    def check(self):
        from dare_gym.core.estimators import ESTIMATORS

        _choice("estimator", self.estimator, sorted(ESTIMATORS))
        if not isinstance(self.estimator_kwargs, dict):
            raise ValueError(f"estimator_kwargs must be a mapping, got {self.estimator_kwargs!r}")


@dataclass
class ResponseMask(OptionGroup):
    response_mask: str = "through_eos"
    """completion positions the loss scores: all (EOS padding included, DARE's LLaDA/Dream actors), through_eos
    (up to and including the first EOS: d1, TRL), through_stop (up to the first EOS or end-of-turn token) or
    before_eos (the tokens before the first EOS: TraceRL)"""

    def check(self):
        _choice("response_mask", self.response_mask, RESPONSE_MASKS)


@dataclass
class RolloutCorrection(OptionGroup):
    rollout_is_cap: float | None = None
    """weight each token's loss by min(π_old/π_rollout, cap), the truncated importance weight that corrects
    rollouts from approximate caches (fast_dllm); needs the trajectory estimator; null: off"""

    def check(self):
        _positive_or_null("rollout_is_cap", self.rollout_is_cap)
        if self.rollout_is_cap is not None and getattr(self, "estimator", "trajectory") != "trajectory":
            raise ValueError("rollout_is_cap compares each token's log-prob in the state that committed it: it "
                             f"needs estimator 'trajectory', got {self.estimator!r}")
