"""Precision of the update: what stays float32 when the weights are bfloat16.

With ``dtype: bfloat16`` the weights, activations and logits are bf16, so a forward costs half the memory and
runs on tensor cores. What loses too much in bf16 stays float32:

* token log-probabilities, entropies and sampler confidences (:mod:`dare_gym.core.logprobs`, the samplers): a
  ratio exp(log π − log π_old) of two bf16 log-probs carries only ~3 significant digits;
* every loss, advantage and KL (computed from those float32 log-probs);
* the optimizer: :class:`MasterWeightAdamW` keeps a float32 master copy of every trainable bf16 parameter and
  AdamW's moments in float32, and copies the updated master back into the bf16 weights. A bf16 weight cannot
  absorb an update smaller than 2⁻⁸ of itself, so updating bf16 weights directly silently drops most steps at
  RL learning rates (1e-6 × Adam's normalised step).

Memory per trainable parameter: bf16 weight 2 B + bf16 gradient 2 B + master 4 B + two moments 8 B = 16 B
(pure bf16 AdamW: 8 B; float32 weights: 16 B). LoRA adapters are float32 already (peft keeps them so), so
under LoRA nothing is copied. For float32 parameters the master *is* the parameter: no copy, the same
arithmetic as plain AdamW.
"""

from __future__ import annotations

from typing import Iterable

import torch


class MasterWeightAdamW:
    """AdamW over float32 master weights of the trainable parameters, whatever their dtype.

    ``zero_grad()``, ``clip_and_step(max_norm) -> grad norm`` (the norm over all trainable gradients, in float32,
    before clipping), ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *, lr: float, betas=(0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-8):
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("no trainable parameters to optimise")
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in self.parameters]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                           eps=eps)

    @property
    def has_copies(self) -> bool:
        return any(m is not p for m, p in zip(self.masters, self.parameters))

    def set_learning_rate(self, lr: float) -> None:
        """The rate of the next steps (a schedule sets it before each training step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        for parameter, master in zip(self.parameters, self.masters):
            parameter.grad = None
            master.grad = None

    def clip_and_step(self, max_norm: float) -> float:
        """Move gradients to the float32 masters, clip them by their global norm, step, write weights back."""
        for parameter, master in zip(self.parameters, self.masters):
            if master is not parameter:
                master.grad = None if parameter.grad is None else parameter.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.masters, max_norm)
        self.optimizer.step()
        with torch.no_grad():
            for parameter, master in zip(self.parameters, self.masters):
                if master is not parameter:
                    parameter.copy_(master)
                    parameter.grad = None
        return float(norm)

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.has_copies:
            state["masters"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:  # a checkpoint written by plain AdamW (before master weights)
            state = {"optimizer": state}
        self.optimizer.load_state_dict(state["optimizer"])
        if "masters" in state:
            with torch.no_grad():
                for master, saved in zip(self.masters, state["masters"]):
                    master.copy_(saved)


def optimizer_state_bytes(optimizer: MasterWeightAdamW) -> int:
    """Bytes held by the optimizer: master copies plus AdamW's moments (for the memory tables)."""
    total = sum(m.numel() * m.element_size() for m, p in zip(optimizer.masters, optimizer.parameters) if m is not p)
    for state in optimizer.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward instead of keeping them (non-reentrant, so it works
    with frozen inputs and LoRA). transformers renamed the switch in 5.x; either name is used."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_forward(model: torch.nn.Module, options: dict) -> torch.nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``: parameters, hooks, adapters and
    ``state_dict`` stay the module's own, so checkpoints, LoRA and DDP see the same module). ``options`` are
    torch.compile's keyword arguments. The samplers call the model with a few fixed shapes per block (a static
    cache), so recompilations stay within torch's per-function limit."""
    model.compile(**options)
    return model


__all__ = ["MasterWeightAdamW", "optimizer_state_bytes", "enable_activation_checkpointing", "compile_forward"]
