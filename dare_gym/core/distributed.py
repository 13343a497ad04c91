"""Training on many processes with PyTorch's own engine: ``torchrun``, ``torch.distributed``, DDP and FSDP2.

    torchrun --nproc-per-node 8 -m dare_gym train strategy=fsdp ...   # or: dare-gym train --nproc 8 ...

What stays the same at any number of processes N:

* **The global batch.** ``prompts_per_step`` prompts per step in all (N must divide it); each rank rolls out its
  ``prompts_per_step / N`` prompts × ``group_size`` completions (whole GRPO groups on one rank, its own random
  stream), scores them and computes group advantages locally.
* **The update.** Every normaliser of a loss (tokens, sequences, pairs) is summed over the ranks
  (:func:`global_sum`) and every micro-batch is weighted by its share of the global batch, so the gradient is the
  one a single process computes on the union of the ranks' batches, micro-batch by micro-batch.
* **The calls.** Every rank makes the same forward/backward calls whatever its data: rows without signal
  (zero-variance groups, groups without a preference pair) are kept with nothing to score instead of being
  dropped (:meth:`RolloutBuffer.discard`); gradient synchronisation happens once per optimizer step, on the last
  backward (:meth:`GradientSync`; BGPO's per-sample backward passes skip it but for the last).

Strategies: ``ddp`` (each rank holds the whole model; gradients all-reduced) and ``fsdp`` (FSDP2
``fully_shard`` per transformer block: parameters, gradients and optimizer state sharded; the sharded parameters
stay float32 — the master weights — while forwards run in the policy's dtype and gradients reduce in float32).
A frozen reference model is sharded the same way, or is the adapter-disabled base under LoRA. Rank 0 logs and
writes checkpoints; evaluation is sharded over the ranks. A rank whose loss is not finite stops every rank with
its message (:func:`raise_if_any`); a rank that raises makes ``torchrun`` stop the others.

With one process nothing here does anything: single-process runs are unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

STRATEGIES = ("ddp", "fsdp")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def global_sum(value: torch.Tensor | float) -> torch.Tensor:
    """``value`` summed over the ranks (a copy; the value itself with one process)."""
    tensor = torch.as_tensor(value).detach().clone()
    if is_distributed():
        device = _collective_device()
        reduced = tensor.to(device, torch.float64)
        torch.distributed.all_reduce(reduced)
        tensor = reduced.to(tensor.device, tensor.dtype)
    return tensor


def global_mean(numerator: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """``numerator / Σ_ranks count`` (count at least 1): a mean whose normaliser is the global batch's, so that
    the ranks' parts add up to the single-process loss. With one process: numerator / count."""
    return numerator / global_sum(torch.as_tensor(count, dtype=numerator.dtype)).clamp(min=1).to(numerator.device)


def global_max(value: int) -> int:
    tensor = torch.tensor(float(value))
    if is_distributed():
        tensor = tensor.to(_collective_device())
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(value):
    """A list of every rank's ``value`` (picklable), in rank order; ``[value]`` with one process."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each numeric metric averaged over the ranks that report it."""
    if not is_distributed():
        return metrics
    gathered = gather_objects(metrics)
    averaged = dict(metrics)
    for key in {k for ranks in gathered for k, v in ranks.items() if isinstance(v, (int, float))}:
        values = [ranks[key] for ranks in gathered if isinstance(ranks.get(key), (int, float))]
        averaged[key] = sum(values) / len(values)
    return averaged


def raise_if_any(problem: str | None) -> None:
    """Every rank calls this; if any rank has a problem, every rank raises with every rank's message (so no
    rank waits forever in a collective that a failed rank will never join)."""
    problems = [(r, p) for r, p in enumerate(gather_objects(problem)) if p]
    if problems:
        raise RuntimeError("; ".join(f"rank {r}: {p}" for r, p in problems))


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- set-up


