"""Replay drafting policies over greedy traces with a cost clock (offline tuning on train / dev).

Under greedy verification a draft model's state at response position t, given an accepted
prefix, is the teacher-forced state over the target's own continuation, whatever round
the position falls in. A replay trace (``adaspec collect --replay``) tries every position
of each response once (a round tries t..t+m; the next starts at t+m+1), so it holds, per
position, the draft's hidden state, its position-free scalar features and whether the
draft's argmax equals the target's token. :func:`simulate` re-runs a stop rule over these
positions (position-in-draft and recent-acceptance features recomputed along the way) and
charges every round ``draft steps * (c_d + policy) + v(tokens verified)`` from a cost
model, so stop rules, thresholds and predictors can be compared in seconds, on train /
dev prompts, without a benchmark run. Positions a trace never tried (after 10 accepted
tokens) count as rejected.

``python -m adaspec.train.predictor_sim --traces DIR --predictor DIR`` prints
speed-ups vs plain decoding (``v(1)`` per token) for fixed K, the oracle and the rules.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..predictors.costs import OnlineTau
from ..predictors.features import POSITION_SCALE, RecentAcceptance
from ..predictors.online import OnlineAcceptance

#: ms of a target verify over n tokens with the default runtime (native Q4_1 / Q8_0 kernels,
#: Xeon AVX-512, 2 threads, context 200; ``python -m adaspec.bench.verify_cost --runtime
#: compiled --sizes 1,2,3,4,6,8,12,16 --repeats 9``, session 9), n = 1..16. Before session 7
#: the target ran on fp32 panels (17.8 ms for 1 token, 25.2 for 8): a flatter curve that
#: made longer drafts look cheap. ``--verify-scale`` rescales it for another machine.
VERIFY_MS = {1: 5.6, 2: 6.6, 3: 7.6, 4: 8.3, 6: 10.6, 8: 12.7, 12: 19.4, 16: 24.4}


@dataclass
class Costs:
    """Seconds: ``draft`` per draft step, ``policy`` per predictor call, ``verify(n)``."""

    draft: float = 0.4e-3
    policy: float = 0.1e-3
    table: tuple = tuple(sorted(VERIFY_MS.items()))
    scale: float = 1.0  # multiply every verify (a faster target: scale < 1)

    def verify(self, n: int) -> float:
        pts = self.table
        if n <= pts[0][0]:
            return pts[0][1] * 1e-3 * self.scale
        for (n0, v0), (n1, v1) in zip(pts, pts[1:], strict=False):
            if n <= n1:
                return (v0 + (v1 - v0) * (n - n0) / (n1 - n0)) * 1e-3 * self.scale
        (n0, v0), (n1, v1) = pts[-2], pts[-1]
        return (v1 + (v1 - v0) * (n - n1) / (n1 - n0)) * 1e-3 * self.scale


@dataclass
class Response:
    """One prompt's response positions: hidden [n, d], scalars [n, F], match [n] bool."""

    hidden: torch.Tensor
    scalars: torch.Tensor
    match: list


def responses(t: dict[str, torch.Tensor], prompts: set[int] | None = None) -> dict[int, Response]:
    """Per prompt index, the tried positions of a replay trace laid out along the response."""
    out: dict[int, Response] = {}
    rp, acc = t["round_prompt"].tolist(), t["round_accepted"].tolist()
    tok_round, tried = t["tok_round"], t["tok_tried"].bool()
    pos = t["tok_pos"].long()
    rows_of: dict[int, list[int]] = {}
    for r, idx in zip(tok_round[tried].tolist(), torch.nonzero(tried).squeeze(-1).tolist(), strict=True):
        rows_of.setdefault(r, []).append(idx)
    starts: dict[int, int] = {}
    per: dict[int, list[tuple[int, int]]] = {}
    for r, p in enumerate(rp):
        if prompts is not None and p not in prompts:
            continue
        t0 = starts.get(p, 0)
        for idx in rows_of.get(r, []):
            per.setdefault(p, []).append((t0 + int(pos[idx]) - 1, idx))
        starts[p] = t0 + acc[r] + 1
    d, f = t["tok_hidden"].shape[-1], t["tok_scalars"].shape[-1]
    for p, items in per.items():
        n = starts[p]
        h, s, m = torch.zeros(n, d), torch.zeros(n, f), [False] * n
        for j, idx in items:
            if j < n:
                h[j], s[j] = t["tok_hidden"][idx].float(), t["tok_scalars"][idx]
                m[j] = bool(t["tok_match"][idx])
        out[p] = Response(h, s, m)
    return out


def _head_probs(pred, r: Response) -> Callable[[int, int, float], float]:
    """p(t, i, recent) for the ``context`` head, scalars' position / recent columns replaced."""
    names = pred.meta["features"]["scalars"]
    ip, ir = names.index("position"), names.index("recent_acceptance")
    a, b = pred.calib
    with torch.inference_mode():
        hn = pred.head.norm(r.hidden)  # [n, d]
        w = pred.head.hidden.weight  # [width, d + F]
        base_h = hn @ w[:, : hn.shape[1]].T  # [n, width]
    s_mean, s_std = pred.head.s_mean, pred.head.s_std

    def prob(t: int, i: int, recent: float) -> float:
        with torch.inference_mode():
            s = r.scalars[t].clone()
            s[ip], s[ir] = i / POSITION_SCALE, recent
            z = (s - s_mean) / s_std
            x = torch.relu(base_h[t] + z @ w[:, hn.shape[1]:].T + pred.head.hidden.bias)
            logit = pred.head.out(x) + pred.head.skip(z)
            return float(torch.sigmoid(a * logit + b))

    return prob


