"""``python -m adaspec.bench.suffix_ceiling``: how much a workload repeats itself across
requests, as n-gram drafting alone would see it (no model, no clock).

Replays a greedy ``bench`` folder's recorded outputs (``--results DIR``; its ``ar`` row, or a
row identical to it) in order: at every round the request's own n-gram index proposes up to
``--budget`` tokens (when its match is >= 3 tokens long), the recorded output decides how many
are accepted, and one more token is committed. Three rules are compared:

- ``own``: the request's own text only (the cache off);
- ``cache``: the suffix cache proposes instead when its match is longer (what the drafter does);
- ``best``: whichever of the two copies more accepted tokens (an oracle: the ceiling of any
  rule choosing between them).

Each finished output enters the cache (``cache`` and ``best``). Prints, per rule and per
template, rounds (target forwards), drafted and accepted tokens per generated token: fewer
rounds with the cache than without is all the cache can save on this workload, however its
copies are scheduled.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..drafters.ngram import Match, NgramIndex
from ..drafters.suffix import SuffixCache
from .datasets import Prompt, load_dataset
from .runner import encode_turn
from .suffix_replay import recorded, replay_parser

RULES = ("own", "cache", "best")


def accepted(m: Match, out: list[int], i: int) -> int:
    """Leading tokens of ``m``'s copy equal to ``out[i:]``."""
    a = 0
    while a < len(m.tokens) and i + a < len(out) and m.tokens[a] == out[i + a]:
        a += 1
    return a


def choose(rule: str, own: Match, cached: Match, out: list[int], i: int) -> Match:
    if rule == "cache":
        return cached if cached.length > own.length else own
    if rule == "best":
        return cached if accepted(cached, out, i) > accepted(own, out, i) else own
    return own


def replay_output(ids: list[int], out: list[int], cache: SuffixCache | None, rule: str,
                  budget: int, tally: Callable[[int, int, int], None]) -> None:
    """One output: ``tally(drafted, accepted, committed)`` per round."""
    index, text, i = NgramIndex(1, 8, 64), list(ids), 0
    while i < len(out):
        index.sync(text)
        m = index.match(budget)
        if cache is not None and rule != "own":
            m = choose(rule, m, cache.match(text, budget), out, i)
        k = len(m.tokens) if m.length >= 3 else 0
        a = accepted(Match(m.length, tokens=m.tokens[:k]), out, i)
        c = min(a + 1, len(out) - i)
        tally(k, a, c)
        text += out[i:i + c]
        i += c


def run(rule: str, prompts: list[Prompt], outputs: dict, tok: Any, budget: int) -> dict[str, dict]:
    cache = None if rule == "own" else SuffixCache()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for p in prompts:
        group = p.id.split("/")[1] if p.id.startswith("templated/") else p.category
        answers: list[str] = []

        def tally(k: int, a: int, c: int, group: str = group) -> None:
            for key in (group, "all"):
                s = sums[key]
                s["rounds"] += 1
                s["drafted"] += k
                s["accepted"] += a
                s["tokens"] += c

        for turn, out in enumerate(outputs[p.id]):
            ids = encode_turn(tok, p, turn, answers, not p.raw)
            replay_output(ids, out, cache, rule, budget, tally)
            if cache is not None:
                cache.add_generation(ids, out)
            answers.append(tok.decode(out, skip_special_tokens=True))
    return {g: {k: round(v / s["tokens"], 4) for k, v in s.items() if k != "tokens"} for g, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from ..checkpoints.loader import default_target_dir

    p = replay_parser(__doc__)
    p.add_argument("--budget", type=int, default=16, help="tokens a copy may propose (default 16)")
    args = p.parse_args(argv)
    outputs = recorded(Path(args.results))
    prompts = [q for q in load_dataset(args.dataset, args.split)[:args.limit] if q.id in outputs]
    tok = AutoTokenizer.from_pretrained(default_target_dir())
    for rule in RULES:
        print(json.dumps({"rule": rule, "prompts": len(prompts),
                          **run(rule, prompts, outputs, tok, args.budget)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
