"""A bounded cross-request suffix cache: drafts from every text this process finished.

Finished texts (a request's output with the last ``prompt_tail`` prompt tokens before it, so
that an answer's opening is matchable) enter one ring buffer of ``max_tokens`` token slots,
oldest text evicted first (FIFO, whole texts; a text longer than the buffer keeps its tail).
Texts are separated by a sentinel (-1), so a match never runs across two texts.

For each n-gram order n in ``orders`` (default 3, 6, 12) three direct-mapped hash tables of
``2 ** ceil(log2(2 * max_tokens))`` slots (a slot: the top bits of a polynomial hash) are kept:

- ``last``: ring slot of the end of the most recent n-gram occurrence that has a follower;
- ``count``: occurrences of the n-gram with a follower;
- ``follow``: occurrences of the (n + 1)-gram (the n-gram and its follower).

Hash collisions only lose candidates or blur counts: a candidate is checked token by token
against the buffer before it is used, so every proposed continuation is a real earlier text.
A lookup tries the orders from long to short, extends the match backwards (up to
``max_match``) to measure its length, and copies the continuation after the occurrence up to
the text's end. Each copied token j carries ``count(context_j + token_j) / (count(context_j)
+ prior)`` (n-gram contexts of the matched order; drafted tokens included; ``prior`` = 1
pseudo-occurrence followed by something else, so a continuation seen once gets 0.5, seen in
9 of 9 occurrences 0.9), a frequency-based probability that the continuation recurs:
``Match.agreement`` is the first one, and the copy is cut where the product of these falls
below ``min_path_prob`` (SuffixDecoding's path floor). Memory is
``4 * max_tokens + 12 * slots * len(orders)`` bytes, allocated once.

Lookup and insertion are O(orders * (n + budget)) Python steps and O(text length) numpy
work; neither depends on how much is cached. All methods take one lock, so one cache may be
shared by every sequence of a server or every request of a vLLM proposer. It holds draft
guesses only: a proposal is verified by the target like any other draft, so outputs stay the
target's whatever the cache holds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import AdaspecError
from .ngram import Match

DEFAULT_TOKENS = 1 << 18
_P = 0x9E3779B97F4A7C15  # odd 64-bit base (Fibonacci hashing): every token reaches the top bits
_M64 = (1 << 64) - 1
_SENTINEL = -1


FILE_VERSION = 1  # of the file :meth:`SuffixCache.save` writes


class CacheFileError(AdaspecError):
    """A suffix cache file is not one (corrupt, another version) or far too large."""


def _read_file(path: Path, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T] int64, lengths [texts] int64) of a saved cache; :class:`CacheFileError`
    in one line when the file is not a valid one or is larger than ``64 * max_tokens`` bytes
    plus 1 MiB (a cache of that bound never writes one: 4 bytes a token, 8 a text)."""
    size = path.stat().st_size
    if size > 64 * max_tokens + (1 << 20):
        raise CacheFileError(f"suffix cache file {str(path)!r} is {size} bytes, far more than a "
                             f"{max_tokens}-token cache writes; delete it or raise --suffix-cache-tokens")
    try:
        with np.load(path, allow_pickle=False) as z:
            version, tokens, lengths = int(z["version"]), z["tokens"].astype(np.int64), z["lengths"]
    except Exception as exc:  # a zip / npy / key error: the file is not what save wrote
        raise CacheFileError(f"suffix cache file {str(path)!r} is unreadable ({type(exc).__name__}); "
                             f"delete it to start empty") from None
    if version != FILE_VERSION or lengths.ndim != 1 or tokens.ndim != 1 or \
            int(lengths.sum()) != len(tokens) or (len(lengths) and lengths.min() < 0) or \
            (len(tokens) and tokens.min() < 0):
        raise CacheFileError(f"suffix cache file {str(path)!r} is not a version-{FILE_VERSION} cache "
                             f"file (or is damaged); delete it to start empty")
    return tokens, lengths.astype(np.int64)


def _hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """[T - n + 1] uint64 hashes of every n-gram of ``tokens`` ([T] int64): hash i covers
    ``tokens[i : i + n]``, ``sum_k t_k P^(n - k)`` mod 2^64 (same value as :func:`_hash`)."""
    t = tokens.astype(np.uint64)
    m = len(t) - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    if m <= 0:
        return h
    p = np.uint64(_P)
    for k in range(n):
        h = (h + t[k:k + m]) * p
    return h


