"""Per-token features for the learned predictors, computed from a :class:`DraftStep`.

Every feature here depends only on the draft's *distribution* at a position (its hidden
state, entropy, top-k probabilities, attention) plus the position and the recent history,
never on which token was sampled from it. A policy may therefore DROP a position based on
them without changing the sampling distribution (deciding not to draft position i is the
same as never having drawn x_i). A rule that reads the sampled token (e.g. q(x_i)) may only
STOP (keep x_i, draft no further), which is lossless for any rule.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ..types import DraftStep
from .fastpath import kernels

TOP_K = 4
#: names of the scalar features, in order (the ``context`` head reads hidden ++ these)
SCALAR_FEATURES: tuple[str, ...] = (
    "entropy", *(f"top{i + 1}" for i in range(TOP_K)), "attn_concentration",
    "position", "recent_acceptance",
)
POSITION_SCALE = 8.0  # position feature = index / POSITION_SCALE


class RecentAcceptance:
    """Smoothed per-token conditional acceptance rate over the last ``window`` rounds.

    A round with m accepted of K drafted contributes m successes and, if m < K, one
    failure (tokens after the first rejection were never tried conditionally), so the
    estimate does not depend on the draft length K. Laplace-smoothed: (a + 1) / (n + 2).
    """

    def __init__(self, window: int = 8) -> None:
        self.rounds: deque[tuple[int, int]] = deque(maxlen=window)

    def reset(self) -> None:
        self.rounds.clear()

    def update(self, drafted: int, accepted: int) -> None:
        if drafted > 0:
            self.rounds.append((accepted, accepted + (1 if accepted < drafted else 0)))

    @property
    def value(self) -> float:
        a = sum(r[0] for r in self.rounds)
        n = sum(r[1] for r in self.rounds)
        return (a + 1.0) / (n + 2.0)


_FINITE: dict[int, int] = {}  # vocabulary size -> length of the finite prefix last seen


def finite_prefix(x: torch.Tensor) -> torch.Tensor:
    """``x`` [V] without the trailing -inf padding of a reduced-vocabulary draft (its
    output ids come first; :func:`adaspec.sampling.fit_vocab` pads the rest).

    The padding length is found once per vocabulary size and re-checked in O(1) per call
    (the last kept entry finite, the first and last dropped ones -inf); dropped entries
    have probability 0, so entropy and top-k are unchanged. It saves work only when the
    draft's output ids come first (the shipped draft's 8,192 ids reach up to 49,129: no saving).
    """
    v = x.shape[-1]
    n = _FINITE.get(v)
    ninf = float("-inf")
    if n is None or not (n == v or (x[n] == ninf and x[-1] == ninf and x[n - 1] > ninf)):
        fin = torch.nonzero(x > ninf)
        n = int(fin[-1]) + 1 if len(fin) else v
        if n < v and bool((x[n:] > ninf).any()):
            n = v
        _FINITE[v] = n
    return x[:n]


def entropy_and_top(logits: torch.Tensor, k: int = TOP_K) -> tuple[float, torch.Tensor]:
    """Entropy (nats) and the [k] largest probabilities of softmax(logits [V]), fast.

    A reduced-vocabulary draft pads its logits with -inf: the padding is cut off first
    (:func:`finite_prefix`); exp() of huge negative values is slow on CPU, so everything
    goes through the fused (log_)softmax kernels, zero terms are dropped with nansum
    (0 * -inf = nan), and top-k runs on the <= k blocks holding the largest block maxima
    (they contain the top-k). ~0.3 ms at V = 49,152 instead of ~1 ms for the direct formulas.
    Once the compiled runtime has set numba up, the sums and the top-k are one compiled loop
    over p and log p (:func:`adaspec.runtime.policy_kernels.entropy_top`; equal up to float
    rounding).
    """
    x = finite_prefix(logits if logits.dtype == torch.float32 else logits.float())
    p = torch.softmax(x, dim=-1)  # [V]
    fast = kernels()
    if fast is not None and x.dim() == 1:  # the reductions and top-k in one compiled loop
        ent, top = fast.entropy_top(p.numpy(), torch.log_softmax(x, dim=-1).numpy(), k)
        return ent, torch.from_numpy(top)
    ent = float(-torch.nansum(p * torch.log_softmax(x, dim=-1)))
    v = p.shape[-1]
    blocks = 64
    if v < k:
        return ent, torch.cat([p.sort(descending=True).values, p.new_zeros(k - v)])
    if v % blocks or v < blocks * 4 * k:
        return ent, p.topk(k).values
    pb = p.view(blocks, v // blocks)  # [64, V/64]
    best = pb.amax(dim=-1).topk(k).indices  # [k] blocks with the largest maxima
    return ent, pb[best].flatten().topk(k).values


def scalar_features(step: DraftStep, recent: float) -> torch.Tensor:
    """[len(SCALAR_FEATURES)] float32 features of one drafted position.

    Order: entropy of softmax(logits) in nats (clipped to 10), the top-4 probabilities,
    last-layer attention concentration (0 when not computed), index / 8, recent acceptance.
    Entropy and top-k read ``step.scored``, the draft's own scores (8,192 for the shipped
    draft instead of the 49,152 padded logits: the padding has q = 0, so the values agree
    up to float rounding, ~6x cheaper).
    """
    ent, top = entropy_and_top(step.scored)  # top: [TOP_K]
    out = np.empty(len(SCALAR_FEATURES), np.float32)
    out[0] = min(ent, 10.0)
    out[1: 1 + TOP_K] = top.numpy()
    out[1 + TOP_K] = step.attn_concentration if step.attn_concentration is not None else 0.0
    out[2 + TOP_K] = step.index / POSITION_SCALE
    out[3 + TOP_K] = recent
    return torch.from_numpy(out)


def soft_label(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x) / q(x)): the acceptance probability of x under speculative sampling."""
    qx = float(q[token])
    if qx <= 0.0:
        return 0.0
    return min(1.0, float(p[token]) / qx)
