"""Rollouts from a served policy: the ``vllm`` sampler sends prompts to an OpenAI-compatible ``/v1/completions``
endpoint — ``vllm serve`` on a GPU machine (vLLM serves ``diffusion_gemma`` natively), or ``dare-gym serve`` — and
turns the answers into the sampler interface's output; after each update it can sync the trained weights back.

    dare-gym train policy=tiny-gemma rollout.sampler=vllm \
        'rollout.options={base_url: http://127.0.0.1:8000/v1, weight_sync: checkpoint, sync_folder: runs/x/sync}'

The parts and where they run:

* **CPU side** (this module, tested against ``dare-gym serve`` on loopback in ``tests/test_diffusion_gemma.py``):
  :func:`build_requests` (the prompts, formatted by the policy, in chunks of ``max_prompts_per_request``, with
  ``max_tokens = gen_length``, the temperature and a seed per request drawn from the run's generator),
  :func:`post_json`, :func:`parse_choices` (text, or token ids where the server returns them, into ids padded to
  ``gen_length``) and :class:`CheckpointWeightSync` (save the weights, ask the server to load them).
* **GPU side**: the server. ``vllm serve`` needs ``--max-num-seqs`` at least the rollout's rows per request
  (``max_prompts_per_request``; every row of a DiffusionGemma request denoises a canvas at once), ``--max-model-len``
  at least the longest prompt plus ``gen_length``, and for weight sync its weight-transfer API
  (``VLLM_SERVER_DEV_MODE=1 ... --weight-transfer-config '{"backend": "nccl"}'``): vLLM does not load a checkpoint
  folder over HTTP, so ``weight_sync: checkpoint`` is for ``dare-gym serve --allow-weight-loading`` (and any server
  with a ``POST /dare/load_weights {path}``); for vLLM register a sync that drives vLLM's own trainer-side weight
  transfer engine with :func:`register_weight_sync` (docs/UNIFORM_NOISE.md shows the recipe).

**What does not come back.** An OpenAI completion carries text (and from vLLM, per-token log-probs when asked),
never the denoising trace: no canvases, no acceptance steps. The sampler records the completion ids, ``unmask_step``
0 for every token (unknown), ``commit_logp`` the server's log-probs where given (else 0), and no trace. So the
algorithms that replay the trace (cj_grpo, tracerl on DiffusionGemma: ``uniform_trajectory``) refuse these rollouts
with that reason, and those that re-score completions from scratch (d1's ``uniform_corruption``, sft) train from
them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dare_gym.samplers.base import Sampler, SamplerOptions, SamplerOutput, register_sampler

WEIGHT_SYNCS: dict[str, Callable] = {}
"""name -> ``sync(policy, options)``: how the trained weights reach the server after an update."""


def register_weight_sync(name: str, sync: Callable) -> None:
    """Add a weight sync (``sync(policy, options)``), chosen by ``rollout.options.weight_sync``."""
    WEIGHT_SYNCS[name] = sync


@dataclass
class VLLMRolloutOptions(SamplerOptions):
    temperature: float = 1.0
    """the server's sampling temperature"""
    base_url: str = "http://127.0.0.1:8000/v1"
    """the OpenAI-compatible endpoint (ends in /v1)"""
    model: str | None = None
    """the served model's name (null: the first of GET /v1/models)"""
    max_prompts_per_request: int = 64
    """prompts per HTTP request (vllm serve's --max-num-seqs must be at least this)"""
    timeout_s: float = 600.0
    """seconds a request may take"""
    request_seed: int | None = None
    """the seed of every request (null: one drawn per request from the run's generator)"""
    extra: dict = field(default_factory=dict)
    """more request fields, sent as they are (e.g. a server's sampler settings)"""
    weight_sync: str | None = None
    """how updated weights reach the server after each update: checkpoint, a registered name, or null (never)"""
    sync_folder: str | None = None
    """where weight_sync checkpoint writes the weights the server loads (a folder both can read)"""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if not isinstance(self.max_prompts_per_request, int) or self.max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be a positive integer, got {self.max_prompts_per_request!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a number > 0, got {self.timeout_s!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {self.extra!r}")
        if self.weight_sync is not None and self.weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync must be null or one of {', '.join(sorted(WEIGHT_SYNCS))}, got "
                             f"{self.weight_sync!r}")
        if self.weight_sync == "checkpoint" and not self.sync_folder:
            raise ValueError("weight_sync checkpoint needs sync_folder: where to write the weights the server loads")


def server_root(base_url: str) -> str:
    """``http://host:port`` of an endpoint ``http://host:port/v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


def post_json(url: str, body: dict | None, timeout_s: float) -> Any:
    """POST ``body`` as JSON (GET when None) and return the decoded answer; an HTTP error names the URL, the status
    and the server's message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{url}: HTTP {error.code}: {detail}") from None
    except urllib.error.URLError as error:
        raise RuntimeError(f"{url}: cannot reach the server: {error.reason}") from None


def build_requests(texts: list[str], options: VLLMRolloutOptions, model: str,
                   generator: torch.Generator | None) -> list[dict]:
    """The completion requests for ``texts`` (already formatted prompts), in order."""
    requests = []
    for start in range(0, len(texts), options.max_prompts_per_request):
        seed = options.request_seed
        if seed is None:  # reproducible for the run's seed, a fresh stream for every request
            draw_on = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=draw_on))
        requests.append({"model": model, "prompt": texts[start:start + options.max_prompts_per_request],
                         "max_tokens": options.gen_length, "temperature": options.temperature, "seed": seed,
                         **options.extra})
    return requests


