"""Contracts that cross module borders: what a drafter proposes, what verification decides,
what a policy sees per drafted token and per round, the forwards a round hands out
(:class:`VerifyCall`), and the per-call statistics.

Shapes: V = vocabulary size (logits' last dim), d = hidden size, K = drafted tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import RunMetrics
from .sampling import SamplingConfig


class Action(enum.Enum):
    """A policy's verdict on the token just drafted."""

    CONTINUE = "continue"  # keep the token and draft another
    STOP = "stop"          # keep the token, end the draft here
    DROP = "drop"          # discard the token, end the draft before it


@dataclass(frozen=True)
class DraftNeeds:
    """Which optional draft outputs the policy reads (each costs something to compute)."""

    hidden: bool = False
    attention: bool = False


class DraftStep:
    """One drafted position, as a policy sees it before deciding.

    Attributes:
        index: 1-based position of this token in the current draft.
        token: proposed token id (argmax of q under greedy, a sample of q otherwise).
        hidden: [d] draft last-layer hidden state that produced the logits, if requested.
        attn_concentration: scalar in [0, 1], max attention weight of the draft's last
            layer averaged over heads, if requested.
        context_len: committed tokens before this draft (prompt + generated).

    Read on demand (a drafter computes them lazily, so a policy pays only for what it reads):
        logits: [V] raw draft logits at this position (float32; -inf where q = 0).
        probs: [V] draft distribution q after temperature / top-k / top-p (float32);
            under greedy this is softmax(logits).
        scored: [Vs] logits of the tokens the draft scores (a reduced-vocabulary draft's
            own Vs scores, all V otherwise; every other token has q = 0): what the entropy /
            top-k features read.
        token_prob: q(token); top1: max_v q(v).
    """

    def __init__(self, index: int, token: int, logits: torch.Tensor, probs: torch.Tensor,
                 hidden: torch.Tensor | None = None, attn_concentration: float | None = None,
                 context_len: int = 0) -> None:
        self.index: int = index  # 1-based position in the draft
        self.token: int = token
        self.context_len: int = context_len
        self.logits: torch.Tensor = logits  # [V] float32
        self.probs: torch.Tensor = probs  # [V] float32
        self.hidden: torch.Tensor | None = hidden  # [d] or None
        self.attn_concentration: float | None = attn_concentration  # scalar in [0, 1] or None

    @property
    def scored(self) -> torch.Tensor:
        """[Vs] logits of the tokens the draft scores (here all V)."""
        return self.logits

    @property
    def token_prob(self) -> float:
        """q(token)."""
        return float(self.probs[self.token])

    @property
    def top1(self) -> float:
        """max_v q(v), the draft's confidence at this position."""
        return float(self.probs.max())


DecideFn = Callable[[DraftStep], Action]  # a policy's verdict on each drafted token
BranchFn = Callable[[DraftStep], int]  # extra candidates at a kept position (0 = none)


def _keep_drafting(step: DraftStep) -> Action:
    return Action.CONTINUE


@dataclass
class DraftRequest:
    """What one round asks of a drafter (``Drafter.propose(context, request)``).

    Attributes:
        budget: at most this many tokens (>= 1).
        sampling: how q derives from the draft's logits (greedy: argmax).
        decide: asked after every drafted token (the policy's ``decide``).
        generator: RNG of the draws under sampling (None under greedy).
        needs: optional draft outputs the policy reads (hidden state, attention).
        branch: extra candidates per kept position (a token tree), or None.
    """

    budget: int  # at most this many tokens
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    decide: DecideFn = _keep_drafting  # (step) -> Action
    generator: torch.Generator | None = None  # the draws' RNG (sampling)
    needs: DraftNeeds = field(default_factory=DraftNeeds)
    branch: BranchFn | None = None  # (step) -> extra candidates, or None: never branch


