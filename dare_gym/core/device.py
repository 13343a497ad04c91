"""Device and precision settings: one parser for every entry point (train config, eval, compare, load_policy).

``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``float32`` or ``bfloat16`` (``auto``: bfloat16 on CUDA, float32 on CPU, where bfloat16 matmuls are
about 100x slower). The weights and the forward run in that dtype; log-probabilities, confidences, losses and
the optimizer's state stay float32 (see :mod:`dare_gym.core.precision`).
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a ``torch.device``) as a ``torch.device``; a clear error
    names the bad value or the missing GPU."""
    if isinstance(device, torch.device):
        return device
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this machine has no CUDA GPU visible to torch "
                         f"(torch {torch.__version__}); use device=cpu or device=auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """``float32`` | ``bfloat16`` | ``auto`` (or a ``torch.dtype``) as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    text = "auto" if dtype is None else str(dtype).strip().lower().removeprefix("torch.")
    if text == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    aliases = {"fp32": "float32", "bf16": "bfloat16"}
    text = aliases.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    return DTYPES[text]


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded generator that lives where the model does: sampler noise and estimator masks are drawn on the
    model's device (drawing them on the CPU and copying would move gigabytes per step at real vocabularies).
    A run is reproducible for a given seed on a given device; CPU and CUDA streams differ."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def uniform(shape, generator: torch.Generator | None, device: torch.device | str,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` on ``device``, from ``generator`` wherever it lives: drawn on the
    generator's device (the only place torch can draw from it), then moved if the two differ."""
    draw_on = generator.device if generator is not None else torch.device(device)
    values = torch.rand(shape, dtype=dtype, device=draw_on, generator=generator)
    return values.to(device)


__all__ = ["DEVICE_CHOICES", "DTYPES", "resolve_device", "resolve_dtype", "make_generator", "uniform"]
