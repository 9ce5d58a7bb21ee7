"""results.jsonl -> summary.json, report.md (and plots via :mod:`adaspec.bench.plots`).

Metric definitions (docs/design.md §2), per method, overall and per category; the pooled ones are
read from the summed counts of :class:`adaspec.metrics.RunMetrics`:

- tokens_per_s: mean over prompts of the prompt's tokens/s (median over repeats);
  a prompt's tokens/s = new tokens / wall time of its generate calls (prefill included).
- speedup_vs_ar: Spec-Bench formula, mean over prompts of
  tokens/s(method, prompt) / tokens/s(ar, prompt), over the prompts both have.
- tau: new tokens / target forwards (pooled); plain decoding = 1.
- acceptance_rate: accepted / drafted draft tokens (pooled; depends on K).
- target_forwards_per_token, draft_forwards_per_token: pooled per new token.
- overhead_pct: policy (and predictor) time / wall time, in percent (pooled);
  draft_pct / verify_pct likewise.
- tree_nodes_per_round: draft tokens verified per round, extra candidates included;
  tree_round_rate: share of rounds that verified a token tree; tree_win_rate: share of
  those won by an extra candidate (not the chain token).
- identical_to_ar_rate: share of prompts whose output ids equal ``ar``'s token for token
  (greedy only; None when sampling or without ``ar``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..metrics import RunMetrics
from .datasets import DatasetError, read_jsonl_objects

_REQUIRED = ("prompt_id", "category", "method", "repeat", "new_tokens", "wall_s")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl file.

    Raises:
        DatasetError: missing file, or a malformed / incomplete line (with its number).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"results file {str(path)!r} does not exist")
    rows = []
    for lineno, row in read_jsonl_objects(path, "results"):
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise DatasetError(f"{path}:{lineno}: results line lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def _tps(row: dict[str, Any]) -> float:
    if "tokens_per_s" in row:
        return float(row["tokens_per_s"])
    return row["new_tokens"] / row["wall_s"] if row["wall_s"] else 0.0


def per_prompt(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> prompt_id -> aggregate over repeats (median tokens/s; the counts of
    :class:`~adaspec.metrics.RunMetrics` summed)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["prompt_id"])].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (method, pid), rs in groups.items():
        rs.sort(key=lambda r: r["repeat"])
        agg: dict[str, Any] = {"category": rs[0]["category"], "repeats": len(rs),
                               "tokens_per_s": statistics.median(_tps(r) for r in rs),
                               "tps_repeats": [_tps(r) for r in rs],
                               "token_ids": rs[0].get("token_ids"),
                               "temperature": (rs[0].get("cfg") or {}).get("temperature", 0.0)}
        agg.update(RunMetrics.pool(RunMetrics.from_counts(r) for r in rs).counts())
        agg["calibration"] = [c for r in rs for c in (r.get("calibration") or [])]
        agg["stage_times"] = all(r.get("stage_times", True) for r in rs)
        out[method][pid] = agg
    return out


def _metrics(prompts: dict[str, dict[str, Any]], ar: dict[str, dict[str, Any]] | None,
             is_ar: bool) -> dict[str, Any]:
    ps = list(prompts.values())
    pooled = RunMetrics.pool(RunMetrics.from_counts(p) for p in ps)
    speedups, same = [], []
    greedy = all(not p["temperature"] for p in ps)
    if ar is not None:
        for pid, p in prompts.items():
            if pid in ar:
                if ar[pid]["tokens_per_s"] > 0:
                    speedups.append(p["tokens_per_s"] / ar[pid]["tokens_per_s"])
                if greedy and p["token_ids"] is not None:
                    same.append(p["token_ids"] == ar[pid]["token_ids"])
    # stage shares only where every row timed its stages (transformers exposes none)
    pct = pooled.stage_pct() if all(p["stage_times"] for p in ps) else {}
    # spread over --repeats: sample standard deviation of the mean tokens/s of each repeat
    reps = {len(p["tps_repeats"]) for p in ps}
    spread = None
    if len(reps) == 1 and min(reps) > 1:
        spread = statistics.stdev(statistics.fmean(p["tps_repeats"][r] for p in ps) for r in range(min(reps)))
    return {
        "n": len(ps),
        "tokens_per_s": statistics.fmean(p["tokens_per_s"] for p in ps) if ps else 0.0,
        "tokens_per_s_spread": spread,
        "speedup_vs_ar": 1.0 if is_ar and ps else (statistics.fmean(speedups) if speedups else None),
        "speedup_n": len(speedups),
        **pooled.rates(empty=None),
        "overhead_pct": pct.get("policy_pct"),
        "draft_pct": pct.get("draft_pct"),
        "verify_pct": pct.get("verify_pct"),
        "identical_to_ar_rate": (statistics.fmean(same) if same else None) if greedy else None,
        "new_tokens": pooled.new_tokens,
        "accept_hist": pooled.accept_hist,
    }


MARGINS_FILE = "mismatch_margins.json"


def margin_key(m: dict[str, Any]) -> str:
    return f"{m['method']}|{m['prompt_id']}|{m['turn']}"


def mismatches(pp: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Where a greedy method's output differs from ar: first differing token per turn."""
    ar = pp.get("ar", {})
    out = []
    for method, prompts in pp.items():
        if method == "ar":
            continue
        for pid, p in prompts.items():
            ref = ar.get(pid)
            if (ref is None or p["temperature"] or p["token_ids"] is None
                    or p["token_ids"] == ref["token_ids"]):
                continue
            for turn, (a, b) in enumerate(zip(p["token_ids"], ref["token_ids"], strict=False)):
                if a != b:
                    i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                             min(len(a), len(b)))
                    out.append({"method": method, "prompt_id": pid, "turn": turn, "first_diff": i,
                                "len": len(a), "ar_len": len(b)})
                    break
    return out


