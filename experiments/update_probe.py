"""Random models of real shapes, synthetic rollouts, and one measured update: shared by ``bench_memory.py`` and
``gpu_check.py``.

A real-shaped model is a random LLaDA-architecture network (this project's own LLaDA implementation, the
8B checkpoint's vocabulary of 126,464 and its special ids) built directly on the target device in the target
dtype, so an 8B model appears on a GPU in seconds and nothing is downloaded. Its tokenizer is synthetic (one
token per id), which is all a speed or memory measurement needs.
"""

from __future__ import annotations

import resource
import time

import torch

from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.core.buffer import RolloutBuffer
from dare_gym.core.lora import LoraSettings, adapter_disabled_reference, apply_lora
from dare_gym.models.llada import LLaDAConfig, LLaDAModelLM
from dare_gym.core.policy import Completion, DiffusionPolicy
from dare_gym.core.precision import MasterWeightAdamW, enable_activation_checkpointing

LLADA_VOCAB, LLADA_MASK, LLADA_EOS = 126464, 126336, 126081
SHAPES = {  # d_model, heads, layers, MLP width of LLaDA's "llama" block
    "8b": dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288),  # LLaDA-8B itself
    "1.3b": dict(d_model=2048, n_heads=16, n_layers=16, mlp_hidden_size=5632),  # 1.34B with the 126k vocabulary
    "test": dict(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64),  # for CPU tests of these scripts
}


LLADA2_VOCAB, LLADA2_MASK, LLADA2_EOS = 157184, 156895, 156892
LLADA2_SHAPES = {  # LLaDA2.0-mini's width (config.json) with a number of layers; "test" for CPU tests
    "mini": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=5120,
                 moe_intermediate_size=512, num_experts=256, num_shared_experts=1, num_experts_per_tok=8, n_group=8,
                 topk_group=4, vocab_size=LLADA2_VOCAB),
    "test": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                 moe_intermediate_size=16, num_experts=16, num_shared_experts=1, num_experts_per_tok=4, n_group=4,
                 topk_group=2, vocab_size=LLADA2_VOCAB),
}