def _hash(tokens: Sequence[int]) -> int:
    h = 0
    for t in tokens:
        h = ((h + t) * _P) & _M64
    return h


class SuffixCache:
    """Bounded cross-request n-gram index over finished texts (module doc).

    Args:
        max_tokens: token slots of the ring buffer (the memory bound; >= 64).
        orders: n-gram orders indexed, tried from the longest (default 3, 6, 12).
        max_match: cap on the measured match length (default 64).
        min_path_prob: cut the copy where the product of the per-token probabilities
            falls below this (default 0.05).
        prompt_tail: prompt tokens stored before each output (default 16).
        prior: pseudo-occurrences in the denominator of each token's probability (default 1).
        follow_best: at every copied token, follow the most frequent continuation seen
            after the current n-gram (SuffixDecoding's rule) rather than only the most
            recent occurrence's (default true).
    """

    def __init__(self, max_tokens: int = DEFAULT_TOKENS, orders: Sequence[int] = (3, 6, 12),
                 max_match: int = 64, min_path_prob: float = 0.05, prompt_tail: int = 16,
                 prior: float = 1.0, follow_best: bool = True) -> None:
        if max_tokens < 64:
            raise ValueError(f"suffix cache needs >= 64 tokens, got {max_tokens}")
        if not orders or min(orders) < 1:
            raise ValueError(f"bad n-gram orders {orders!r}")
        self.max_tokens, self.max_match = int(max_tokens), max_match
        self.orders = tuple(sorted(set(int(n) for n in orders), reverse=True))
        self.min_path_prob, self.prompt_tail, self.prior = min_path_prob, prompt_tail, prior
        self.follow_best = follow_best
        self.bits = max(10, int(2 * self.max_tokens - 1).bit_length())
        slots = 1 << self.bits
        self._buf = np.full(self.max_tokens, _SENTINEL, dtype=np.int32)
        self._last = {n: np.full(slots, -1, dtype=np.int32) for n in self.orders}
        self._count = {n: np.zeros(slots, dtype=np.int32) for n in self.orders}
        self._follow = {n: np.zeros(slots, dtype=np.int32) for n in self.orders}
        # ring slot of the end of an occurrence followed by the most frequent follower seen
        self._best = {n: np.full(slots, -1, dtype=np.int32) for n in self.orders}
        self._texts: deque[tuple[int, int]] = deque()  # (ring start, length incl. sentinel)
        self._head = 0  # next free ring slot
        self._used = 0  # slots held by live texts (sentinels included)
        self._lock = threading.Lock()
        self.texts_added = 0
        self.tokens_added = 0

    # ------------------------------------------------------------------ bookkeeping

    @property
    def tokens(self) -> int:
        """Live cached tokens (sentinels excluded)."""
        return self._used - len(self._texts)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer and the hash tables (fixed at construction)."""
        tables = sum(a.nbytes for d in (self._last, self._count, self._follow, self._best)
                     for a in d.values())
        return self._buf.nbytes + tables

    def clear(self) -> None:
        with self._lock:
            self._buf.fill(_SENTINEL)
            for d in (self._last, self._count, self._follow, self._best):
                for a in d.values():
                    a.fill(0 if d is self._count or d is self._follow else -1)
            self._texts.clear()
            self._head = self._used = 0

    def _slot(self, h: int) -> int:
        return h >> (64 - self.bits)  # the top bits: they depend on every token of the n-gram

    def _slots(self, h: np.ndarray) -> np.ndarray:
        return (h >> np.uint64(64 - self.bits)).astype(np.int64)

    def _ring(self, start: int, length: int) -> np.ndarray:
        """Ring slot indices of ``length`` tokens from ring slot ``start``."""
        return (start + np.arange(length)) % self.max_tokens

    # ------------------------------------------------------------------ insertion

    def add(self, tokens: Sequence[int]) -> None:
        """Index one finished text (its tail if it is longer than the buffer)."""
        arr = np.asarray(tokens, dtype=np.int64)[-(self.max_tokens - 1):]
        if len(arr) < 2:
            return
        with self._lock:
            need = len(arr) + 1
            while self._texts and self._used + need > self.max_tokens:
                start, length = self._texts.popleft()
                self._count_text(self._buf[self._ring(start, length - 1)].astype(np.int64), None, -1)
                self._used -= length
            if not self._texts:
                self._head = 0
            start = self._head
            where = self._ring(start, need)
            self._buf[where[:-1]] = arr
            self._buf[where[-1]] = _SENTINEL
            self._count_text(arr, where, 1)
            self._texts.append((start, need))
            self._head = (start + need) % self.max_tokens
            self._used += need
            self.texts_added += 1
            self.tokens_added += len(arr)

    def add_generation(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Index a finished generation: the last ``prompt_tail`` prompt tokens and the output."""
        if output:
            self.add(list(prompt[max(0, len(prompt) - self.prompt_tail):]) + list(output))

    def _count_text(self, arr: np.ndarray, where: np.ndarray | None, sign: int) -> None:
        """Add (sign 1, recording ring slots ``where``) or remove (sign -1) one text's
        n-grams that have a follower, for every order."""
        for n in self.orders:
            if len(arr) < n + 1:
                continue
            h_n = _hashes(arr[:-1], n)  # n-grams ending at 0 .. T-2 (each has a follower)
            h_f = _hashes(arr, n + 1)
            s_n, s_f = self._slots(h_n), self._slots(h_f)
            np.add.at(self._count[n], s_n, sign)
            np.add.at(self._follow[n], s_f, sign)
            if where is not None:  # most recent wins: later positions are assigned last
                ends = where[n - 1:len(arr) - 1]
                self._last[n][s_n] = ends
                self._update_best(n, h_n, s_n, s_f, ends)

    def _update_best(self, n: int, h_n: np.ndarray, s_n: np.ndarray, s_f: np.ndarray,
                     ends: np.ndarray) -> None:
        """Point each n-gram's ``best`` at this occurrence (ring slot ``ends`` [T - n]) where
        its follower is now at least as frequent as the one ``best`` pointed at (hashes
        ``h_n`` [T - n], slots ``s_n`` / (n + 1)-gram slots ``s_f`` [T - n])."""
        best, follow = self._best[n], self._follow[n]
        cur = best[s_n].astype(np.int64)
        cur_tok = self._buf[(cur + 1) % self.max_tokens].astype(np.int64).astype(np.uint64)
        f_cur = follow[self._slots((h_n + cur_tok) * np.uint64(_P))]
        better = (cur < 0) | (follow[s_f] >= f_cur)
        best[s_n[better]] = ends[better]

    # ------------------------------------------------------------------ lookup

    def match(self, text: Sequence[int], budget: int) -> Match:
        """The longest-order, most recent cached match of ``text``'s suffix and up to
        ``budget`` tokens of its continuation, with per-token probabilities (module doc)."""
        if budget <= 0 or not self._texts:
            return Match()
        with self._lock:
            size = len(text)
            for n in self.orders:
                if size < n:
                    continue
                key = [int(t) for t in text[size - n:]]
                h = _hash(key)
                end = self._last[n].item(self._slot(h))
                if end < 0 or not self._same(end, key):
                    continue
                length = self._extend(end, text, n)
                return self._continue(n, end, key, h, length, budget)
        return Match()

    def _read(self, start: int, length: int) -> list[int]:
        """``length`` buffer tokens from ring slot ``start`` (may be negative or wrap)."""
        cap = self.max_tokens
        start %= cap
        if start + length <= cap:
            return self._buf[start:start + length].tolist()
        return self._buf[start:].tolist() + self._buf[:start + length - cap].tolist()

    def _same(self, end: int, key: list[int]) -> bool:
        return self._read(end - len(key) + 1, len(key)) == key

    def _extend(self, end: int, text: Sequence[int], n: int) -> int:
        """Length of the match ending at ring slot ``end`` (>= n), capped at ``max_match``."""
        extra = min(self.max_match, len(text)) - n
        if extra <= 0:
            return n
        before = self._read(end - n - extra + 1, extra)  # oldest first
        mine = text[len(text) - n - extra:len(text) - n]
        length = n
        for a, b in zip(reversed(before), reversed(mine)):
            if a != b:
                break
            length += 1
        return length

    def _continue(self, n: int, end: int, key: list[int], h: int, length: int, budget: int) -> Match:
        """Copy after ring slot ``end`` (to the text's sentinel) with per-token probabilities;
        with ``follow_best`` each step may switch to the occurrence of the current n-gram
        whose follower is more frequent (checked against the buffer)."""
        count, follow, bits = self._count[n].item, self._follow[n].item, 64 - self.bits
        top = pow(_P, n + 1, 1 << 64)  # weight of a window's oldest token in the (n + 1)-gram hash
        first_count = count(self._slot(h))
        tokens: list[int] = []
        probs: list[float] = []
        path, pos, window, cap = 1.0, end, list(key), self.max_tokens
        for _ in range(budget):
            tok = self._buf.item((pos + 1) % cap)
            f = follow((((h + tok) * _P) & _M64) >> bits) if tok != _SENTINEL else -1
            if self.follow_best:
                pos, tok, f = self._better(n, h, window, pos, tok, f)
            if tok == _SENTINEL:
                break
            c = count(h >> bits)
            p = min(f, c) / (c + self.prior)  # one sighting is weak evidence that it recurs
            path *= p
            if tokens and path < self.min_path_prob:
                break
            tokens.append(tok)
            probs.append(p)
            h = ((((h + tok) * _P) & _M64) - window[0] * top) & _M64  # slide the window by one
            window = window[1:] + [tok]
            pos = (pos + 1) % cap
        if not tokens:
            return Match()
        return Match(length, first_count, max(probs[0], 1e-6), tuple(tokens), tuple(probs), "cache")

    def _better(self, n: int, h: int, window: list[int], pos: int, tok: int, f: int) -> tuple[int, int, int]:
        """(ring slot, follower, its count): the ``best`` occurrence of ``window`` when its
        follower is more frequent than ``tok`` (count ``f``), else the ones given."""
        b = self._best[n].item(h >> (64 - self.bits))
        if b < 0 or b == pos:
            return pos, tok, f
        btok = self._buf.item((b + 1) % self.max_tokens)
        if btok == _SENTINEL or btok == tok:
            return pos, tok, f
        fb = self._follow[n].item((((h + btok) * _P) & _M64) >> (64 - self.bits))
        if fb <= f or not self._same(b, window):
            return pos, tok, f
        return b, btok, fb

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write the live texts (oldest first) to ``path`` (``.npz``; tables are rebuilt on
        :meth:`load`). Written to a temporary file and renamed, so a crash never leaves half a file."""
        path = Path(path)
        with self._lock:
            parts = [self._buf[self._ring(start, length - 1)] for start, length in self._texts]
        lengths = np.array([len(t) for t in parts], dtype=np.int64)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, version=np.int64(FILE_VERSION), tokens=tokens, lengths=lengths)
        tmp.replace(path)

    def load(self, path: str | Path) -> int:
        """Add the texts saved in ``path`` (oldest first; a file holding more than
        ``max_tokens`` keeps its newest texts, as if they had been added one by one).
        Returns the texts read.

        Raises:
            CacheFileError: not a suffix cache file of this version, or inconsistent
                (one line; the cache is left as it was).
        """
        tokens, lengths = _read_file(Path(path), self.max_tokens)
        ends = np.cumsum(lengths)
        first = int(np.searchsorted(ends, ends[-1] - self.max_tokens, side="right")) if len(ends) else 0
        for i in range(first, len(lengths)):  # older texts would be evicted by the newer ones anyway
            self.add(tokens[ends[i] - lengths[i]:ends[i]].tolist())
        return len(lengths) - first

    def report(self) -> dict:
        return {"suffix_cache_tokens": self.tokens, "suffix_cache_texts": len(self._texts)}


def make_cache(arg: bool | int | SuffixCache | None) -> SuffixCache | None:
    """The generator argument ``suffix_cache`` -> a cache: True = a new one of
    ``DEFAULT_TOKENS``, an int = a new one of that many tokens (0 = none), False / None =
    none, a :class:`SuffixCache` = that one (shared).

    Raises:
        InvalidArgumentError: anything else, or fewer than 64 tokens.
    """
    from ..errors import InvalidArgumentError

    if isinstance(arg, SuffixCache) or arg is None or arg is False:
        return arg or None
    if arg is True:
        return SuffixCache()
    if isinstance(arg, int) and arg >= 0:
        if 0 < arg < 64:
            raise InvalidArgumentError(f"suffix cache needs >= 64 tokens (or 0 for none), got {arg}")
        return SuffixCache(arg) if arg else None
    raise InvalidArgumentError(f"suffix_cache must be True, False, a token count or a SuffixCache, "
                               f"got {arg!r}")


__all__ = ["DEFAULT_TOKENS", "FILE_VERSION", "CacheFileError", "SuffixCache", "make_cache"]
