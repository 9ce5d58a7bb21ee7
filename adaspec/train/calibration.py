"""Calibration metrics for binary acceptance predictors, Platt scaling, reliability plot.

All inputs are 1-D tensors: ``probs`` / ``logits`` [N] float, ``labels`` [N] in {0, 1}.
"""

from __future__ import annotations

from pathlib import Path

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the Mann-Whitney statistic (ties get average ranks); nan with one class."""
    labels = labels.bool()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    s = scores.double()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    if len(uniq) < len(s):  # average the ranks of tied scores
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error of the probabilities."""
    return float(((probs.double() - labels.double()) ** 2).mean())


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[dict]:
    """Equal-width bins: [{lo, hi, n, mean_p, frac_pos}] (empty bins omitted)."""
    p, y = probs.double(), labels.double()
    idx = torch.clamp((p * bins).long(), max=bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n,
                        "mean_p": float(p[sel].mean()), "frac_pos": float(y[sel].mean())})
    return out


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: sum_b n_b / N * |mean_p_b - frac_pos_b|."""
    n = len(probs)
    if not n:
        return 0.0
    return sum(r["n"] / n * abs(r["mean_p"] - r["frac_pos"]) for r in reliability(probs, labels, bins))


def binary_report(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """AUC, Brier, ECE, base rate and count."""
    return {"n": len(probs), "positive_rate": float(labels.float().mean()) if len(labels) else 0.0,
            "auc": auc(probs, labels), "brier": brier(probs, labels), "ece": ece(probs, labels)}


def fit_platt(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> tuple[float, float]:
    """(a, b) minimising the BCE of sigmoid(a * logit + b) (Platt scaling)."""
    x, y = logits.double().detach(), labels.double()
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * x + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = ab.detach().tolist()
    return float(a), float(b)


def plot_reliability(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str) -> None:
    """Reliability diagram (one line per named (probs, labels) pair) plus a histogram of probs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for name, (p, y) in curves.items():
        rel = reliability(p, y)
        ax.plot([r["mean_p"] for r in rel], [r["frac_pos"] for r in rel], "o-", ms=3,
                label=f"{name} (ECE {ece(p, y):.3f}, AUC {auc(p, y):.3f})")
        hx.hist(p.numpy(), bins=30, range=(0, 1), alpha=0.5, label=name)
    ax.set_ylabel("observed acceptance")
    ax.set_title(title)
    ax.legend(fontsize=7)
    hx.set_xlabel("predicted P(accept)")
    hx.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
