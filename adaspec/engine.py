"""The only decoding loop: prefill, then policy -> draft -> verify -> commit -> observe.

No model-specific code lives here: models are behind a runner (:mod:`adaspec.runtime`),
drafting behind the drafter protocol, decisions behind the policy protocol, and the
maths of acceptance in :mod:`adaspec.verify`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .drafters.base import Drafter
from .errors import InvalidArgumentError, PromptTooLongError
from .policies.base import Policy
from .runtime import make_runner
from .sampling import SamplingConfig, processed_probs
from .types import (
    Draft,
    DraftRequest,
    DraftStep,
    GenerationStats,
    RoundContext,
    RoundOutcome,
    Verdict,
    VerifyCall,
)
from .verify import verify_greedy, verify_sampling, verify_tree


@dataclass
class StopRules:
    """When to end generation: token budget, EOS ids, stop strings (checked on decoded text).

    ``decode`` turns ids into text; it is needed only when ``stop_strings`` is not empty.
    """

    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None
    _window: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidArgumentError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise InvalidArgumentError("stop strings must not be empty")
        if self.stop_strings and self.decode is None:
            raise InvalidArgumentError("stop strings need a tokenizer to decode with")
        # a stop string of L characters ends within the last L + 2 tokens
        self._window = max((len(s) for s in self.stop_strings), default=0) + 2

    def hit_stop_string(self, new_ids: list[int]) -> bool:
        if not self.stop_strings:
            return False
        tail = self.decode(new_ids[-self._window:])
        return any(s in tail for s in self.stop_strings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Stage clocks of one generate call, in seconds (``time.perf_counter``).

    ``policy`` holds ``begin_round`` and ``observe``; ``hooks`` the per-token policy hooks,
    which run inside drafting, so a round's draft time excludes them (:meth:`end_round`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.policy = self.hooks = 0.0
        self.start = self.now(sync=True)

    def now(self, sync: bool = False) -> float:
        """The clock, after waiting for queued device work when ``sync``."""
        if sync:
            _sync(self.device)
        return time.perf_counter()

    def hooked(self, hook: Callable[[DraftStep], Any]) -> Callable[[DraftStep], Any]:
        """``hook`` with its time counted as policy time, not draft time."""

        def call(step: DraftStep) -> Any:
            t = time.perf_counter()
            result = hook(step)
            self.hooks += time.perf_counter() - t
            return result

        return call

    @contextmanager
    def policy_time(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.policy += time.perf_counter() - t

    def end_round(self, stats: GenerationStats, t_draft: float, hooks_before: float, t_verify: float,
                  t_end: float) -> None:
        """Add one round's draft (minus its policy hooks) and verify time to ``stats``."""
        stats.draft_s += (t_verify - t_draft) - (self.hooks - hooks_before)
        stats.verify_s += t_end - t_verify


