"""What the fast samplers need of a model forward beyond the plain one: a key/value cache written in place, and
logits for chosen columns only.

Every model here (tiny, LLaDA, LLaDA2; transformers' Qwen2/Qwen3 under Dream and SDAR) stores keys and values
through ``cache.update(keys, values, layer_idx)`` and attends to what it returns, so a cache is any object with
that method and ``get_seq_length()``. :class:`StaticKVCache` is the one the samplers use: one buffer per layer,
allocated once per decoding call at the full width, into which each forward writes its keys/values in place and
from which attention reads a view. A ``transformers`` ``DynamicCache`` instead concatenates (a copy of the whole
cache per layer per forward) and has to be cut back with another copy when a forward's keys must not stay.

``logits_to_keep`` (the argument every model's forward takes) is, as in ``transformers``, either an int n (the
last n positions; 0: all) or a 1D tensor of column indices: :func:`keep_positions` is the selection.
"""

from __future__ import annotations

import torch


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of ``hidden`` [B, T, ·] whose logits are wanted: the last n for an int n > 0, all for 0, the
    listed columns (in that order) for a 1D index tensor."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden.index_select(1, logits_to_keep.to(hidden.device))
    return hidden[:, -logits_to_keep:] if logits_to_keep else hidden


class StaticKVCache:
    """Keys/values of ``capacity`` positions per layer, preallocated, written in place and read through views.

    Before each forward the caller sets :meth:`window` ``(start, end)``: the forward's Q fed tokens are written to
    positions [start, end) (so end − start == Q) and its queries attend to positions [0, end) — the positions
    before ``start`` being what earlier forwards wrote there and the caller chose to keep. Where the cached
    positions sit is the caller's layout (their order is the keys' order in attention); :meth:`move` rearranges
    them (once per block, never per step). ``get_seq_length()`` is ``start``: the number of keys before the fed
    ones, which is what a model's forward takes as the cache's length.

    The buffers take the batch, heads, head size, dtype and device of the first keys written.
    """

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start, self.end = 0, capacity

    def window(self, start: int, end: int) -> StaticKVCache:
        """The next forward writes positions [start, end) and reads [0, end); returns the cache."""
        if not 0 <= start < end <= self.capacity:
            raise ValueError(f"need 0 <= start < end <= capacity={self.capacity}, got start={start}, end={end}")
        self.start, self.end = start, end
        return self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's ``keys``/``values`` [B, H, Q, D] of layer ``layer_idx`` at [start, end) in place;
        return views of the layer's positions [0, end)."""
        if keys.shape[2] != self.end - self.start:
            raise ValueError(f"the window [{self.start}, {self.end}) holds {self.end - self.start} positions; the "
                             f"forward fed {keys.shape[2]}")
        if layer_idx == len(self.keys):
            batch, heads, _, width = keys.shape
            self.keys.append(keys.new_empty(batch, heads, self.capacity, width))
            self.values.append(values.new_empty(batch, heads, self.capacity, values.shape[-1]))
        elif layer_idx > len(self.keys):
            raise ValueError(f"layer {layer_idx} written before layer {len(self.keys)}")
        self.keys[layer_idx][:, :, self.start:self.end].copy_(keys)
        self.values[layer_idx][:, :, self.start:self.end].copy_(values)
        return self.keys[layer_idx][:, :, :self.end], self.values[layer_idx][:, :, :self.end]

    def move(self, source_start: int, source_end: int, target_start: int) -> None:
        """Copy every layer's positions [source_start, source_end) to start at ``target_start`` (the ranges may
        overlap)."""
        length = source_end - source_start
        for buffer in (*self.keys, *self.values):
            buffer[:, :, target_start:target_start + length] = buffer[:, :, source_start:source_end].clone()


__all__ = ["StaticKVCache", "keep_positions"]
