"""Verification: pure functions, no state (docs/design.md §1 step 4).

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
    """draft_tokens: K ids; target_logits: [K+1, V]. Returns accepted m and the extra token.

    A chain is a tree without siblings: the rule is :func:`verify_tree`'s.
    """
    return verify_tree(draft_tokens, {}, target_logits, {})[0]


def greedy_from_argmax(draft_tokens: list[int], target_argmax: list[int]) -> Verdict:
    """:func:`verify_greedy` when the target's argmax ids ([K+1]) are already known
    (teacher-forced replays, which score many rounds from one forward)."""
    return _greedy(draft_tokens, {}, target_argmax, {})[0]


def verify_sampling(
    draft_tokens: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Exact speculative sampling of a chain (the rule is :func:`verify_tree`'s).

    Args:
        draft_tokens: K ids, x_i ~ q_i.
        draft_probs: [K, V] q_1..q_K (processed).
        target_probs: [K+1, V] p_1..p_{K+1} (processed the same way).
        generator: RNG for the acceptance coins and the recovered / bonus samples.
    """
    return verify_tree(draft_tokens, {}, target_probs, {}, (draft_probs, target_probs), generator)[0]


def _accept_candidate(residual: torch.Tensor, candidates: list[int],
                      generator: torch.Generator | None) -> tuple[int, int] | None:
    """Multi-candidate speculative sampling over deterministic candidates.

    Tests candidates in turn: accept c with probability r(c) under the current
    residual r, else set r(c) = 0 and renormalise (SpecInfer-style recursive rejection).
    The token returned, accepted candidate or final residual sample, is distributed
    exactly as r. Returns (rank, token) for an accepted candidate (rank >= 1), None
    after all rejections; ``residual`` ([V], sums to 1) is updated in place.
    """
    for rank, c in enumerate(candidates, start=1):
        if float(torch.rand((), generator=generator)) < float(residual[c]):
            return rank, c
        residual[c] = 0
        total = residual.sum()
        if total <= 0:
            return None
        residual /= total
    return None


def verify_tree(
    draft_tokens: list[int],
    branches: dict[int, list[int]],
    node_logits: torch.Tensor,
    sib_nodes: dict[tuple[int, int], int],
    sampling_probs: tuple[torch.Tensor | None, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Verdict, list[int]]:
    """Verify a chain with extra candidates (leaves) at some positions.

    Args:
        draft_tokens: chain x_1..x_K (node i-1 holds x_i).
        branches: {position i: [extra candidates for x_i]}.
        node_logits: [1 + T, V] target logits; row 0 is the root (last committed token),
            row 1 + j the output of tree node j (chain nodes first, then candidates).
        sib_nodes: (position, token) -> tree node index of that candidate.
        sampling_probs: None for greedy, else (q [K, V] chain draft probs, p [1 + T, V]
            processed target probs per node row).

    Returns:
        (verdict, path): path lists the tree node indices committed, in order.

    Greedy: the target's argmax at position i is accepted if it is the chain token
    (continue) or one of the candidates (stop there, bonus from that candidate's row).
    Sampling: the chain token first faces min(1, p/q); after a rejection the residual
    norm(max(p - q, 0)) is sampled by testing the candidates in turn (exact).
    """
    if sampling_probs is None:
        return _greedy(draft_tokens, branches, node_logits.argmax(dim=-1).tolist(), sib_nodes)
    return _sampling(draft_tokens, branches, *sampling_probs, sib_nodes, generator)


def _greedy(draft_tokens: list[int], branches: dict[int, list[int]], argmax: list[int],
            sib_nodes: dict[tuple[int, int], int]) -> tuple[Verdict, list[int]]:
    """Greedy rule over the target's argmax per node row (``argmax[0]`` the root's)."""
    k = len(draft_tokens)
    for i in range(1, k + 2):
        best = argmax[i - 1]  # row of the parent of position i: root or chain node i-2
        if i <= k and draft_tokens[i - 1] == best:
            continue
        cands = branches.get(i, [])
        if best in cands:
            j = sib_nodes[(i, best)]
            return Verdict(i, argmax[1 + j], "recovered", cands.index(best) + 1), list(range(i - 1)) + [j]
        return Verdict(i - 1, best, "bonus" if i > k else "recovered"), list(range(i - 1))
    raise AssertionError("unreachable")


def _sampling(draft_tokens: list[int], branches: dict[int, list[int]], q: torch.Tensor, p: torch.Tensor,
              sib_nodes: dict[tuple[int, int], int], generator: torch.Generator | None,
              ) -> tuple[Verdict, list[int]]:
    """Sampling rule; q: [K, V] chain draft probs, p: [1 + T, V] target probs per node row."""
    k = len(draft_tokens)
    if k:
        idx = torch.tensor(draft_tokens, device=p.device)
        rows = torch.arange(k, device=p.device)
        p_x = p[rows, idx]  # [K] p_i(x_i): row i-1 is the parent of position i on the chain
        q_x = q[rows, idx]  # [K] q_i(x_i) > 0 since x_i was drawn from q_i
        coins = torch.rand(k, generator=generator, device=p.device)
        # accept iff u < p/q  <=>  u * q < p  (no division, q > 0)
        rejected = (coins * q_x >= p_x).tolist()
        for i in range(1, k + 1):
            if not rejected[i - 1]:
                continue
            residual = (p[i - 1] - q[i - 1]).clamp_min(0)
            total = residual.sum()
            # total == 0 only if p_i == q_i, where rejection has probability 0;
            # guard against round-off anyway by falling back to p_i.
            residual = residual / total if total > 0 else p[i - 1].clone()
            cands = branches.get(i, [])
            hit = _accept_candidate(residual, cands, generator) if cands else None
            if hit is not None:
                rank, c = hit
                j = sib_nodes[(i, c)]
                return Verdict(i, sample(p[1 + j], generator), "recovered", rank), list(range(i - 1)) + [j]
            return Verdict(i - 1, sample(residual, generator), "recovered"), list(range(i - 1))
    return Verdict(k, sample(p[k], generator), "bonus"), list(range(k))