class Engine:
    """Speculative decoding of one target with one drafter under one policy (one sequence;
    :mod:`adaspec.serve.batch` drives many engines' rounds with one target forward per step)."""

    def __init__(self, target: torch.nn.Module, vocab_size: int, max_context: int,
                 drafter: Drafter | None, policy: Policy, runtime: str = "eager",
                 release: bool = False) -> None:
        self.target = make_runner(target, runtime, release)
        self.runtime = runtime
        self.vocab_size = vocab_size
        self.max_context = min(max_context, getattr(self.target, "capacity", max_context))
        self.drafter = drafter
        self.policy = policy
        self.cap: int | None = None  # a batch-level draft budget for the next round (None: none)

    def plain_greedy(self, prompt: list[int], rules: StopRules) -> list[int]:
        """The target's own greedy continuation (plain decoding: no drafter, so the base
        policy is never asked for a budget)."""
        plain = Engine(self.target.model, self.vocab_size, self.max_context, None, Policy(), self.runtime)
        ids: list[int] = []
        for chunk in plain.run(prompt, SamplingConfig(), rules, GenerationStats()):
            ids.extend(chunk)
        return ids

    def run(
        self,
        prompt: list[int],
        sampling: SamplingConfig,
        rules: StopRules,
        stats: GenerationStats,
    ) -> Iterator[list[int]]:
        """Generate after ``prompt``; yields the ids committed by each round.

        ``stats`` is filled in place (final once the iterator is exhausted).
        """
        rounds = self.rounds(prompt, sampling, rules, stats)
        item = next(rounds, None)
        while item is not None:
            if isinstance(item, VerifyCall):
                item = rounds.send(item.run())
            else:
                yield item
                item = next(rounds, None)

    def rounds(
        self,
        prompt: list[int],
        sampling: SamplingConfig,
        rules: StopRules,
        stats: GenerationStats,
    ) -> Generator[VerifyCall | list[int], Any, None]:
        """:meth:`run` with the target forward handed out: yields a :class:`VerifyCall` and
        expects its output sent back, then yields the round's committed ids (send None)."""
        policy, drafter = self.policy, self.drafter
        gen = self._start(prompt, sampling, rules)
        # a drafter that reads the target's features (a feature head) gets the target's
        # last hidden state of every committed position, from prefill and from each verify
        feeds = drafter is not None and getattr(drafter, "needs_target_hidden", False)
        want_hidden = policy.needs_target_hidden or feeds
        max_new = min(rules.max_new_tokens, self.max_context - len(prompt))
        ctx_limit = min(self.max_context, drafter.max_context if drafter else self.max_context)
        stats.prompt_tokens = len(prompt)
        clock = StageTimer(self.target.device)
        self._prefill(prompt, feeds)
        stats.prefill_s = clock.now(sync=True) - clock.start
        ids, new = list(prompt), []
        decide = clock.hooked(policy.decide)
        branches = type(policy).extra_candidates is not Policy.extra_candidates  # else never asked
        branch = clock.hooked(policy.extra_candidates) if branches else None
        while True:
            # 1. budget: never draft past max_new_tokens (a round commits K + 1) or the context
            room = min(max_new - len(new) - 1, ctx_limit - len(ids))
            ctx = RoundContext(ids, len(prompt), stats.rounds, max(room, 0))
            with clock.policy_time():
                budget = min(policy.begin_round(ctx), room) if drafter is not None else 0
            if self.cap is not None:
                budget = min(budget, self.cap)
            # 2. draft
            t1, hooks_before = clock.now(), clock.hooks
            draft = Draft.empty()
            if budget > 0:  # a drafter with propose_steps hands its draft forwards out too
                propose = getattr(drafter, "propose_steps", None)
                request = DraftRequest(budget, sampling, decide, gen, policy.needs, branch)
                draft = (yield from propose(ids, request)) if propose else drafter.propose(ids, request)
            t2 = clock.now(sync=True)
            # 3. verify: one target forward over [last committed, x1..xK] -> p1..p(K+1)
            verdict, logits, out, path = yield from self._verify(ids, draft, sampling, gen, want_hidden,
                                                                 stats)
            t3 = clock.now(sync=True)
            # 4. commit the accepted prefix plus one token, honouring EOS / stop / budget
            committed, reason = _commit(draft, verdict, new, rules, max_new)
            if feeds:  # target features of the last committed token and the accepted path
                drafter.observe_target(len(ids) - 1, out.hidden[[0, *(1 + j for j in path)]])
            ids.extend(committed)
            # 5. roll both caches back to the committed prefix (a crop, never a recompute);
            # a fully accepted draft's last token is fed with the next round's first forward
            self.target.rollback(ids)
            if drafter is not None:
                drafter.rollback(ids)
            clock.end_round(stats, t1, hooks_before, t2, t3)
            stats.target_forwards += 1
            stats.draft_forwards += draft.forwards
            stats.record_round(len(draft.tokens), verdict.accepted)
            # 6. observe (the policy may read the target's root + chain rows)
            with clock.policy_time():
                hidden = out.hidden[: len(draft.tokens) + 1] if policy.needs_target_hidden else None
                policy.observe(RoundOutcome(draft, verdict, logits, hidden, t2 - t1, t3 - t2, ctx))
            stats.new_tokens = len(new)
            stats.stop_reason = reason
            yield committed
            if reason:
                break
        stats.wall_s = clock.now(sync=True) - clock.start
        stats.policy_s = clock.policy + clock.hooks
        stats.extra.update(policy.report())

    def _start(self, prompt: list[int], sampling: SamplingConfig, rules: StopRules) -> torch.Generator | None:
        """Check the prompt, let the policy ask for a reference (untimed); the sampling RNG."""
        if not prompt:
            raise InvalidArgumentError("prompt is empty (no tokens)")
        if len(prompt) >= self.max_context:
            raise PromptTooLongError(
                f"prompt has {len(prompt)} tokens but the model's context is {self.max_context}")
        self.policy.before_generate(prompt, lambda: self.plain_greedy(prompt, rules))
        if sampling.greedy:
            return None
        return torch.Generator().manual_seed(sampling.seed if sampling.seed is not None
                                             else int(torch.seed() % 2**63))

    def _prefill(self, prompt: list[int], feeds: bool) -> None:
        """Reset everything and prefill both models with the prompt minus its last token."""
        self.target.reset()
        self.policy.reset()
        if self.drafter is not None:
            self.drafter.reset()
            self.drafter.prefill(prompt[:-1])
        prompt_hidden = self.target.prefill(prompt[:-1], hidden=feeds)
        if feeds and prompt_hidden is not None:
            self.drafter.observe_target(len(prompt) - 1 - prompt_hidden.shape[0], prompt_hidden)

    def _verify(self, ids: list[int], draft: Draft, sampling: SamplingConfig, gen: torch.Generator | None,
                hidden: bool, stats: GenerationStats):
        """One target forward over the draft (chain or tree) and the verdict.

        Returns (verdict, chain logits [K+1, V], forward output (row 0 the last committed
        token, row 1 + j draft node j), accepted path: the node indices of the accepted tokens).
        """
        k = len(draft.tokens)
        stats.tree_nodes += draft.tree_size
        if draft.branches:
            stats.branch_rounds += 1
            verdict, logits, out, path = yield from self._verify_tree(ids, draft, sampling, gen, hidden)
            stats.branch_accepts += verdict.branch_rank > 0
            return verdict, logits, out, path[: verdict.accepted]
        out = yield VerifyCall(self.target, ids + draft.tokens, k + 1, hidden)
        logits = out.logits[:, : self.vocab_size]  # [K+1, V]
        if sampling.greedy:
            verdict = verify_greedy(draft.tokens, logits)
        else:
            p = processed_probs(logits, sampling).cpu()
            verdict = verify_sampling(draft.tokens, draft.probs.cpu() if k else p[:0], p, gen)
        return verdict, logits, out, list(range(verdict.accepted))

    def _verify_tree(self, ids: list[int], draft: Draft, sampling: SamplingConfig,
                     gen: torch.Generator | None, hidden: bool):
        """Verify the chain plus extra candidates in one target forward (tree attention),
        then keep only the accepted path in the target's cache.

        Returns (verdict, chain logits [K+1, V], forward output over all tree rows
        (row 0 the last committed token, row 1 + j tree node j), accepted path: node indices).
        """
        k = len(draft.tokens)
        nodes, parents = list(draft.tokens), list(range(-1, k - 1))
        sib_nodes: dict[tuple[int, int], int] = {}
        for pos, cands in sorted(draft.branches.items()):
            for c in cands:
                sib_nodes[(pos, c)] = len(nodes)
                nodes.append(c)
                parents.append(pos - 2)  # same parent as chain node pos-1
        out = yield VerifyCall(self.target, ids, len(nodes) + 1, hidden, nodes, parents)
        logits = out.logits[:, : self.vocab_size]  # [1 + T, V]
        probs = None
        if not sampling.greedy:
            probs = (draft.probs.cpu(), processed_probs(logits, sampling).cpu())
        verdict, path = verify_tree(draft.tokens, draft.branches, logits, sib_nodes, probs, gen)
        self.target.keep_path(len(ids), nodes, path)
        return verdict, logits[: k + 1], out, path


def _commit(draft: Draft, verdict: Verdict, new: list[int], rules: StopRules, max_new: int,
            ) -> tuple[list[int], str]:
    """The ids a round commits (appended to ``new`` too) and the stop reason ("" to go on)."""
    if verdict.branch_rank:  # an extra candidate replaced the chain token at `accepted`
        alt = draft.branches[verdict.accepted][verdict.branch_rank - 1]
        proposal = draft.tokens[: verdict.accepted - 1] + [alt, verdict.token]
    else:
        proposal = draft.tokens[: verdict.accepted] + [verdict.token]
    committed, reason = [], ""
    for tok in proposal:
        committed.append(tok)
        new.append(tok)
        if tok in rules.eos_ids:
            reason = "eos"
        elif rules.hit_stop_string(new):
            reason = "stop_string"
        elif len(new) >= max_new:
            reason = "max_new_tokens" if max_new == rules.max_new_tokens else "context"
        if reason:
            break
    return committed, reason