@dataclass
class ProcessGroup:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> ProcessGroup:
    """Join the process group ``torchrun`` described in the environment (RANK, WORLD_SIZE, LOCAL_RANK), with
    NCCL on GPUs and gloo on CPUs; each rank uses GPU ``LOCAL_RANK``. Without torchrun: one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ProcessGroup(0, 1, 0)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    return ProcessGroup(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


def rank_device(device: str, group: ProcessGroup) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` where CUDA is asked for (or ``auto`` finds it)."""
    if group.world_size > 1 and (str(device) in ("cuda", "auto") and torch.cuda.is_available()):
        return f"cuda:{group.local_rank}"
    return device


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------- strategies


class GradientSync:
    """The policy's gradient synchronisation switch: ``with sync(enabled):`` around a forward and backward.
    Nested uses combine with AND, so the trainer allows it on its last micro-batch and an algorithm with
    several backward passes (BGPO) on its last one. Does nothing with one process."""

    def __init__(self, wrapper=None, fsdp_root=None):
        self.wrapper, self.fsdp_root, self.enabled = wrapper, fsdp_root, True

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True):
        previous = self.enabled
        self.enabled = previous and enabled
        try:
            if self.fsdp_root is not None:
                self.fsdp_root.set_requires_gradient_sync(self.enabled)
            if self.wrapper is not None and not self.enabled:
                with self.wrapper.no_sync():
                    yield
            else:
                yield
        finally:
            self.enabled = previous
            if self.fsdp_root is not None:
                self.fsdp_root.set_requires_gradient_sync(previous)


def gradient_sync(policy, enabled: bool):
    """``policy.gradient_sync(enabled)`` where the policy has the switch; a no-op context otherwise."""
    switch = getattr(policy, "gradient_sync", None)
    return switch(enabled) if switch is not None else contextlib.nullcontext()


def wrap_ddp(policy, device: torch.device) -> None:
    """DDP: the policy's forwards go through a ``DistributedDataParallel`` wrapper of its model."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    wrapper = DistributedDataParallel(policy.model, device_ids=ids, find_unused_parameters=False)
    policy.forward_module = wrapper
    policy.gradient_sync = GradientSync(wrapper=wrapper)


def shard_fsdp(model: torch.nn.Module, compute_dtype: torch.dtype, family=None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every transformer block (the model's ``_no_split_modules``; or the ``family``'s own
    units, DiffusionGemma's encoder/decoder layer pairs, whose shared weights must be sharded in one unit) and the
    root, with float32 sharded parameters, forwards in ``compute_dtype`` and float32 gradient reduction. Modules the
    model keeps in float32 (``_keep_in_fp32_modules_strict``: LLaDA2's routers) are their own units computing in
    float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if getattr(family, "fsdp_units", None) is not None:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for unit in family.fsdp_units(model):
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "get_base_model", lambda: model)()
    names |= set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"fsdp needs the model's transformer block class (_no_split_modules) to shard by; "
                         f"{type(base).__name__} declares none")
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # Modules the model keeps in float32 whatever its dtype (LLaDA2's MoE router) get their own float32 unit, so
    # FSDP's bf16 compute copy never rounds them (routing must not change between a rollout and an update).
    keep = {pattern.rsplit(".", 1)[0] for pattern in getattr(base, "_keep_in_fp32_modules_strict", None) or []}
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for name, module in model.named_modules():
        if keep and any(name.endswith("." + suffix) for suffix in keep) and any(True for _ in module.parameters()):
            fully_shard(module, mp_policy=float32)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap_fsdp(policy, compute_dtype: torch.dtype) -> None:
    shard_fsdp(policy.model, compute_dtype, policy.family)
    policy.gradient_sync = GradientSync(fsdp_root=policy.model)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, on every rank (FSDP's shards gathered; DDP's copy as it is)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state (FSDP's shards gathered), on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Load whole (unsharded) model and optimizer states into a sharded model: a checkpoint written with any
    number of processes resumes with any other."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


__all__ = ["STRATEGIES", "is_distributed", "world_size", "rank", "global_sum", "global_mean", "global_max",
           "gather_objects", "mean_metrics", "raise_if_any", "setup", "rank_device",
           "teardown", "GradientSync", "gradient_sync", "wrap_ddp", "wrap_fsdp", "shard_fsdp", "full_state_dict",
           "full_optimizer_state", "load_full_state", "barrier"]
