"""``fixed``: always draft K tokens (standard speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PolicyArgumentError
from ..types import RoundContext
from . import register
from .base import Policy


@register
@dataclass
class FixedPolicy(Policy):
    """Draft exactly ``k`` tokens per round (fewer only near max_new_tokens / context end).

    Args:
        k: draft length, >= 1 (default 5).
    """

    name = "fixed"
    k: int = 5

    def __post_init__(self) -> None:
        if self.k < 1:
            raise PolicyArgumentError(f"fixed: k must be >= 1, got {self.k}")

    def begin_round(self, ctx: RoundContext) -> int:
        return self.k