def _specdecpp_probs(pred, r: Response) -> Callable[[int, int, float], float]:
    with torch.inference_mode():
        p = pred.prob(pred.head(r.hidden)).tolist()  # [n]
    return lambda t, i, recent: p[t]


def simulate(r: Response, rule: str, costs: Costs, k: int = 8, pred=None, h: float = 0.3,
             sdpp=None, tau_scale: float = 1.0, drop: bool = True, recal: float = 0.0) -> tuple[float, int]:
    """(seconds, tokens) of one response under ``rule``: ``fixed`` (k tokens), ``oracle``,
    ``context`` (the policy's stop / drop rule with measured costs), ``online`` (the same
    with the draft's calibrated top-1 probability), ``specdecpp`` (its head ``sdpp``; stop
    once 1 - P > h, at least 2 tokens)."""
    n, t, secs, tokens = len(r.match), 0, 0.0, 0
    recent, tau = RecentAcceptance(), OnlineTau()
    online = OnlineAcceptance(prior_weight=recal or 4.0)
    prob = _head_probs(pred, r) if rule == "context" else (
        _specdecpp_probs(sdpp, r) if rule == "specdecpp" else None)
    while t < n:
        drafted, steps, confs = 0, 0, []
        prod, last_p = 1.0, 1.0
        k_max = 16 if rule in ("context", "online", "specdecpp", "oracle") else k
        while drafted < k_max and t + drafted < n:
            j = t + drafted
            steps += 1
            if rule == "fixed":
                drafted += 1
                continue
            if rule == "oracle":
                if not r.match[j]:
                    break
                drafted += 1
                continue
            if rule == "online":
                c = float(r.scalars[j][1])
                confs.append(c)
                p = online.prob(c)
            else:
                p = prob(j, drafted + 1, recent.value)
                if recal:
                    confs.append(p)
                    p = online.prob(p)
            prod *= p
            if rule == "specdecpp":
                drafted += 1
                if drafted >= 2 and 1 - prod > h:
                    break
                continue
            if drop and prod < tau.tau_keep * tau_scale:
                break  # drop
            drafted += 1
            last_p = p
            if prod * last_p < tau.tau * tau_scale:
                break
        m = 0
        while m < drafted and r.match[t + m]:
            m += 1
        pol = costs.policy if rule in ("context", "online", "specdecpp") else 0.0
        d_s, v_s = steps * (costs.draft + pol), costs.verify(drafted + 1)
        secs += d_s + v_s
        recent.update(drafted, m)
        tau.update(d_s, steps, v_s, drafted + 1, m + 1)
        if rule == "online" or recal:
            online.update(confs[:drafted], m)
        tokens += m + 1
        t += m + 1
    return secs, tokens


def main(argv: list[str] | None = None) -> int:
    from ..predictors.models import load_predictor
    from .predictor import DEV_MOD, DEV_REM
    from .traces import load_traces

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", required=True)
    ap.add_argument("--predictor", default=None, help="context predictor dir (default: shipped)")
    ap.add_argument("--specdecpp", default=None, help="specdecpp predictor dir (default: shipped)")
    ap.add_argument("--split", choices=["dev", "train", "all"], default="dev",
                    help="prompts: the train-predictor dev split (index %% 7 == 3), the rest, or all")
    ap.add_argument("--draft-ms", type=float, default=0.4,
                    help="ms of one draft step (default 0.4: the shipped draft, native runtime)")
    ap.add_argument("--policy-ms", type=float, default=0.1,
                    help="ms of one predictor call (default 0.1: compiled decision loops)")
    ap.add_argument("--verify-scale", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    meta, t = load_traces(Path(args.traces))
    ids = set(t["round_prompt"].tolist())
    if args.split != "all":
        ids = {p for p in ids if (p % DEV_MOD == DEV_REM) == (args.split == "dev")}
    res = responses(t, ids)
    pred = load_predictor(args.predictor, "context")
    sdpp = load_predictor(args.specdecpp, "specdecpp")
    costs = Costs(args.draft_ms * 1e-3, args.policy_ms * 1e-3, scale=args.verify_scale)
    rules = [("fixed", {"k": k}) for k in (1, 2, 3, 4, 5, 6, 8)] + [
        ("oracle", {}), ("context", {}), ("online", {}),
        *[(rule, {"tau_scale": f}) for rule in ("context", "online") for f in (0.5, 0.7, 1.4)],
        ("context", {"drop": False}), ("context", {"recal": 8.0}), ("context", {"recal": 32.0}),
        *[("specdecpp", {"h": h}) for h in (0.3, 0.5, 0.7, 0.9)]]
    from .predictor import _prompt_sources

    spans = _prompt_sources(meta["args"].get("source", ""))
    cats = {p: name for name, lo, hi in spans for p in range(lo, hi)}
    out: dict = {}
    for rule, kw in rules:
        ratios: dict[str, list[float]] = {}
        for p, r in res.items():
            secs, tok = simulate(r, rule, costs, pred=pred, sdpp=sdpp, **kw)
            ratio = (tok / secs) / (1.0 / costs.verify(1))
            ratios.setdefault("all", []).append(ratio)
            ratios.setdefault(cats.get(p, "?"), []).append(ratio)
        key = rule + "".join(f":{k}={v}" for k, v in kw.items())
        out[key] = {c: sum(v) / len(v) for c, v in ratios.items()}
        print(f"{key:28s} " + "  ".join(f"{c} {x:.3f}" for c, x in out[key].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