def synthetic_tokenizer(vocab_size: int = LLADA_VOCAB, *, eos: int = LLADA_EOS, mask: int = LLADA_MASK):
    """A tokenizer with one token per id (``<i>``), EOS/pad and mask at LLaDA's ids (or those given)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=f"<{eos}>", pad_token=f"<{eos}>",
                                   mask_token=f"<{mask}>", unk_token="<0>")


def random_llada2(shape: str, layers: int, *, device: str | torch.device, dtype: torch.dtype,
                  seed: int = 0) -> DiffusionPolicy:
    """A random LLaDA2-architecture policy (:data:`LLADA2_SHAPES`, ``layers`` decoder layers: the first dense, the
    rest MoE), built on ``device`` in ``dtype`` with float32 routers, as a checkpoint loads."""
    from dare_gym.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeGate, LLaDA2MoeModelLM

    config = LLaDA2MoeConfig(**LLADA2_SHAPES[shape], num_hidden_layers=layers, pad_token_id=LLADA2_EOS,
                             eos_token_id=LLADA2_EOS, mask_token_id=LLADA2_MASK)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LLaDA2MoeModelLM._from_config(config, dtype=dtype)
    for module in model.modules():
        if isinstance(module, LLaDA2MoeGate):
            module.float()
    tokenizer = synthetic_tokenizer(LLADA2_VOCAB, eos=LLADA2_EOS, mask=LLADA2_MASK)
    return DiffusionPolicy(model.eval(), tokenizer, family="llada2")


def random_llada(shape: str, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> DiffusionPolicy:
    """A random LLaDA-architecture policy of a named shape (:data:`SHAPES`), built on ``device`` in ``dtype``."""
    config = LLaDAConfig(**SHAPES[shape], vocab_size=LLADA_VOCAB, embedding_size=LLADA_VOCAB,
                         mask_token_id=LLADA_MASK, eos_token_id=LLADA_EOS, pad_token_id=LLADA_EOS)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LLaDAModelLM._from_config(config, dtype=dtype)
    return DiffusionPolicy(model.eval(), synthetic_tokenizer(), family="llada")


def parameter_count(policy) -> int:
    return sum(p.numel() for p in policy.model.parameters())


def synthetic_rollouts(policy, *, rows: int, prompt_length: int, gen_length: int, group_size: int,
                       seed: int = 0) -> RolloutBuffer:
    """Rollouts as the sampler would return them: random prompt and completion ids, each completion's tokens
    committed in a random order, rewards that differ within every group."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(policy.model.config.vocab_size, LLADA_EOS)  # ordinary ids, below the special ones
    completions, rewards = [], []
    for row in range(rows):
        completions.append(Completion(
            text="", prompt_ids=torch.randint(0, vocab, (prompt_length,), generator=generator),
            completion_ids=torch.randint(0, vocab, (gen_length,), generator=generator),
            unmask_step=torch.randperm(gen_length, generator=generator)))
        rewards.append(float(row % group_size) / group_size)
    return RolloutBuffer.from_rollouts(
        [""] * rows, completions, rewards, [row // group_size for row in range(rows)],
        completion_mask_fn=policy.completion_mask, pad_token_id=policy.tokenizer.pad_token_id)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset. CPU: the process's peak resident set (a high-water mark
    of the whole process: measure one configuration per process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedTensorMeter:
    """Bytes autograd keeps for the backward (distinct storages other than the model's weights), counted as the
    forward saves them: the activation memory that gradient checkpointing and chunked log-probs cut, exactly
    and on any device."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # kept anyway: not counted
        self.current: dict[int, int] = {}
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.weights:
            return tensor
        self.current[storage.data_ptr()] = storage.nbytes()
        self.peak = max(self.peak, sum(self.current.values()))
        return tensor

    def reset(self) -> None:
        self.current = {}

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def one_update(policy, *, algorithm: str = "d1", rows: int = 8, prompt_length: int = 64, gen_length: int = 256,
               group_size: int = 4, micro_batch_size: int = 8, lora: LoraSettings | None = None,
               gradient_checkpointing: bool = False, options: dict | None = None) -> dict:
    """One update of ``algorithm`` (its own recipe, μ = 1) on synthetic rollouts: scoring π_old/π_ref, every
    micro-batch's backward, the optimizer step. Returns seconds, peak memory and the largest micro-batch's bytes
    saved for the backward."""
    device = policy.device
    if lora is not None:
        apply_lora(policy, lora, verbose=False)
    if gradient_checkpointing:
        enable_activation_checkpointing(policy.model)
    config = build_config(algorithm, {"num_iterations": 1, **(options or {})}, where="algorithm")
    algo = make_algorithm(algorithm, config, mask_token_id=policy.mask_token_id)
    reference = None
    if algo.needs_reference:
        if lora is None:
            raise ValueError("a full fine-tune with a KL reference needs a second copy: use beta=0 or LoRA here")
        reference = adapter_disabled_reference(policy)
    optimizer = MasterWeightAdamW(policy.model.parameters(), lr=1e-6)
    buffer = algo.advantages(synthetic_rollouts(policy, rows=rows, prompt_length=prompt_length,
                                                gen_length=gen_length, group_size=group_size), group_size)
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    policy.model.train()
    algo.prepare(policy, reference, buffer, generator, micro_batch_size)
    optimizer.zero_grad()
    losses, meter = [], SavedTensorMeter(policy.model)
    for minibatch in buffer.minibatches(micro_batch_size, generator=generator):
        meter.reset()
        with meter.hooks():
            loss, _ = algo.backward(policy, minibatch, 0, len(minibatch) / len(buffer))
        losses.append(loss)
    grad_norm = optimizer.clip_and_step(1.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(device), "saved_for_backward_bytes": meter.peak,
            "loss": sum(losses) / len(losses), "grad_norm": grad_norm, "rows": len(buffer)}


__all__ = ["SHAPES", "LLADA2_SHAPES", "random_llada", "random_llada2", "synthetic_rollouts", "one_update",
           "peak_memory_bytes", "parameter_count"]