def parse_choices(answer: dict, policy, gen_length: int, expected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(completion ids [n, gen_length], log-probs [n, gen_length], filled [n, gen_length]) from a completions
    answer with ``expected`` choices. Token ids come from the log-probs' ``token_id:N`` tokens where the server
    returns them (vLLM's ``return_tokens_as_token_ids``), else from re-tokenising the text; a choice that stopped
    (``finish_reason: stop``) gets the first stop token after its text; the rest up to ``gen_length`` is that stop
    token, marked ``filled`` (not the model's output)."""
    choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
    if len(choices) != expected:
        raise RuntimeError(f"the server answered {len(choices)} choices for {expected} prompts")
    stop = policy.stop_token_ids[0]
    ids = torch.full((expected, gen_length), stop, dtype=torch.long)
    logp = torch.zeros((expected, gen_length), dtype=torch.float32)
    filled = torch.ones((expected, gen_length), dtype=torch.bool)
    for row, choice in enumerate(choices):
        tokens, values = _logprob_tokens(choice.get("logprobs"))
        if tokens is None:
            tokens = policy.tokenizer(choice.get("text", ""), add_special_tokens=False)["input_ids"]
        if choice.get("finish_reason") == "stop" and (not tokens or tokens[-1] not in policy.stop_token_ids):
            tokens = tokens + [stop]
        tokens = tokens[:gen_length]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        filled[row, :len(tokens)] = False
        if values is not None:
            logp[row, :len(values[:gen_length])] = torch.tensor(values[:gen_length], dtype=torch.float32)
    return ids, logp, filled


def _logprob_tokens(logprobs) -> tuple[list[int] | None, list[float] | None]:
    """(ids, log-probs) from an OpenAI completion's ``logprobs`` when its tokens are ``token_id:N``."""
    if not isinstance(logprobs, dict) or not logprobs.get("tokens"):
        return None, None
    tokens = logprobs["tokens"]
    values = [float(v) if v is not None else 0.0 for v in logprobs.get("token_logprobs") or [0.0] * len(tokens)]
    if not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return None, values
    return [int(t.split(":", 1)[1]) for t in tokens], values


@register_sampler("vllm")
class VLLMRolloutSampler(Sampler):
    options_class = VLLMRolloutOptions

    def __call__(self, policy, prompt_ids, prompt_mask, options, *, generator=None, record_predictions=False):
        if record_predictions:
            raise ValueError("the vllm sampler gets completions from a server, which returns no per-step guesses")
        model = options.model or self.served_model(options)
        # the prompts as the policy formatted them (chat template included), read back from their ids
        texts = [policy.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=False)
                 for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        ids, logp, filled = [], [], []
        for request in build_requests(texts, options, model, generator):
            answer = post_json(options.base_url.rstrip("/") + "/completions", request, options.timeout_s)
            parsed = parse_choices(answer, policy, options.gen_length, len(request["prompt"]))
            for part, store in zip(parsed, (ids, logp, filled)):
                store.append(part)
        device = prompt_ids.device
        completion = torch.cat(ids).to(device)
        return SamplerOutput(completion_ids=completion, unmask_step=torch.zeros_like(completion),
                             commit_logp=torch.cat(logp).to(device), model_calls=len(ids),
                             tokens_processed=0, trace={"filled": torch.cat(filled).to(device)})

    @staticmethod
    def served_model(options: VLLMRolloutOptions) -> str:
        models = post_json(options.base_url.rstrip("/") + "/models", None, options.timeout_s).get("data") or []
        if not models:
            raise RuntimeError(f"{options.base_url}/models lists no model")
        return models[0]["id"]

    def after_update(self, policy, options: VLLMRolloutOptions) -> None:
        """Send the updated weights to the server (``weight_sync``), before the next rollout."""
        if options.weight_sync is not None:
            WEIGHT_SYNCS[options.weight_sync](policy, options)


class CheckpointWeightSync:
    """Write the policy's weights (``model.safetensors``, merged LoRA adapters included) to ``sync_folder`` and ask
    the server to load them (``POST /dare/load_weights {"path": sync_folder}``, ``dare-gym serve
    --allow-weight-loading``); the server loads them between two of its sampler calls."""

    def __call__(self, policy, options: VLLMRolloutOptions) -> None:
        from transformers.utils import logging as hf_logging

        folder = Path(options.sync_folder)
        model = policy.model
        if hasattr(model, "merge_and_unload"):  # a LoRA policy: the server holds a plain model
            import copy

            model = copy.deepcopy(model).merge_and_unload()
            tie = getattr(policy.family, "tie_adapters", None)
            if tie is not None:
                tie(model)
        hf_logging.disable_progress_bar()
        try:  # save_pretrained writes tied weights once; the server copies into the one shared tensor
            model.save_pretrained(folder)
        finally:
            hf_logging.enable_progress_bar()
        answer = post_json(server_root(options.base_url) + "/dare/load_weights", {"path": str(folder.resolve())},
                           options.timeout_s)
        if answer.get("status") != "ok":
            raise RuntimeError(f"the server did not load the weights: {answer}")


register_weight_sync("checkpoint", CheckpointWeightSync())

__all__ = ["VLLMRolloutOptions", "VLLMRolloutSampler", "CheckpointWeightSync", "WEIGHT_SYNCS",
           "register_weight_sync", "build_requests", "parse_choices", "post_json", "server_root"]
