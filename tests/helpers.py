"""What several test files build the same way: the command line in a subprocess, rollout buffers and sequence
batches from nested lists, and a *scripted* policy whose log-probabilities the test chooses.

The scripted policy's forward returns logits whose log-softmax at each completion position's target token is
a value the test picks (from the row, the position and which positions the input masks), the rest of the mass
spread evenly over the other tokens; so every estimate, ratio and loss built on it can be computed by hand,
while buffer, estimators, noise, advantages and losses are the library's own code.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

from dare_gym.core.buffer import RolloutBuffer, SequenceBatch
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM
from dare_gym.models.tokenizer import build_char_tokenizer

MASK, PAD, EOS, VOCAB = 3, 0, 2, 12


def run_cli(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``dare-gym ARGS`` in a fresh process (``python -m dare_gym``), its output captured, progress bars off."""
    return subprocess.run([sys.executable, "-m", "dare_gym", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=dict(os.environ, TQDM_DISABLE="1"))


class ScriptedPolicy:
    """What an algorithm or estimator uses of a policy — ``logits`` (also as a plain callable), ``device``,
    ``block_size`` — with a scripted forward: the log-softmax at each completion position's target token is
    ``rule(masked)`` ([N, L], < 0; ``masked``: the completion positions that are MASK in this input). ``rule``
    may return a tensor that requires grad, so gradients reach the test's leaves. Every input is recorded."""

    device = torch.device("cpu")

    def __init__(self, targets, rule, *, block_size: int | None = None):
        self.targets = torch.as_tensor(targets)
        self.rule = rule
        self.block_size = block_size
        self.inputs: list[torch.Tensor] = []

    @property
    def calls(self) -> int:
        return len(self.inputs)

    def logits(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        rows, length = self.targets.shape
        assert input_ids.shape[0] == rows, "every forward sees all rows of the test batch"
        self.inputs.append(input_ids.clone())
        masked = input_ids[:, -length:] == MASK
        value = torch.as_tensor(self.rule(masked), dtype=torch.float64).expand(rows, length)
        assert (value < 0).all(), "a log-probability must be negative"
        rest = torch.log1p(-value.exp()) - math.log(VOCAB - 1)
        target = torch.nn.functional.one_hot(self.targets, VOCAB).bool()
        completion = torch.where(target, value[..., None], rest[..., None])
        prompt = torch.zeros(rows, input_ids.shape[1] - length, VOCAB, dtype=torch.float64)
        logits = torch.cat([prompt, completion], dim=1)
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    __call__ = logits

    def completion_masks(self) -> list[torch.Tensor]:
        """[N, L] bool per recorded forward: the completion positions that were MASK."""
        return [seen[:, -self.targets.shape[1]:] == MASK for seen in self.inputs]


def constant(values):
    """A rule that ignores the mask: each (row, position) has one log-prob."""
    table = torch.as_tensor(values, dtype=torch.float64)
    return lambda masked: table


def make_buffer(completions, *, completion_mask=None, unmask_step=None, rewards=None, group_size=2,
                prompts=None) -> RolloutBuffer:
    """A rollout buffer from nested lists: left-padded prompts (default ``[5 + i % 4, 9]``), completions,
    rewards (default 1, 0, 1, 0, ...) in groups of ``group_size``."""
    completion_ids = torch.as_tensor(completions)
    rows, length = completion_ids.shape
    prompts = prompts or [[5 + (i % 4), 9] for i in range(rows)]
    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])  # left-padded, as samplers do
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return RolloutBuffer(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=torch.ones(rows, length, dtype=torch.long) if completion_mask is None
        else torch.as_tensor(completion_mask),
        unmask_step=torch.zeros(rows, length, dtype=torch.long) if unmask_step is None else torch.as_tensor(unmask_step),
        reward=torch.tensor([1.0, 0.0] * (rows // 2) if rewards is None else rewards, dtype=torch.float32),
        group_id=torch.arange(rows) // group_size, prompts=[f"prompt {i}" for i in range(rows)],
        completions=[f"completion {i}" for i in range(rows)], pad_token_id=PAD,
    )


def make_batch(prompts, completions, *, prompt_attention=None, present=None, completion_mask=None,
               unmask_step=None) -> SequenceBatch:
    """A SequenceBatch from nested lists. ``present`` is the completion's attention (1 where the token
    exists); ``completion_mask`` the loss mask (up to and including the first EOS); both default to ones."""
    prompt = torch.tensor(prompts)
    completion = torch.tensor(completions)
    prompt_attention = torch.ones_like(prompt) if prompt_attention is None else torch.tensor(prompt_attention)
    present = torch.ones_like(completion) if present is None else torch.tensor(present)
    completion_mask = present.clone() if completion_mask is None else torch.tensor(completion_mask)
    return SequenceBatch(torch.cat([prompt, completion], dim=1), torch.cat([prompt_attention, present], dim=1),
                         prompt.shape[1], completion_mask, None if unmask_step is None else torch.tensor(unmask_step))


def clipped(ratio: float, advantage: float, low: float, high: float | None = None) -> float:
    """min(ρA, clip(ρ, 1 − ε_lo, 1 + ε_hi)A), by hand."""
    high = low if high is None else high
    return min(ratio * advantage, min(max(ratio, 1 - low), 1 + high) * advantage)


def k3(logp: float, ref: float) -> float:
    return math.exp(ref - logp) - (ref - logp) - 1


def random_tiny(block_size: int | None = None, seed: int = 0, hidden_size: int = 32) -> DiffusionPolicy:
    """A random tiny model in float64 (block-causal with ``block_size``; MLP twice ``hidden_size``): the fidelity
    tests' exact policy, and the samplers' reference policy at ``hidden_size`` 64."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=2 * hidden_size, initializer_range=0.5,
                            mask_token_id=tokenizer.mask_token_id, block_size=block_size)
    return DiffusionPolicy(TinyDLLMForMaskedLM(config).double().eval(), tokenizer, family="tiny")
