"""Compiled per-token pieces of the drafting policies' hot path (numba, one pass each).

A learned policy decides after every draft token, so its features and its head run once
per drafted token beside a ~0.4 ms draft forward. Done with torch / numpy ops they cost
~0.2 ms a token in place (a dozen small dispatches over 8,192 logits, run with caches the
forward has just flushed). These are the same maths in one loop each:

- :func:`entropy_top`: entropy (nats) and the k largest probabilities from softmax(x) and
  log_softmax(x) (``predictors.features.entropy_and_top``; the two vectorised torch passes
  stay, the reductions and the top-k become one loop);
- :func:`context_logit`: the ``context`` head's logit for one position
  (``predictors.models.ContextHead.forward``).

Results equal the torch / numpy versions up to float rounding (they sum in float64 and
in another order). Policies read them only when the compiled runtime has set numba up
(:func:`adaspec.predictors.fastpath.kernels`), so importing a policy never imports numba.
"""

# ruff: noqa: I001  (kernels must import numba first: it sets SVML off)
from __future__ import annotations

import math

from . import kernels  # noqa: F401  (sets numba up first)

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402


@njit(cache=True)
def entropy_top(p, lp, k):
    """p [V] = softmax(x), lp [V] = log_softmax(x) (float32; torch's vectorised kernels
    make them) -> (entropy -sum p lp in nats, [k] float32 largest probabilities,
    descending; 0 where fewer than k are non-zero). Entries with p == 0 are skipped."""
    top = np.zeros(k, np.float32)
    ent = 0.0
    for i in range(p.shape[0]):
        v = p[i]
        if v == 0.0:
            continue
        ent -= float(v) * float(lp[i])
        if v > top[k - 1]:  # insertion into the running top-k (descending)
            j = k - 1
            while j > 0 and top[j - 1] < v:
                top[j] = top[j - 1]
                j -= 1
            top[j] = v
    return ent, top


@njit(cache=True)
def context_logit(h, s, wh, ws, b, w_out, b_out, skip, s_mean, s_std, eps):
    """The ``context`` head for one position: h [d] hidden state, s [n] scalar features;
    wh [w, d] / ws [w, n] / b [w] the hidden layer, w_out [w] / b_out the output, skip [n]
    the scalars' linear path, s_mean / s_std [n] their standardisation, eps the LayerNorm's.
    Returns the logit (a float)."""
    d = h.shape[0]
    mean = 0.0
    for i in range(d):
        mean += h[i]
    mean /= d
    var = 0.0
    for i in range(d):
        var += (h[i] - mean) ** 2
    inv = 1.0 / math.sqrt(var / d + eps)
    n = s.shape[0]
    z = np.empty(n)
    total = b_out
    for j in range(n):
        z[j] = (s[j] - s_mean[j]) / s_std[j]
        total += skip[j] * z[j]
    for r in range(wh.shape[0]):
        a = float(b[r])
        for i in range(d):
            a += wh[r, i] * ((h[i] - mean) * inv)
        for j in range(n):
            a += ws[r, j] * z[j]
        if a > 0.0:
            total += w_out[r] * a
    return total