def method_order(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[str]:
    seen = list(dict.fromkeys(r["method"] for r in rows))
    order = [m for m in (meta or {}).get("methods", []) if m in seen]
    order += [m for m in seen if m not in order]
    return sorted(order, key=lambda m: m != "ar")  # ar first, the rest as given


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary.json dict: ``methods.<name>.{...}`` and ``.per_category.<cat>``."""
    pp = per_prompt(rows)
    ar = pp.get("ar")
    methods: dict[str, Any] = {}
    for m in method_order(rows, meta):
        prompts = pp[m]
        entry = _metrics(prompts, ar, m == "ar")
        cats = sorted({p["category"] for p in prompts.values()})
        entry["per_category"] = {
            c: _metrics({k: v for k, v in prompts.items() if v["category"] == c},
                        {k: v for k, v in ar.items() if v["category"] == c} if ar else None, m == "ar")
            for c in cats}
        methods[m] = entry
    for m, ratios in efficiency_ratios(pp).items():
        methods[m]["efficiency_vs_oracle"] = statistics.fmean(ratios.values())
        for c, entry in methods[m]["per_category"].items():
            vals = [r for pid, r in ratios.items() if pp[m][pid]["category"] == c]
            if vals:
                entry["efficiency_vs_oracle"] = statistics.fmean(vals)
    return {"methods": methods, "categories": sorted({r["category"] for r in rows}),
            "n_rows": len(rows), "mismatches": mismatches(pp), "meta": meta or {}}


def policy_efficiency(pp: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """method -> policy efficiency (docs/design.md §2): mean over prompts of tokens/s of the method
    divided by tokens/s of the ``oracle`` policy with the same draft source and runtime
    (only for policy methods, when such an oracle ran on the same prompts)."""
    return {m: statistics.fmean(r.values()) for m, r in efficiency_ratios(pp).items()}


def efficiency_ratios(pp: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """method -> prompt id -> tokens/s(method) / tokens/s(oracle with the same draft sources
    and runtime), for policy methods (``default`` included) whose oracle ran on that prompt;
    ``oracle:draft=model+ngram`` is the mixed-source oracle."""
    from .methods import MethodError, parse_method

    specs = {}
    for m in pp:
        try:
            specs[m] = parse_method(m)
        except MethodError:
            continue
    oracles = {(s.draft, s.runtime): m for m, s in specs.items() if s.kind == "policy" and s.name == "oracle"}
    out = {}
    for m, s in specs.items():
        ref = pp.get(oracles.get((s.draft, s.runtime), ""), {})
        vals = {k: p["tokens_per_s"] / ref[k]["tokens_per_s"] for k, p in pp[m].items()
                if s.kind == "policy" and k in ref and ref[k]["tokens_per_s"] > 0}
        if vals:
            out[m] = vals
    return out


def default_first(methods: Iterable[str]) -> list[str]:
    """Method keys with the ``default`` method(s) first (the row a user gets), then as given."""
    keys = list(methods)
    return sorted(keys, key=lambda m: not (m == "default" or m.startswith(("default:", "default@"))))


def running_speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """method -> speed-up so far (for the progress bar)."""
    pp = per_prompt(rows)
    ar = pp.get("ar", {})
    out = {}
    for m, prompts in pp.items():
        vals = [p["tokens_per_s"] / ar[k]["tokens_per_s"] for k, p in prompts.items()
                if k in ar and ar[k]["tokens_per_s"] > 0]
        if vals:
            out[m] = statistics.fmean(vals)
    return out


def _f(x: Any, fmt: str, unit: str = "") -> str:
    return "–" if x is None else format(x, fmt) + unit


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown_table(summary: dict[str, Any]) -> str:
    """Overall table: method, speed-up, tokens/s, tau, acceptance, identical, overhead."""
    lines = ["| method | speed-up vs ar | tokens/s | τ | acceptance | draft fwd/token | "
             "policy overhead | identical to ar | n |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in default_first(summary["methods"]):
        e = summary["methods"][m]
        tps = _f(e["tokens_per_s"], ".1f") + (f" ± {e['tokens_per_s_spread']:.1f}"
                                                if e.get("tokens_per_s_spread") is not None else "")
        lines.append(f"| `{m}` | {_f(e['speedup_vs_ar'], '.2f')}× | {tps} | "
                     f"{_f(e['tau'], '.2f')} | {_pct(e['acceptance_rate'])} | "
                     f"{_f(e['draft_forwards_per_token'], '.2f')} | {_f(e['overhead_pct'], '.1f', '%')} | "
                     f"{_pct(e['identical_to_ar_rate'])} | {e['n']} |")
    for m, why in (summary.get("meta") or {}).get("failed", {}).items():  # e.g. a peer engine crashed
        lines.append(f"| `{m}` | failed: {why} | | | | | | | |")
    return "\n".join(lines)


def category_table(summary: dict[str, Any]) -> str:
    """Speed-up, τ and % of the oracle with the same draft (where one ran) per method and
    category; the ``default`` row first."""
    cats = summary["categories"]
    lines = ["| method | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    for m in default_first(summary["methods"]):
        e = summary["methods"][m]
        cells = []
        for c in cats:
            x = e["per_category"].get(c)
            eff = x.get("efficiency_vs_oracle") if x else None
            cells.append("–" if x is None else f"{_f(x['speedup_vs_ar'], '.2f')}× (τ {_f(x['tau'], '.2f')}"
                         + (f", {100 * eff:.0f}% of oracle)" if eff is not None else ")"))
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details_table(summary: dict[str, Any], positions: int = 8) -> str:
    """Stage times, wasted draft tokens and per-position acceptance per method."""
    head = " | ".join(f"p{i + 1}" for i in range(positions))
    lines = [f"| method | draft % | verify % | policy % | wasted draft tokens / token | {head} |",
             "|---|---:|---:|---:|---:|" + "---:|" * positions]
    for m in default_first(summary["methods"]):
        e = summary["methods"][m]
        if m == "ar":
            continue
        ppa = e.get("per_position_acceptance") or []
        cells = " | ".join(_pct(ppa[i]) if i < len(ppa) else "–" for i in range(positions))
        wasted = _f(e.get("wasted_draft_tokens_per_token"), ".2f")
        lines.append(f"| `{m}` | {_f(e.get('draft_pct'), '.0f')} | {_f(e.get('verify_pct'), '.0f')} | "
                     f"{_f(e.get('overhead_pct'), '.1f')} | {wasted} | {cells} |")
    return "\n".join(lines)


def render_report(summary: dict[str, Any], plots: list[str]) -> str:
    meta = summary.get("meta", {})
    cfg = meta.get("config", {})
    out = ["# adaspec benchmark", ""]
    if meta:
        out += [f"- target: `{meta.get('target')}`, draft: `{meta.get('draft')}`",
                f"- dataset: `{cfg.get('dataset')}` split `{cfg.get('split')}`, {meta.get('n_prompts')} "
                f"prompts, {cfg.get('max_new_tokens')} new tokens max, temperature {cfg.get('temperature')}, "
                f"repeats {cfg.get('repeats')}, warm-up {cfg.get('warmup')}",
                f"- {meta.get('dtype')} on {meta.get('device')}, {meta.get('threads')} threads, "
                f"{meta.get('cpu')}; torch {meta.get('torch')}, transformers {meta.get('transformers')}",
                "", "Command:", "", "```", str(meta.get("command", "")), "```", ""]
        mem = meta.get("memory") or {}
        if mem:
            parts = [f"{rt} {m['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in m else f"{rt}: {m.get('error')}"
                     for rt, m in mem.items() if isinstance(m, dict)]
            ratio = mem.get("compiled_over_eager")
            out += [f"Peak RSS of one generation, fresh process per runtime: {', '.join(parts)}"
                    + (f" (compiled / eager {ratio:.2f}x)" if ratio else ""), ""]
    out += ["## Overall", "", markdown_table(summary), "",
            "Speed-up: mean over prompts of tokens/s(method) / tokens/s(ar) on the same prompt "
            "(Spec-Bench). τ: tokens per target forward. Acceptance: accepted / drafted "
            "(depends on the draft length). Identical: share of prompts whose greedy output equals "
            "`ar` token for token.", ""]
    eff = {m: e["efficiency_vs_oracle"] for m, e in summary["methods"].items() if "efficiency_vs_oracle" in e}
    if eff:
        out += ["Policy efficiency (mean over prompts of tokens/s(method) / tokens/s(oracle with the same "
                "draft and runtime)): " + ", ".join(f"`{m}` {v:.2f}" for m, v in eff.items()), ""]
    pol = meta.get("policies") or {}
    if pol.get("default"):
        out += [f"`default` (no --policy / --draft) ran as: {pol['default']}.", ""]
    out += ["## Per category", "", category_table(summary), "",
            "Cells: speed-up vs `ar` (τ, and % of the oracle with the same draft sources when "
            "one ran: `oracle` for the model draft, `oracle:draft=model+ngram` for `default` and "
            "`context:draft=model+ngram`).", "",
            "## Details", "", details_table(summary), "",
            "Stage times are shares of wall time (`–` for `hf`: transformers does not expose them). "
            "pN: P(token N accepted | tokens 1..N-1 accepted), over the rounds whose draft reached "
            "position N (pos_accepted / pos_tested from GenerationStats).", ""]
    mism = summary.get("mismatches") or []
    if mism:
        out += ["## Outputs that differ from `ar`", "",
                "| method | prompt | turn | first differing token | length | ar length | "
                "target top-2 logit gap | logit(ar token) − logit(method token) |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| `{x['method']}` | {x['prompt_id']} | {x['turn']} | {x['first_diff']} | {x['len']} | "
                f"{x['ar_len']} | {_f(x.get('top2_gap'), '.3f')} | {_f(x.get('logit_gap'), '.3f')} |"
                for x in mism[:50]]
        out += ["", "In bf16 a verify over k+1 tokens can round differently from a one-token step, "
                "so a near-tie argmax can flip (docs/design.md §4). The gaps come from one extra target "
                "forward over the shared prefix (same dtype): a gap near the bf16 resolution "
                "(a few hundredths of a logit) is such a tie; compare with `--dtype fp32`.", ""]
        if any(x["method"].startswith("llamacpp") for x in mism):
            out += ["`llamacpp` rows are another engine: llama.cpp quantises activations to 8 bits in "
                    "its quantised dot products and sums in its own order, so its greedy text is not "
                    "the reference model's; its mismatches are reported, not a losslessness failure.", ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def write_outputs(out: str | Path, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict:
    """Write summary.json, report.md and the plots into ``out``; returns the summary."""
    from .plots import write_plots

    out = Path(out)
    summary = summarize(rows, meta)
    margins = json.loads((out / MARGINS_FILE).read_text()) if (out / MARGINS_FILE).is_file() else {}
    for m in summary["mismatches"]:
        m.update(margins.get(margin_key(m), {}))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = write_plots(out, summary, per_prompt(rows))
    (out / "report.md").write_text(render_report(summary, plots))
    return summary


def report_only(out: str | Path) -> dict[str, Any]:
    """Regenerate summary / report / plots from ``out/results.jsonl`` (keeps the old metadata)."""
    out = Path(out)
    rows = read_results(out / "results.jsonl")
    if not rows:
        raise DatasetError(f"{out / 'results.jsonl'} has no rows")
    meta = None
    old = out / "summary.json"
    if old.is_file():
        try:
            meta = json.loads(old.read_text()).get("meta")
        except json.JSONDecodeError:
            meta = None
    return write_outputs(out, rows, meta)


__all__ = ["category_table", "details_table", "markdown_table", "per_prompt", "read_results", "render_report",
           "report_only", "running_speedups", "summarize", "write_outputs"]
