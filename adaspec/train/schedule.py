"""The learning-rate schedule every trainer here uses (draft, feature head, distillation)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Learning rate at 0-based ``step`` of ``total``: linear warm-up over the first
    ``warmup`` steps ((step + 1) / warmup of ``base``: never 0), then cosine decay from
    ``base`` to ``floor * base`` at step ``total`` (held there past it)."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0))))
