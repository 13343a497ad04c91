"""DiffusionGemma's entropy-bound sampler, inside the sampler interface, recording what RL replays.

This is this project's own implementation of the decoding loop that transformers' ``DiffusionGemmaForBlockDiffusion
.generate()`` runs (``generation_diffusion_gemma.py``: ``EntropyBoundSampler``, ``LinearTemperatureSchedule
LogitsProcessor``, ``StableAndConfidentStoppingCriteria``), written against its documented behaviour; the model
itself is the native class, called through the family (:meth:`DiffusionGemmaFamily.canvas_forward`). For each
canvas of ``canvas_length`` tokens (block-autoregressive: canvas j sees the prompt and canvases 0..j-1 through the
encoder's cache):

1. the canvas starts as uniform random tokens (ids 0..V-1);
2. step s = 0..K-1 (K = ``max_denoising_steps``, as generate names it; generate counts the same steps down,
   n = K-s) runs the decoder on the canvas with the previous step's processed logits as self-conditioning
   (none at s = 0) and divides the logits by the schedule's temperature T_s = t_min + (t_max - t_min)·n/K;
3. every position proposes a token drawn from softmax(logits / T_s) (``temperature`` scales that draw:
   1 is generate's, 0 the argmax);
4. **entropy-bound acceptance**: positions sorted by increasing entropy H of softmax(logits / T_s); the first k
   are accepted, the largest k with Σ_{j<k} H_(j) ≤ ``entropy_bound`` (the summed entropies without the largest
   one: a bound on the accepted tokens' mutual information); accepted positions take their proposal, the others
   are **renoised** with fresh uniform tokens;
5. a row stops denoising this canvas once its argmax canvas has not changed for ``stability_threshold`` steps
   and its mean entropy is below ``confidence_threshold`` (after that its canvas, argmax and self-conditioning stay
   frozen while the other rows go on); the canvas's tokens are the **argmax** of the row's last step;
6. a row whose canvas holds a stop token is finished; with ``pad_after_stop`` the tokens after its first one, and
   every later canvas, become the generation config's pad token, as generate writes them (by default they stay
   the model's own tokens, which RL may score: the masked families' EOS padding is the model's output too); once
   every row is finished the remaining canvases are not decoded (pad, or the first stop token, ``filled``).

A greedy call (``temperature=0``) without a generator draws its canvas noise from a fixed seed, so greedy decoding
is deterministic. With ``temperature=1``, ``pad_after_stop`` and a generator seeded as torch's global stream, this
draws the same random numbers in the same order as ``generate()`` (canvas ``randint``, one ``multinomial`` per step,
one ``randint`` to renoise) and returns its tokens, which ``tests/test_diffusion_gemma.py`` checks. Unlike generate,
prompts of different lengths are left-padded with positions counted per row, and a completion is always
``gen_length`` tokens.

**The trace.** Beside the tokens, for RL (:mod:`dare_gym.core.uniform_estimators` replays it):
``trace["canvas"]`` [B, G, C] the decoder's input canvas at each global step g = j·K + s of canvas j,
``trace["accepted"]`` [B, G, C] the positions accepted at that step, ``trace["active"]`` [B, G] whether the row was
still denoising, ``trace["temperature"]`` [B, G] T_s, ``trace["filled"]`` [B, L] the positions the sampler wrote
without the model (pad, or the canvases after every row finished). A final token's **acceptance step**
(``unmask_step``) is the first step of the last run of steps, up to the row's last one, in which its position was
accepted with that very token; a token never accepted in that run (the argmax read out at the last step differs
from the last accepted proposal, or was never accepted) counts as accepted at the last step. ``commit_logp`` is the
token's log-probability under softmax(logits / T_s) at its acceptance step — the step distribution the proposals
are drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.samplers.base import Sampler, SamplerOptions, SamplerOutput, register_sampler

GREEDY_SEED = 0  # the canvas noise of greedy calls made without a generator


@dataclass
class DiffusionGemmaOptions(SamplerOptions):
    """The entropy-bound sampler's settings; None takes the checkpoint's ``generation_config.json`` (else
    transformers' defaults: 48 steps, entropy bound 0.1, temperatures 0.8 -> 0.4, stable 1 step, confidence
    0.005)."""

    temperature: float = 1.0
    """scale of the proposal temperature: tokens are drawn from softmax(logits / (T_s · temperature)); 1 is
    generate()'s sampler, 0 proposes the argmax (acceptance and self-conditioning always use logits / T_s)"""
    max_denoising_steps: int | None = None
    """the most denoising steps per canvas, K (generate's name; a policy's generic ``steps`` default is not it)"""
    entropy_bound: float | None = None
    """accept the lowest-entropy positions while their entropies, less the largest, sum to at most this"""
    t_min: float | None = None
    """the schedule's temperature at the last step"""
    t_max: float | None = None
    """the schedule's temperature at step n = K (the first step's is t_min + (t_max - t_min)·K/K = t_max)"""
    stability_threshold: int | None = None
    """a row stops once its argmax canvas is unchanged for this many steps (and confident); 0: stability holds"""
    confidence_threshold: float | None = None
    """... and the mean entropy of its processed logits is below this"""
    early_stop: bool = True
    """apply the stable-and-confident stop (false: every canvas runs all its steps)"""
    pad_after_stop: bool = False
    """write the generation config's pad token after a row's first stop token and over its later canvases, as
    generate() does (false: keep the model's own tokens there, which a loss may score, as EOS padding is scored on
    the masked families)"""

    def __post_init__(self):
        super().__post_init__()
        if self.tempered_confidence:
            raise ValueError("tempered_confidence does not apply to the diffusion_gemma sampler: it accepts by the "
                             "entropy of softmax(logits / T_s) already")
        checks = (("max_denoising_steps", int, lambda v: v >= 1, "a positive integer"),
                  ("entropy_bound", (int, float), lambda v: v > 0, "a number > 0"),
                  ("t_min", (int, float), lambda v: v >= 0, "a number >= 0"),
                  ("t_max", (int, float), lambda v: v > 0, "a number > 0"),
                  ("stability_threshold", int, lambda v: v >= 0, "an integer >= 0"),
                  ("confidence_threshold", (int, float), lambda v: v > 0, "a number > 0"))
        for name, kind, ok, what in checks:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not ok(value)):
                raise ValueError(f"{name} must be {what} or null, got {value!r}")
        if self.t_min is not None and self.t_max is not None and not self.t_max > self.t_min:
            raise ValueError(f"t_max must be > t_min, got t_min={self.t_min!r}, t_max={self.t_max!r}")
        for name in ("early_stop", "pad_after_stop"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


def resolved_settings(policy, options: DiffusionGemmaOptions) -> dict:
    """The options with every None replaced by the checkpoint's generation config value."""
    from dare_gym.models.diffusion_gemma import read_generation_config

    checkpoint = read_generation_config(policy.model)
    values = {
        "steps": (options.max_denoising_steps if options.max_denoising_steps is not None
                  else checkpoint["max_denoising_steps"]),
        "entropy_bound": options.entropy_bound if options.entropy_bound is not None else checkpoint["entropy_bound"],
        "t_min": options.t_min if options.t_min is not None else checkpoint["t_min"],
        "t_max": options.t_max if options.t_max is not None else checkpoint["t_max"],
        "stability_threshold": (options.stability_threshold if options.stability_threshold is not None
                                else checkpoint["stability_threshold"]),
        "confidence_threshold": (options.confidence_threshold if options.confidence_threshold is not None
                                 else checkpoint["confidence_threshold"]),
        "pad_token_id": checkpoint["pad_token_id"],
    }
    if not values["t_max"] > values["t_min"]:
        raise ValueError(f"t_max must be > t_min, got t_min={values['t_min']!r}, t_max={values['t_max']!r}")
    return values


def schedule_temperature(step: int, steps: int, t_min: float, t_max: float) -> float:
    """T at step ``step`` (0-based) of ``steps``: generate's linear schedule at n = steps − step remaining."""
    return t_min + (t_max - t_min) * ((steps - step) / steps)


def step_entropy(processed: torch.Tensor) -> torch.Tensor:
    """[B, C] entropy of softmax(processed) per position (torch's categorical entropy, float32)."""
    return torch.distributions.Categorical(logits=processed).entropy()


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """[B, C] bool: per row, the lowest-entropy positions, as many as keep (sum of their entropies) − (the largest
    of them) within ``bound``. Sorted ascending, the k-th accepted position's prefix sum less its own entropy is the
    sum of the k−1 before it, so the rule is prefix_sum − own ≤ bound."""
    ordered, order = torch.sort(entropy, dim=-1)
    keep = (ordered.cumsum(dim=-1) - ordered) <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def acceptance_steps(accepted: torch.Tensor, proposals: torch.Tensor, final: torch.Tensor,
                     last: torch.Tensor) -> torch.Tensor:
    """[B, C] each final token's acceptance step: the first step of the last run of steps ending at the row's last
    step ``last`` [B] in which the position was accepted with the final token; ``last`` where there is no such run.
    ``accepted``, ``proposals``: [B, K, C] per step (steps after ``last`` ignored); ``final``: [B, C]."""
    held = accepted & (proposals == final[:, None, :])
    start = last[:, None].expand_as(final).clone()
    alive = torch.ones_like(final, dtype=torch.bool)  # the run from the last step back is unbroken so far
    for s in range(accepted.shape[1] - 1, -1, -1):
        in_range = (s <= last)[:, None]
        hit = alive & in_range & held[:, s]
        start = torch.where(hit, torch.full_like(start, s), start)
        alive = torch.where(in_range, hit, alive)
    return start


@register_sampler("diffusion_gemma")
class DiffusionGemmaSampler(Sampler):
    options_class = DiffusionGemmaOptions

    @torch.no_grad()
    def __call__(self, policy, prompt_ids, prompt_mask, options, *, generator=None, record_predictions=False):
        if record_predictions:
            raise ValueError("the diffusion_gemma sampler records its canvases in the trace, not per-step x̂₀ "
                             "guesses of masked positions (record_predictions, MDPO)")
        if generator is None and options.temperature == 0:
            # greedy decoding still draws its canvases: from a fixed seed, so that it is a deterministic function of
            # the batch, as greedy decoding of the masked families is (and held-out scores compare like with like)
            generator = torch.Generator(device=prompt_ids.device).manual_seed(GREEDY_SEED)
        family = policy.family
        model = policy.forward_module or policy.model
        config = getattr(policy.model, "config", None)
        size = family.canvas_length(config)
        if options.gen_length % size:
            raise ValueError(f"gen_length must be a multiple of the model's canvas_length ({size}): DiffusionGemma "
                             f"generates whole canvases, got gen_length={options.gen_length}")
        settings = resolved_settings(policy, options)
        steps, vocab = settings["steps"], family.vocab_size(config)
        rows, device = prompt_ids.shape[0], prompt_ids.device
        canvases = options.gen_length // size
        stops = torch.tensor(policy.stop_token_ids, device=device)
        pad = settings["pad_token_id"] if options.pad_after_stop else None
        if options.pad_after_stop and pad is None:
            raise ValueError("pad_after_stop needs a pad_token_id in the checkpoint's generation config; it has none")

        completion = torch.zeros((rows, options.gen_length), dtype=torch.long, device=device)
        unmask_step = torch.zeros_like(completion)
        commit_logp = torch.zeros(completion.shape, dtype=torch.float32, device=device)
        filled = torch.zeros(completion.shape, dtype=torch.bool, device=device)
        trace_canvas = torch.zeros((rows, canvases * steps, size), dtype=torch.int32, device=device)
        trace_accepted = torch.zeros((rows, canvases * steps, size), dtype=torch.bool, device=device)
        trace_active = torch.zeros((rows, canvases * steps), dtype=torch.bool, device=device)
        trace_temperature = torch.ones((rows, canvases * steps), dtype=torch.float32, device=device)

        cache = family.new_cache(model)
        context_mask, pending = prompt_mask.long(), prompt_ids
        finished = torch.zeros(rows, dtype=torch.bool, device=device)  # a stop token in an earlier canvas
        calls = processed_tokens = 0
        for j in range(canvases):
            columns = slice(j * size, (j + 1) * size)
            if bool(finished.all()):  # generate stops here: the rest is pad, or the first stop token (EOS padding)
                completion[:, j * size:] = pad if pad is not None else policy.stop_token_ids[0]
                filled[:, j * size:] = True
                unmask_step[:, j * size:] = j * steps
                break
            canvas = torch.randint(0, vocab, (rows, size), device=device, generator=generator)
            argmax = canvas.clone()
            self_conditioning = None
            done = torch.zeros(rows, dtype=torch.bool, device=device)  # stopped denoising this canvas
            history = None
            proposals = torch.zeros((rows, steps, size), dtype=torch.long, device=device)
            accepted_steps = torch.zeros((rows, steps, size), dtype=torch.bool, device=device)
            proposal_logp = torch.zeros((rows, steps, size), dtype=torch.float32, device=device)
            readout_logp = torch.zeros((rows, size), dtype=torch.float32, device=device)
            last = torch.zeros(rows, dtype=torch.long, device=device)
            for s in range(steps):
                g = j * steps + s
                active = ~done
                trace_canvas[:, g] = canvas.to(torch.int32)
                skipped = finished if pad is not None else torch.zeros_like(finished)  # canvases the pad overwrites
                trace_active[:, g] = active & ~skipped
                temperature = schedule_temperature(s, steps, settings["t_min"], settings["t_max"])
                trace_temperature[:, g] = temperature
                logits = family.canvas_forward(model, cache, context_ids=pending, context_mask=context_mask,
                                               canvas_ids=canvas, self_conditioning=self_conditioning)
                calls += 1
                processed_tokens += rows * (size + (pending.shape[1] if pending is not None else 0))
                pending = None
                processed = logits / temperature
                proposal = self.propose(processed, options.temperature, vocab, generator)
                new_argmax = processed.argmax(dim=-1)
                entropy = step_entropy(processed)
                accepted = entropy_bound_accept(entropy, settings["entropy_bound"])
                renoise = torch.randint(0, vocab, (rows, size), device=device, generator=generator)
                new_canvas = torch.where(accepted, proposal, renoise)
                log_normaliser = processed.logsumexp(dim=-1)
                logp = processed.gather(-1, proposal[..., None]).squeeze(-1) - log_normaliser
                argmax_logp = processed.gather(-1, new_argmax[..., None]).squeeze(-1) - log_normaliser
                # this step's record for the rows still denoising (a stopped row's step is discarded, as generate does)
                proposals[:, s] = torch.where(active[:, None], proposal, proposals[:, s])
                accepted_steps[:, s] = accepted & active[:, None]
                proposal_logp[:, s] = logp
                readout_logp = torch.where(active[:, None], argmax_logp, readout_logp)
                last = torch.where(active, torch.full_like(last, s), last)
                trace_accepted[:, g] = accepted & active[:, None] & ~skipped[:, None]
                if options.early_stop:
                    if bool(done.any()):  # stopped rows keep their canvas, argmax and self-conditioning
                        new_argmax = torch.where(done[:, None], argmax, new_argmax)
                        new_canvas = torch.where(done[:, None], canvas, new_canvas)
                        processed = torch.where(done[:, None, None], self_conditioning.to(processed.dtype), processed)
                    stable, history = self.stable(new_argmax, history, settings["stability_threshold"])
                    confident = step_entropy(processed).mean(dim=-1) < settings["confidence_threshold"]
                    done = done | (stable & confident)
                canvas, argmax = new_canvas, new_argmax
                self_conditioning = processed.to(_embedding_dtype(policy.model))
                if bool(done.all()):
                    break
            # the canvas is the argmax of each row's last step; each token's acceptance step and log-prob: a token
            # held (accepted with this value) at the last step is scored where its run began, a read-out one
            # under the last step's distribution
            start = acceptance_steps(accepted_steps, proposals, argmax, last)
            at_last = last[:, None, None].expand(-1, 1, size)
            held_at_last = (accepted_steps.gather(1, at_last) & (proposals.gather(1, at_last) == argmax[:, None])).squeeze(1)
            token_logp = torch.where(held_at_last, proposal_logp.gather(1, start[:, None, :]).squeeze(1), readout_logp)
            tokens = argmax.clone()
            pad_rule = torch.zeros_like(tokens, dtype=torch.bool)
            if pad is not None:  # generate's finalisation: pad after the first stop token, pad after a finished row
                is_stop = torch.isin(tokens, stops)
                after_stop = (is_stop.long().cumsum(dim=-1) - is_stop.long()) > 0
                pad_rule = after_stop | finished[:, None]
                tokens = tokens.masked_fill(pad_rule, pad)
            completion[:, columns] = tokens
            unmask_step[:, columns] = j * steps + torch.where(pad_rule, last[:, None], start)
            commit_logp[:, columns] = torch.where(pad_rule, torch.zeros_like(token_logp), token_logp)
            filled[:, columns] = pad_rule
            finished = finished | torch.isin(argmax, stops).any(dim=-1)
            pending, context_mask = tokens, torch.cat([context_mask, torch.ones_like(tokens)], dim=1)
        trace = {"canvas": trace_canvas, "accepted": trace_accepted, "active": trace_active,
                 "temperature": trace_temperature, "filled": filled}
        return SamplerOutput(completion_ids=completion, unmask_step=unmask_step, commit_logp=commit_logp,
                             model_calls=calls, tokens_processed=processed_tokens, trace=trace)

    @staticmethod
    def propose(processed: torch.Tensor, temperature: float, vocab: int, generator) -> torch.Tensor:
        """One token per position from softmax(processed / temperature), by ``torch.multinomial`` on the float32
        probabilities (the draw generate makes at temperature 1); the argmax at temperature 0."""
        if temperature == 0:
            return processed.argmax(dim=-1)
        scaled = processed if temperature == 1 else processed / temperature
        probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
        drawn = torch.multinomial(probs.view(-1, vocab), num_samples=1, generator=generator)
        return drawn.view(processed.shape[:-1])

    @staticmethod
    def stable(argmax: torch.Tensor, history: torch.Tensor | None, threshold: int):
        """(stable [B], updated history): the argmax canvas equals each of the last ``threshold`` ones."""
        if threshold == 0:
            return torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device), history
        if history is None:  # nothing matches a canvas of -1 before the first steps
            history = torch.full((threshold, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
        stable = (history == argmax[None]).all(dim=-1).all(dim=0)
        history = torch.cat([history[1:], argmax[None]], dim=0)
        return stable, history


def _embedding_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype self-conditioning logits are handed back in (the decoder's embeddings')."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


__all__ = ["DiffusionGemmaOptions", "DiffusionGemmaSampler", "entropy_bound_accept", "acceptance_steps",
           "schedule_temperature", "step_entropy", "resolved_settings"]
