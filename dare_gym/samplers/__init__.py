"""Denoising samplers, one file each, chosen by name (``policy.generate(..., sampler="fast_dllm")``,
``rollout.sampler`` in a train config, ``dare-gym eval --sampler``).

| name | for | what it does |
|---|---|---|
| ``llada`` | full attention | LLaDA's semi-AR blocks, fixed steps, low-confidence or random remasking (the reference) |
| ``fast_dllm`` | full attention | Fast-dLLM: prefix / dual KV cache, threshold or factor parallel decoding, early exit |
| ``block_diffusion`` | block-causal | SDAR-style exact block decoding: finished blocks cached once, static / dynamic / sequential |
| ``vllm`` | a served policy | rollouts from ``vllm serve`` / ``dare-gym serve`` (``/v1/completions``), weight sync after updates; no trace |
| ``diffusion_gemma`` | DiffusionGemma (uniform noise) | entropy-bound acceptance, renoising, self-conditioning, linear temperature schedule, stable-and-confident stop (``generate()``'s loop) |
"""

from dare_gym.samplers import block_diffusion, diffusion_gemma, fast_dllm, llada, vllm_rollout  # noqa: F401  (each registers its sampler)
from dare_gym.samplers.base import SAMPLERS, Sampler, SamplerOutput, get_sampler, make_options, register_sampler

__all__ = ["SAMPLERS", "Sampler", "SamplerOutput", "get_sampler", "make_options", "register_sampler"]
