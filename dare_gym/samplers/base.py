"""The sampler interface, the sampler registry, and the pieces every denoising sampler shares.

A sampler turns left-padded prompts into completions through the policy's family forward
(``policy.logits(ids, mask, cache=..., logits_to_keep=..., position_ids=...)``), and returns beside the tokens
the denoising trace trajectory methods replay:

    out = SAMPLERS["fast_dllm"](policy, prompt_ids, prompt_mask, options, generator=g, record_predictions=False)
    out.completion_ids, out.unmask_step, out.commit_logp, out.model_calls, out.tokens_processed

A sampler is one file: an options dataclass (validated, with the names users pass to ``policy.generate`` and
``rollout.sampler_options``) and a class registered with :func:`register_sampler`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dare_gym.registries import Registry

from dare_gym.core.device import uniform


@dataclass
class SamplerOutput:
    """Completions and how they were denoised.

    ``unmask_step`` is the (0-based) model call of the row's decoding at which each token was committed;
    ``commit_logp`` the untempered log-probability the forward that committed a token gave it (what the rollout
    policy believed: with an approximate cache it differs from a full forward's, which is what the
    rollout/train mismatch measures). ``model_calls`` counts forwards, ``tokens_processed`` the query tokens
    they ran (batch × length summed), the cost caches cut.
    """

    completion_ids: torch.Tensor  # [B, G]
    unmask_step: torch.Tensor  # [B, G]
    commit_logp: torch.Tensor  # [B, G] float32
    model_calls: int
    tokens_processed: int
    step_predictions: torch.Tensor | None = None  # [B, steps, G] x̂₀ at every step (record_predictions)
    step_confidence: torch.Tensor | None = None  # [B, steps, G] its probability; committed positions hold 1
    # (the sampler's own confidence, or with ``tempered_confidence`` the probability under softmax(logits / T))
    trace: dict[str, torch.Tensor] | None = None  # sampler-specific replay record, rows first (DiffusionGemma's
    # canvases and acceptance masks per step); each row's slice travels with its completion into the buffer

    @property
    def num_forward_passes(self) -> int:
        return self.model_calls


@dataclass
class SamplerOptions:
    """Options every sampler takes."""

    gen_length: int = 64
    """tokens generated after each prompt"""
    temperature: float = 0.0
    """sampling temperature of each prediction (Gumbel-max in float64); 0 is greedy"""
    tempered_confidence: bool = False
    """confidences under softmax(logits / temperature), the distribution each guess is drawn from, instead of
    softmax(logits): the low-confidence rule commits by them and record_predictions records them (MDPO's
    official sampler); greedy (temperature 0) is unchanged"""
    min_new_tokens: int = 0
    """no stop token (EOS, end of turn) is drawn at the first this many completion positions, so a completion
    holds at least this many tokens (a rollout-side constraint, like vLLM's min_tokens)"""

    def __post_init__(self):
        if not isinstance(self.gen_length, int) or isinstance(self.gen_length, bool) or self.gen_length < 1:
            raise ValueError(f"gen_length must be a positive integer, got {self.gen_length!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.tempered_confidence, bool):
            raise ValueError(f"tempered_confidence must be true or false, got {self.tempered_confidence!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.gen_length:
            raise ValueError(f"min_new_tokens must be an integer in [0, gen_length={self.gen_length}], "
                             f"got {self.min_new_tokens!r}")


class Sampler:
    """Base class: ``name``, ``options_class``, and ``__call__(policy, prompt_ids, prompt_mask, options, *,
    generator, record_predictions) -> SamplerOutput``.

    Prefill: a sampler with ``accepts_prefill`` also takes ``prefill=`` [B, gen_length] long, the completion's
    tokens fixed in advance (the mask id where the sampler generates): they sit in the canvas from the start,
    every forward sees them, no step commits or remasks them (their ``unmask_step`` is -1, their
    ``commit_logp`` 0), and the schedule spreads only the free positions over the steps. IGPO inpaints gold
    reasoning this way. ``policy.generate(..., prefill=...)`` refuses a sampler without it."""

    name: ClassVar[str]
    options_class: ClassVar[type] = SamplerOptions
    takes_min_new_tokens: ClassVar[bool] = False  # its scoring step calls suppress_stop_tokens
    accepts_prefill: ClassVar[bool] = False

    def __call__(self, policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options,
                 *, generator: torch.Generator | None = None, record_predictions: bool = False) -> SamplerOutput:
        raise NotImplementedError

    def data_dependent_steps(self, options) -> str | None:
        """Why the number of forwards this sampler makes depends on the data (a confidence threshold, an early
        exit), in words that say which options to change, or None when it is fixed by the options: a sharded
        (FSDP) run needs every rank to make the same number."""
        return None

    def after_update(self, policy, options) -> None:
        """Called by the trainer after each update of the policy (a served backend syncs weights); nothing here."""

    def left_to_right(self, policy, gen_length: int) -> dict[str, Any]:
        """The options that make this sampler decode one token per step, left to right (JustGRPO's rollouts,
        whose exact likelihood is the autoregressive one); a sampler that cannot says why."""
        raise ValueError(f"sampler {self.name!r} cannot decode left to right, one token per step")


SAMPLERS: Registry = Registry("sampler")


def register_sampler(name: str):
    """Class decorator: ``@register_sampler("llada")`` on a :class:`Sampler` subclass (one instance serves every
    call: a sampler keeps no state between calls)."""

    def add(cls: type) -> type:
        cls.name = name
        SAMPLERS.add(name, cls())
        return cls

    return add


def get_sampler(name: str) -> Sampler:
    return SAMPLERS.lookup(name)


def make_options(name: str, values: dict[str, Any]):
    """The options dataclass of sampler ``name`` from a mapping; unknown keys and bad values name themselves."""
    options_class = get_sampler(name).options_class
    fields = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(sorted(fields))}")
    return options_class(**values)


def choose_options(name: str, defaults: dict[str, Any], options: dict[str, Any], *, default_sampler: str,
                   block_size: int | None, named: bool):
    """Sampler ``name``'s validated options from a policy's generation ``defaults`` (those it does not take are
    left out) and a call's explicit ``options`` (one it does not take is an error naming it and the samplers
    that take it). ``named``: whether the call named the sampler (else it is the policy's own,
    ``default_sampler``). A schedule error of a full-attention sampler on a block-causal model (``block_size``)
    says so and names the model's own sampler."""
    fields = {f.name for f in dataclasses.fields(get_sampler(name).options_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        owners = [other for other in SAMPLERS.names()
                  if set(unknown) <= {f.name for f in dataclasses.fields(get_sampler(other).options_class)}]
        which = f"sampler {name!r}" if named else f"the policy's own sampler {name!r} (sampler is not set)"
        hint = (f"; {'they are options' if len(unknown) > 1 else 'it is an option'} of {', '.join(owners)}: set "
                f"sampler={owners[0]}") if owners else f"; its options: {', '.join(sorted(fields))}"
        raise ValueError(f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not taken by {which}{hint}")
    values = {k: v for k, v in defaults.items() if k in fields and k != "sampler"}
    values.update(options)
    if values.get("min_new_tokens") and not get_sampler(name).takes_min_new_tokens:
        raise ValueError(f"sampler {name!r} does not take min_new_tokens (llada, fast_dllm and block_diffusion do)")
    try:
        return make_options(name, values)
    except ValueError as error:
        if block_size is None or name == default_sampler:
            raise
        raise ValueError(f"the policy is block-causal (blocks of {block_size} tokens) and sampler {name!r} decodes "
                         f"it with the policy's defaults only if its block_length is a multiple of {block_size} "
                         f"dividing gen_length ({error}); its own sampler is {default_sampler}: set "
                         f"sampler={default_sampler} or leave sampler unset") from None


# ------------------------------------------------------------------------------------------ shared pieces


class LastPositionsOnly:
    """A policy whose ``logits`` takes only a count of last positions as ``logits_to_keep`` (a stand-in written
    for a test, a family whose forward is not one stack over one sequence), seen as one that takes columns: a
    request for columns becomes the span from the first of them to the end, from which they are picked."""

    def __init__(self, policy):
        self.policy = policy

    def __getattr__(self, name: str):
        return getattr(self.policy, name)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, logits_to_keep=0,
               **options) -> torch.Tensor:
        if not isinstance(logits_to_keep, torch.Tensor):
            return self.policy.logits(input_ids, attention_mask, logits_to_keep=logits_to_keep, **options)
        first = int(logits_to_keep.min()) if logits_to_keep.numel() else input_ids.shape[1] - 1
        span = self.policy.logits(input_ids, attention_mask, logits_to_keep=input_ids.shape[1] - first, **options)
        return span[:, logits_to_keep - first]


def column_scoring(policy):
    """``policy`` itself where its ``logits`` scores chosen columns (``policy.scores_columns``), else a
    :class:`LastPositionsOnly` view of it: what the samplers call, so that they ask for columns throughout."""
    return policy if getattr(policy, "scores_columns", False) else LastPositionsOnly(policy)


def tokens_per_step(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each of ``steps`` steps commits, per row: an even split, remainder on the first steps.

    ``masked_count`` is [B]; the result is [B, steps]. Example: 4 tokens over 3 steps -> [2, 1, 1].
    """
    base = masked_count[:, None] // steps
    remainder = masked_count[:, None] % steps
    step_index = torch.arange(steps, device=masked_count.device)[None, :]
    return base + (step_index < remainder).long()


def suppress_stop_tokens(logits: torch.Tensor, positions: torch.Tensor, min_new_tokens: int,
                         stop_ids: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, C, V] with the stop tokens' logits at -inf where a column's completion position
    (``positions``, [C] or [B, C]; negative for prompt columns) is below ``min_new_tokens``, so that no sampler
    draws or commits a stop token there (``min_new_tokens``); ``logits`` itself when nothing is suppressed."""
    early = (positions >= 0) & (positions < min_new_tokens)
    if min_new_tokens <= 0 or not bool(early.any()):
        return logits
    stops = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    stops[stop_ids.to(logits.device)] = True
    return logits.masked_fill(early.expand(logits.shape[:2])[..., None] & stops, float("-inf"))


def gumbel_max_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / temperature) by the Gumbel-max trick, in float64.

    Low-precision Gumbel noise measurably lowers sample quality (LLaDA's note on ``add_gumbel_noise``), so
    the noise and the perturbed scores are float64. ``temperature == 0`` is greedy.
    """
    if temperature == 0:  # max's indices are argmax's (the first maximal value), and max is about twice as fast
        return logits.max(dim=-1).indices
    u = uniform(logits.shape, generator, logits.device, torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    # argmax(exp(l) / (-log u)^T) == argmax(l - T log(-log u)); the log form cannot overflow.
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


def best_and_log_normaliser(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, logsumexp in float64) of ``logits`` over the vocabulary, [B, C, V] -> [B, C] each.

    The same values as ``logits.argmax(-1)`` and ``torch.logsumexp(logits.double(), -1)`` (each row is reduced
    alone either way; max's indices are argmax's, the first maximal value), but on CPU computed row by row: a
    row (0.5 MB at a 126k vocabulary) is read from memory once, and its float64 copy, in one reused buffer, stays
    in cache, where the whole [B, C, V] tensor and its float64 copy would stream through memory several times
    (at a compute-bound shape that was a fifth of a cached decoding step)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] <= 1 or logits.device.type != "cpu":
        return logits.max(dim=-1).indices, torch.logsumexp(logits.double(), dim=-1)
    best = torch.empty(flat.shape[0], dtype=torch.long)
    sums, highest = torch.empty(flat.shape[0], dtype=torch.float64), torch.empty(flat.shape[0], dtype=torch.float64)
    widened = torch.empty(flat.shape[1], dtype=torch.float64)
    for index, row in enumerate(flat):
        value, best[index] = row.max(dim=-1)
        top = value.double()  # torch.logsumexp's own steps: amax (an infinite one taken as 0), subtract, exp, sum
        top = top.masked_fill(top.abs() == float("inf"), 0.0)
        highest[index] = top
        sums[index] = widened.copy_(row).sub_(top).exp_().sum()
    shape = logits.shape[:-1]
    return best.view(shape), (sums.log_() + highest).view(shape)


def propose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """(x̂₀, its probability under softmax(logits) in float64, its untempered log-probability in float32)."""
    best, normaliser = best_and_log_normaliser(logits)
    predicted = best if temperature == 0 else gumbel_max_sample(logits, temperature, generator)
    # gather, then widen: the same float64 values as widening the whole [B, C, V] first (widening is exact)
    logp = logits.gather(-1, predicted[..., None]).squeeze(-1).double() - normaliser
    return predicted, logp.exp(), logp.float()


def tempered_probability(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """The probability of ``tokens`` under softmax(logits / temperature), in float64; temperature 0 means
    softmax(logits), as in the official MDPO sampler, which divides only when it samples."""
    scaled = logits.double() / temperature if temperature > 0 else logits.double()
    return (scaled.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)).exp()


def check_prefill(prefill: torch.Tensor | None, batch: int, gen_length: int) -> None:
    """A prefill must be a [batch, gen_length] integer tensor (the mask id where the sampler generates)."""
    if prefill is None:
        return
    if not isinstance(prefill, torch.Tensor) or prefill.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"prefill must be an integer tensor [batch, gen_length], got {type(prefill).__name__}"
                         + (f" of {prefill.dtype}" if isinstance(prefill, torch.Tensor) else ""))
    if tuple(prefill.shape) != (batch, gen_length):
        raise ValueError(f"prefill has shape {tuple(prefill.shape)}, expected (batch, gen_length) = "
                         f"({batch}, {gen_length})")


def write_prefill(completion: torch.Tensor, prefill: torch.Tensor | None, mask_id: int) -> None:
    """Write the prefilled tokens (every entry but the mask id) into a canvas's completion columns, in place
    (``completion``: a view of them, [B, gen_length])."""
    if prefill is not None:
        fixed = prefill.to(completion.device) != mask_id
        completion[fixed] = prefill.to(completion.device, torch.long)[fixed]


def first_stop_done(completion: torch.Tensor, mask_token_id: int, stop_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row has committed a stop token with nothing masked before it (the rest cannot matter)."""
    is_stop = torch.isin(completion, stop_ids)
    masked_before = (completion == mask_token_id).long().cumsum(dim=1) - (completion == mask_token_id).long()
    return (is_stop & (masked_before == 0)).any(dim=1)


def fill_after_stop(completion: torch.Tensor, unmask_step: torch.Tensor, mask_token_id: int, stop_id: int,
                    step: int) -> None:
    """Early exit: positions still masked (all after a row's stop token) become the stop token at ``step``."""
    still = completion == mask_token_id
    completion.masked_fill_(still, stop_id)
    unmask_step.masked_fill_(still, step)


def top_n(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: each row's ``counts[b]`` highest confidences (candidates have finite confidence)."""
    chosen = confidence.topk(int(counts.max().clamp(min=0)), dim=-1).indices
    keep = torch.arange(chosen.shape[1], device=confidence.device)[None, :] < counts[:, None]
    commit = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    rows = torch.arange(confidence.shape[0], device=confidence.device)[:, None].expand_as(chosen)
    commit[rows[keep], chosen[keep]] = True
    return commit & torch.isfinite(confidence)


def build_output(x, prompt_length, unmask_step, commit_logp, calls, processed, predictions, confidences) -> SamplerOutput:
    recorded = {}
    if predictions:
        recorded = dict(step_predictions=torch.stack(predictions, dim=1), step_confidence=torch.stack(confidences, dim=1))
    return SamplerOutput(completion_ids=x[:, prompt_length:], unmask_step=unmask_step, commit_logp=commit_logp,
                         model_calls=calls, tokens_processed=processed, **recorded)


def update_guess(guess, guess_confidence, logits, first, prompt_length, temperature: float = 0.0) -> None:
    """Greedy guesses and their probabilities (under softmax(logits / temperature) where ``temperature`` > 0) for
    every completion column this forward computed (they do not touch the random stream); columns a cached
    forward skipped keep their last guess."""
    offset = max(prompt_length - first, 0)
    fresh = logits[:, offset:].double()
    if fresh.shape[1] == 0:
        return
    start = first + offset - prompt_length
    probs = torch.softmax(fresh / temperature if temperature > 0 else fresh, dim=-1)
    best = probs.max(dim=-1)
    guess[:, start:start + fresh.shape[1]] = best.indices
    guess_confidence[:, start:start + fresh.shape[1]] = best.values.float()


def record_step(predictions, confidences, x, guess, guess_confidence, columns, predicted, probability, masked,
            prompt_length, mask_id) -> None:
    """This step's x̂₀ over the completion: the step's own predictions at the candidate columns, greedy guesses
    for masked positions further right, committed tokens elsewhere (with confidence 1)."""
    completion = x[:, prompt_length:]
    step_guess = torch.where(completion == mask_id, guess, completion)
    step_confidence = torch.where(completion == mask_id, guess_confidence, torch.ones_like(guess_confidence))
    in_completion = columns >= prompt_length
    positions = columns[in_completion] - prompt_length
    own = masked[:, in_completion]
    step_guess[:, positions] = torch.where(own, predicted[:, in_completion], step_guess[:, positions])
    step_confidence[:, positions] = torch.where(own, probability[:, in_completion].float(),
                                                step_confidence[:, positions])
    predictions.append(step_guess)
    confidences.append(step_confidence)


__all__ = ["SamplerOutput", "SamplerOptions", "Sampler", "SAMPLERS", "register_sampler", "get_sampler",
           "make_options", "choose_options", "suppress_stop_tokens", "check_prefill", "write_prefill", "column_scoring",
           "LastPositionsOnly", "tokens_per_step", "gumbel_max_sample", "best_and_log_normaliser", "propose",
           "tempered_probability", "first_stop_done", "fill_after_stop", "update_guess", "record_step", "top_n",
           "build_output"]
