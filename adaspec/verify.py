"""Verification: pure functions, no state (DESIGN §1 step 4).

Greedy: accept x_i while x_i == argmax p_i; commit argmax at the first mismatch, or the
bonus argmax p_{K+1} when all K match.

Sampling (Leviathan et al. 2023, Chen et al. 2023): accept x_i with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection commit a sample of
norm(max(p_i - q_i, 0)); when all K are accepted, sample the bonus from p_{K+1}.
The committed tokens are then distributed exactly as the target's own samples.
"""

from __future__ import annotations

import torch

from .sampling import sample
from .types import Verdict


def verify_greedy(draft_tokens: list[int], target_logits: torch.Tensor) -> Verdict:
    """draft_tokens: K ids; target_logits: [K+1, V]. Returns accepted m and the extra token."""
    target_argmax = target_logits.argmax(dim=-1).tolist()  # [K+1]
    for i, tok in enumerate(draft_tokens):
        if tok != target_argmax[i]:
            return Verdict(i, target_argmax[i], "recovered")
    return Verdict(len(draft_tokens), target_argmax[len(draft_tokens)], "bonus")


def verify_sampling(
    draft_tokens: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Exact speculative sampling.

    Args:
        draft_tokens: K ids, x_i ~ q_i.
        draft_probs: [K, V] q_1..q_K (processed).
        target_probs: [K+1, V] p_1..p_{K+1} (processed the same way).
        generator: RNG for the acceptance coins and the recovered / bonus samples.
    """
    k = len(draft_tokens)
    if k:
        idx = torch.tensor(draft_tokens, device=target_probs.device)
        rows = torch.arange(k, device=target_probs.device)
        p_x = target_probs[rows, idx]  # [K] p_i(x_i)
        q_x = draft_probs[rows, idx]  # [K] q_i(x_i) > 0 since x_i was drawn from q_i
        coins = torch.rand(k, generator=generator, device=target_probs.device)
        # accept iff u < p/q  <=>  u * q < p  (no division, q > 0)
        rejected = (coins * q_x >= p_x).tolist()
        for i in range(k):
            if rejected[i]:
                residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
                total = residual.sum()
                # total == 0 only if p_i == q_i, where rejection has probability 0;
                # guard against round-off anyway by falling back to p_i.
                dist = residual / total if total > 0 else target_probs[i]
                return Verdict(i, sample(dist, generator), "recovered")
    return Verdict(k, sample(target_probs[k], generator), "bonus")
