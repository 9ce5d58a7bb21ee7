"""PNG plots of a benchmark (matplotlib, Agg backend; no display needed).

- ``speedup.png``: speed-up vs ``ar`` per method, one bar group per category plus "all".
- ``accept_hist.png``: distribution of accepted draft tokens per round, per method.
- ``calibration.png``: reliability diagram of a predictor's P(accept), only when result
  rows carry ``calibration`` pairs ``[p_hat, accepted]`` (a policy's ``report()``
  exposes them under ``"calibration"``); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(summary: dict[str, Any], path: Path) -> bool:
    methods = [m for m in summary["methods"] if m != "ar"]
    if not methods:
        return False
    plt = _plt()
    groups = ["all", *summary["categories"]]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(methods)) ** 0.5 + 3), 4))
    for j, m in enumerate(methods):
        e = summary["methods"][m]
        vals = [e["speedup_vs_ar"] if g == "all" else (e["per_category"].get(g) or {}).get("speedup_vs_ar")
                for g in groups]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in vals], width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("speed-up vs ar (×)")
    ax.set_title("Speed-up per method and category")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accept_hist(summary: dict[str, Any], path: Path) -> bool:
    methods = [m for m, e in summary["methods"].items() if sum(e.get("accept_hist") or []) > 0 and m != "ar"]
    if not methods:
        return False
    plt = _plt()
    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, m in zip(axes.flat, methods, strict=False):
        hist = summary["methods"][m]["accept_hist"]
        total = sum(hist)
        ax.bar(range(len(hist)), [h / total for h in hist], color="tab:blue")
        ax.set_title(f"{m} (τ {summary['methods'][m]['tau'] or 0:.2f})", fontsize="small")
        ax.set_xlabel("accepted draft tokens per round")
        ax.set_ylabel("share of rounds")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_calibration(per_prompt: dict[str, dict[str, dict[str, Any]]], path: Path, bins: int = 10) -> bool:
    series = {m: [c for p in prompts.values() for c in p.get("calibration") or []]
              for m, prompts in per_prompt.items()}
    series = {m: s for m, s in series.items() if s}
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=0.8, label="perfect")
    for m, pairs in series.items():
        sums = [[0.0, 0.0, 0] for _ in range(bins)]
        for p_hat, label in pairs:
            b = min(int(float(p_hat) * bins), bins - 1)
            sums[b][0] += float(p_hat)
            sums[b][1] += float(label)
            sums[b][2] += 1
        pts = [(s[0] / s[2], s[1] / s[2]) for s in sums if s[2]]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{m} (n={len(pairs)})")
    ax.set_xlabel("predicted P(accept)")
    ax.set_ylabel("observed acceptance")
    ax.set_title("Predictor calibration")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(out: Path, summary: dict[str, Any],
                per_prompt: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Write the plots that apply; returns their file names (relative to ``out``)."""
    written = []
    for name, fn in (("speedup.png", lambda p: plot_speedup(summary, p)),
                     ("accept_hist.png", lambda p: plot_accept_hist(summary, p)),
                     ("calibration.png", lambda p: plot_calibration(per_prompt, p))):
        if fn(out / name):
            written.append(name)
    return written


__all__ = ["plot_accept_hist", "plot_calibration", "plot_speedup", "write_plots"]
