"""Turning logits into the distributions that drafting and verification use.

Temperature, top-k and top-p are applied identically to the target's p and the draft's
q (docs/design.md §1 step 4), so rejection sampling reproduces the target's *processed*
distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature == 0 means greedy decoding (argmax), the other fields are then ignored."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def fit_vocab(logits: torch.Tensor, vocab_size: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[..., V_draft] -> [..., V_target] logits: a smaller draft head is padded with -inf
    (q = 0), padding rows beyond the target's vocabulary are dropped. With ``ids`` ([Vs]
    target ids of the last dim), the scores are scattered to those ids, -inf elsewhere."""
    if ids is not None:
        full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
        return full.index_copy_(-1, ids, logits)
    v = logits.shape[-1]
    if v == vocab_size:
        return logits
    if v > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - v), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def processed_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k, top-p.

    Under greedy, plain softmax (used only for features, never for decisions).
    """
    x = logits.float()
    if cfg.greedy:
        return torch.softmax(x, dim=-1)
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        # (the most likely token is always kept)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        drop_sorted = before >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def argmax(x: torch.Tensor) -> int:
    """Index of the first maximum of a [V] tensor (torch's and numpy's rule); a float32 CPU
    tensor goes through numpy, whose call costs ~1 us against torch's ~12 us (per draft token)."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return int(x.numpy().argmax())
    return int(x.argmax())


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a [V] distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))
