"""Text spaces that accept real prompts.

Gymnasium's stock ``spaces.Text`` only contains strings drawn from its charset (alphanumerics by default),
so it rejects any prompt with a space, punctuation or unicode. ``UnicodeText`` keeps the length limits and the
sampling of ``Text`` but contains every ``str`` within them.
"""

from __future__ import annotations

from typing import Any

from gymnasium import spaces


class UnicodeText(spaces.Text):
    """Any Python ``str`` whose length lies in ``[min_length, max_length]``."""

    def __init__(self, max_length: int, *, min_length: int = 0, seed: int | None = None):
        super().__init__(max_length=max_length, min_length=min_length, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, UnicodeText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )
