"""A model-free drafter: copy the continuation of the longest, most recent earlier match of
the text's suffix (prompt lookup decoding / suffix matching).

The text is prompt + generated ids. An incremental index maps every n-gram (n = 1 ..
``n_max + 1``) that has a follower to the end of its most recent occurrence and its count;
appending a token inserts the ``n_max + 1`` n-grams that end just before it (O(n_max) per
token), so a lookup never rescans the history. A lookup tries the suffix n-grams from
``n_max`` down to ``n_min``: the first hit is the longest, and the index keeps its most
recent occurrence. The match is then extended backwards (up to ``max_match``) to measure
its true length, and the continuation is copied from after the occurrence, LZ77-style
(it may run into the text's own suffix and then into the copied tokens themselves, so a
periodic text continues its period).

Proposals are deterministic: q is one-hot, so greedy verification is exact, and speculative
sampling (accept x with probability min(1, p(x) / 1) = p(x), else sample
norm(max(p - onehot(x), 0))) keeps the target's distribution exact too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from ..types import Draft, DraftRequest, DraftStep
from .base import DraftBuilder

if TYPE_CHECKING:
    from .suffix import SuffixCache


@dataclass(frozen=True)
class Match:
    """The n-gram source's proposal for the current text (what a source choice reads).

    Attributes:
        length: tokens of the text's suffix that equal the text before the occurrence
            (0 = no match of at least ``n_min`` tokens), capped at ``max_match``.
        count: earlier occurrences of the matched n-gram (with a follower).
        agreement: share of those occurrences followed by ``tokens[0]`` (in (0, 1]).
        tokens: the copied continuation (at most the budget asked for).
        probs: per copied token, the frequency-based probability that it follows its
            context (cross-request cache matches; empty for the request's own text).
        origin: ``"text"`` (the request's own text) or ``"cache"`` (the suffix cache).
    """

    length: int = 0
    count: int = 0
    agreement: float = 0.0
    tokens: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    origin: str = "text"


class NgramIndex:
    """Incremental n-gram index over a growing token list (see the module doc)."""

    def __init__(self, n_min: int = 1, n_max: int = 8, max_match: int = 64) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max, self.max_match = n_min, n_max, max_match
        self.text: list[int] = []
        # n-gram -> end of its most recent occurrence / occurrences (ints: nothing for the GC to walk)
        self._last: dict[tuple[int, ...], int] = {}
        self._count: dict[tuple[int, ...], int] = {}

    def reset(self) -> None:
        self.text = []
        self._last, self._count = {}, {}

    def sync(self, seq: list[int]) -> None:
        """Make the indexed text equal ``seq``: append its new tail (the usual case), or
        rebuild when ``seq`` is not an extension of the text (rare: a cut or an edit)."""
        n = len(self.text)
        if len(seq) < n or (n and seq[n - 1] != self.text[-1]) or (n > 1 and seq[0] != self.text[0]):
            self.reset()
            n = 0
        for tok in seq[n:]:
            self._append(tok)

    def _append(self, tok: int) -> None:
        text, last, count = self.text, self._last, self._count
        text.append(tok)
        end = len(text) - 2  # n-grams ending here now have a follower
        for n in range(1, min(self.n_max + 1, end + 1) + 1):
            key = tuple(text[end - n + 1:end + 1])
            last[key] = end
            count[key] = count.get(key, 0) + 1

    def match(self, budget: int) -> Match:
        """The longest, most recent earlier match of the text's suffix and up to ``budget``
        tokens of its continuation."""
        text, last = self.text, self._last
        size = len(text)
        for n in range(min(self.n_max, size - 1), self.n_min - 1, -1):
            key = tuple(text[size - n:])
            end = last.get(key)
            if end is None:
                continue
            count = self._count[key]
            length = n
            while length < self.max_match and end - length >= 0 and \
                    text[end - length] == text[size - 1 - length]:
                length += 1
            out: list[int] = []
            for j in range(budget):
                src = end + 1 + j  # < size + j: the copy may read tokens it has just copied
                out.append(text[src] if src < size else out[src - size])
            first = text[end + 1]
            follow = self._count.get(key + (first,), 0)  # an (n+1)-gram: n <= n_max
            agree = (follow + (end + 1 == size - 1)) / count
            return Match(length, count, min(1.0, agree), tuple(out))
        return Match()


class NgramStep(DraftStep):
    """A :class:`DraftStep` from the n-gram source: one-hot q, no hidden state.

    ``logits`` ([V]: 0 at the token, -inf elsewhere) and ``probs`` ([V] one-hot) are built
    only if a policy reads them. ``match_len`` / ``agreement`` describe the match; ``prob``
    is the token's frequency-based probability (a suffix-cache match; 1.0 for the request's
    own text) and ``origin`` where the copy came from (``"text"`` or ``"cache"``).
    """

    source = "ngram"

    def __init__(self, index: int, token: int, vocab_size: int, context_len: int,
                 match_len: int, agreement: float, prob: float = 1.0, origin: str = "text") -> None:
        self.index, self.token, self.vocab_size = index, token, vocab_size
        self.hidden, self.attn_concentration, self.context_len = None, None, context_len
        self.match_len, self.agreement = match_len, agreement
        self.prob, self.origin = prob, origin  # frequency-based P(token follows), match origin

    @property
    def scored(self) -> torch.Tensor:
        return torch.zeros(1)  # one finite logit (the token's): entropy 0, top-1 probability 1

    @property
    def token_prob(self) -> float:
        return 1.0

    @property
    def top1(self) -> float:
        return 1.0

    @cached_property
    def logits(self) -> torch.Tensor:  # type: ignore[override]
        out = torch.full((self.vocab_size,), -math.inf)
        out[self.token] = 0.0
        return out

    @cached_property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        out = torch.zeros(self.vocab_size)
        out[self.token] = 1.0
        return out

    def __repr__(self) -> str:
        return f"NgramStep(index={self.index}, token={self.token}, match_len={self.match_len})"


@dataclass
class NgramDrafter:
    """Drafts the continuation of the longest suffix match (module doc); costs no forward.

    With a :class:`~.suffix.SuffixCache` the request's own index is looked up first and the
    cache proposes instead when its match is longer; every finished text (the committed ids
    this drafter saw last, from ``prompt_tail`` prompt tokens on) enters the cache at the
    next :meth:`reset` or :meth:`flush`.

    Args:
        vocab_size: the target's logits size (for one-hot q under sampling).
        n_min / n_max: n-gram sizes tried, from long to short (defaults 1 / 8).
        min_match: propose nothing when the match is shorter (default 2).
        max_match: cap on the measured match length (default 64).
        cache: a cross-request suffix cache (shareable), or None.
    """

    vocab_size: int
    n_min: int = 1
    n_max: int = 8
    min_match: int = 2
    max_match: int = 64
    max_context: int = 1 << 30
    cache: SuffixCache | None = None
    index: NgramIndex = field(init=False, repr=False)
    lookup_s: float = field(default=0.0, init=False)  # seconds spent indexing + matching
    cache_s: float = field(default=0.0, init=False)  # seconds in cache lookups and insertions
    cache_matches: int = field(default=0, init=False)  # lookups won by the cache
    _live: list[int] | None = field(default=None, init=False, repr=False)
    _live_len: int = field(default=0, init=False, repr=False)
    _prompt_len: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = NgramIndex(self.n_min, self.n_max, self.max_match)

    def reset(self) -> None:
        self.flush()
        self.index.reset()
        self.lookup_s = self.cache_s = 0.0
        self.cache_matches = 0

    def flush(self) -> None:
        """Put the last generation's text (from ``prompt_tail`` prompt tokens on) in the cache."""
        live, self._live = self._live, None
        if self.cache is None or live is None or self._live_len <= self._prompt_len:
            return
        t = time.perf_counter()
        self.cache.add_generation(live[:self._prompt_len], live[self._prompt_len:self._live_len])
        self.cache_s += time.perf_counter() - t

    def prefill(self, context: list[int]) -> None:
        self.index.sync(context)
        self._prompt_len = len(context) + 1

    def rollback(self, committed: list[int]) -> None:
        """Nothing to drop (the index only holds committed text); it catches up on lookup.
        The committed ids are remembered for the cache (a reference: no copy per round)."""
        self._live, self._live_len = committed, len(committed)

    def match(self, context: list[int], budget: int) -> Match:
        """Bring the index to ``context`` and look its suffix up, then the cache (timed in
        ``lookup_s``; the cache's share also in ``cache_s``)."""
        t = time.perf_counter()
        self.index.sync(context)
        m = self.index.match(budget)
        if self.cache is not None:
            t1 = time.perf_counter()
            g = self.cache.match(context, budget)
            if g.length > m.length:
                m = g
                self.cache_matches += 1
            self.cache_s += time.perf_counter() - t1
        self.lookup_s += time.perf_counter() - t
        return m

    def propose(self, context: list[int], request: DraftRequest, match: Match | None = None) -> Draft:
        """Draft the match's continuation (nothing below ``min_match``); ``request.decide``
        is asked after every token. A one-hot q has no other candidates to branch to."""
        m = match if match is not None else self.match(context, request.budget)
        if m.length < self.min_match:
            return Draft.empty()
        return self.draft_from(m, context, request)

    def draft_from(self, m: Match, context: list[int], request: DraftRequest) -> Draft:
        """The draft of match ``m``'s continuation, cut by ``request.decide`` (q one-hot)."""
        build = DraftBuilder(request)
        n = len(context)
        for i, tok in enumerate(m.tokens[:request.budget], start=1):
            prob = m.probs[i - 1] if i <= len(m.probs) else 1.0
            if not build.keep(NgramStep(i, tok, self.vocab_size, n, m.length, m.agreement, prob, m.origin)):
                break
        return build.finish(0)

    def report(self) -> dict:
        out = {"ngram_lookup_s": self.lookup_s}
        if self.cache is not None:
            out.update(suffix_cache_s=self.cache_s, suffix_cache_matches=self.cache_matches,
                       **self.cache.report())
        return out