@dataclass
class Draft:
    """Tokens proposed in one round.

    Attributes:
        tokens: K proposed token ids (K may be 0).
        probs: [K, V] draft distributions q_i the tokens were drawn from (needed by
            sampling verification), or None under greedy.
        steps: the K kept :class:`DraftStep` s (features for policies / traces).
        forwards: draft-model forward calls spent on this draft (dropped tokens included).
        branches: extra candidates per position, ``{i: [c1, c2, ...]}`` for 1-based
            position i: alternatives to ``tokens[i-1]`` drawn from the same q_i (most
            likely first), verified together with the chain as a token tree. They are
            leaves: drafting continues along ``tokens`` only.
    """

    tokens: list[int]  # [K] token ids
    probs: torch.Tensor | None  # [K, V] float32 q_i, or None (greedy)
    steps: list[DraftStep]  # [K]
    forwards: int  # draft forwards spent
    branches: dict[int, list[int]] = field(default_factory=dict)  # position (1-based) -> [c] candidates

    @classmethod
    def empty(cls) -> Draft:
        """No tokens (a round that drafts nothing)."""
        return cls([], None, [], 0)

    @property
    def tree_size(self) -> int:
        """Draft tokens verified this round: chain plus extra candidates."""
        return len(self.tokens) + sum(len(c) for c in self.branches.values())


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying K draft tokens.

    Attributes:
        accepted: m, number of draft tokens accepted (prefix of the draft).
        token: the extra token committed after them: the target's correction at the first
            rejection (greedy), the recovered sample (sampling), or the bonus token when
            all K were accepted.
        kind: "bonus" (all accepted) or "recovered" (a rejection happened).
    """

    accepted: int  # m in [0, K]
    token: int  # the committed extra token id
    kind: str  # "bonus" | "recovered"
    branch_rank: int = 0  # 0: the chain token was accepted last; r >= 1: extra candidate r


@dataclass(frozen=True)
class RoundContext:
    """What a policy knows before drafting a round."""

    committed: Sequence[int]  # [prompt_len + generated] ids so far
    prompt_len: int
    round_index: int  # 0-based
    max_budget: int  # hard cap from max_new_tokens / context length


@dataclass
class RoundOutcome:
    """What a policy learns after verification (docs/design.md §1 step 6).

    Attributes:
        draft: the draft that was verified.
        verdict: accepted length and the committed extra token.
        target_logits: [K+1, V] target logits at the verified positions.
        target_hidden: [K+1, d] target last-layer hidden states, if a policy asked for them.
        draft_s / verify_s: measured seconds of this round's drafting and verification.
    """

    draft: Draft
    verdict: Verdict
    target_logits: torch.Tensor  # [K+1, V] float32
    target_hidden: torch.Tensor | None  # [K+1, d] or None
    draft_s: float  # seconds
    verify_s: float  # seconds
    context: RoundContext | None = None


@dataclass
class VerifyCall:
    """One forward handed out to whoever drives the round: the target forward a round of
    the engine needs, or a draft forward of ``ModelDrafter.propose_steps``.

    A chain: outputs for the last ``n_out`` positions of ``seq`` (committed ids + draft).
    A tree (``nodes`` set): outputs for [root, node 0..T-1] over ``seq`` (committed ids,
    ending with the root) plus ``nodes`` with ``parents`` (see ``forward_tree``).
    :meth:`run` executes it on ``runner``; the batch engine may execute many in one forward.
    """

    runner: Any  # a RunnerBase (adaspec.runtime.eager)
    seq: list[int]  # [S] committed ids + draft (chain) / ending with the root (tree)
    n_out: int  # outputs for the last n_out positions of seq (chain)
    hidden: bool  # also return [n, d] last-layer hidden states
    nodes: list[int] | None = None  # [T] tree node ids (tree only)
    parents: list[int] | None = None  # [T] parent of each node: -1 = the root, else a node index
    concentration: bool = False  # the runner's attention_concentration() reports this forward
    synced: int = 0  # seq[:synced] is what the runner's cache held after its last forward (no compare)

    def run(self) -> Any:
        """The forward output (``ForwardOut``) from this call's own runner."""
        if self.nodes is None:
            kw: dict[str, Any] = {"concentration": True} if self.concentration else {}
            if self.synced:
                kw["synced"] = self.synced
            return self.runner.forward(self.seq, self.n_out, hidden=self.hidden, **kw)
        return self.runner.forward_tree(self.seq, self.nodes, self.parents, hidden=self.hidden)


@dataclass
class GenerationStats(RunMetrics):
    """Per-call statistics with the docs/design.md §2 definitions: the mergeable counts of
    :class:`~adaspec.metrics.RunMetrics` (τ, acceptance, per-position acceptance, the
    accepted-length histogram; ``a + b`` pools calls) plus what belongs to one call."""

    stop_reason: str = ""
    extra: dict = field(default_factory=dict)  # policy / drafter specific (e.g. tau trace)

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "tau": self.tau,
            "acceptance_rate": self.acceptance_rate,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "wasted_draft_tokens": self.drafted_tokens - self.accepted_tokens,
            "rounds": self.rounds,
            "tree_nodes": self.tree_nodes,
            "branch_rounds": self.branch_rounds,
            "branch_accepts": self.branch_accepts,
            "accept_hist": list(self.accept_hist),
            "per_position_acceptance": self.per_position_acceptance,
            "prefill_s": self.prefill_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "policy_s": self.policy_s,
            **self.stage_pct(empty=float("nan")),
            "stop_reason": self.stop_reason,
            **({"extra": self.extra} if self.extra else {}),
        }
