"""``adaspec train-predictor``: fit a predictor head on verification traces.

- specdecpp / context: binary cross-entropy on the hard label (x_i == target argmax),
  rejections weighted by ``rejection_weight`` (SpecDec++ uses ~6; default 6 for specdecpp,
  1 for context, whose probabilities feed a cost model and must stay calibrated), then
  optional Platt scaling fitted on the dev split (``--calibrate platt``; off by default).
- ldlp: cross-entropy over lengths 1..k (k = the collection's draft length); the label
  of a round is the next round's accepted length (clamped to 1..k).

The dev split is every prompt whose index % 7 == 3 (prompt-level, so no leakage between
rounds of one answer); training early-stops on the dev loss. Outputs in ``out``:
model.safetensors, predictor.json (config, feature schema, model pair, metrics,
calibration) and, for binary heads, calibration.json + reliability.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidArgumentError, ensure_writable_dir
from ..predictors.models import KINDS, LengthHead, Predictor, build_head, save_predictor
from .calibration import binary_report, fit_platt, plot_reliability
from .traces import load_traces

DEV_MOD, DEV_REM = 7, 3


def _fit(model: nn.Module, loss_fn, train: tuple, dev: tuple, *, epochs: int, lr: float, batch: int,
         patience: int, seed: int, weight_decay: float = 1e-2) -> dict:
    """Adam with early stopping on the dev loss; restores the best weights. Returns a log."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train[0])
    best, best_state, bad, log = math.inf, None, 0, []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model, *(t[idx] for t in train))
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            dev_loss = float(loss_fn(model, *dev))
        log.append(round(dev_loss, 5))
        if dev_loss < best - 1e-5:
            best, bad = dev_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs": len(log), "dev_loss": log, "best_dev_loss": best}


def _split(prompt_of: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows whose prompt is in the dev split."""
    return prompt_of % DEV_MOD == DEV_REM


def evaluate_on(pred: Predictor, traces: Path) -> dict:
    """AUC / Brier / ECE of a binary head on another trace directory (e.g. traces of the dev
    buckets, prompts the training traces never held), over the tokens verified after an
    accepted prefix, with the shipped calibration, overall and per prompt source."""
    meta, t = load_traces(traces)
    if meta.get("pair") != pred.meta.get("pair"):
        raise InvalidArgumentError(f"{traces} holds traces of another model pair than the predictor")
    tried = t["tok_tried"].bool()
    h, s, y = t["tok_hidden"][tried].float(), t["tok_scalars"][tried].float(), t["tok_match"][tried].float()
    with torch.no_grad():
        z = pred.head(h) if pred.kind == "specdecpp" else pred.head(h, s)
        p = pred.prob(z)
    out = {"traces": str(traces), "source": meta["args"].get("source"), **binary_report(p, y)}
    sources = _prompt_sources(meta["args"].get("source", ""))
    if sources:
        prompt = t["round_prompt"][t["tok_round"]][tried]
        by = {}
        for name, lo, hi in sources:
            sel = (prompt >= lo) & (prompt < hi)
            if sel.any():
                by[name] = binary_report(p[sel], y[sel])
        out["by_source"] = by
    return out


def _prompt_sources(source: str) -> list[tuple[str, int, int]]:
    """'a:dev[16],b:dev[12]' -> [("a", 0, 16), ("b", 16, 28)] (prompt index ranges)."""
    out, start = [], 0
    for part in source.split(","):
        name, _, rest = part.partition("[")
        if not rest.endswith("]") or not rest[:-1].isdigit():
            return []
        n = int(rest[:-1])
        out.append((name.split(":")[0], start, start + n))
        start += n
    return out


def train_predictor(traces: Path, kind: str, out: Path, *, epochs: int = 40, lr: float = 1e-3,
                    batch: int = 256, patience: int = 5, rejection_weight: float | None = None,
                    calibrate: str | None = None, width: int = 0, seed: int = 0,
                    weight_decay: float = 0.5, eval_traces: Path | None = None) -> Predictor:
    """Fit a ``kind`` head on the traces in ``traces`` and write it to ``out``
    (``eval_traces``: also report held-out metrics on that trace directory)."""
    if kind not in KINDS:
        raise InvalidArgumentError(f"unknown predictor kind {kind!r}; choose one of {', '.join(KINDS)}")
    if calibrate not in (None, "platt", "none"):
        raise InvalidArgumentError(f"calibrate must be 'platt' or 'none', got {calibrate!r}")
    meta, t = load_traces(traces)
    ensure_writable_dir(out, "predictor directory (--out)")
    torch.manual_seed(seed)
    pair, features = meta["pair"], meta["features"]
    base = {"kind": kind, "pair": pair, "traces": {"path": str(traces), "args": meta["args"]}}
    if kind == "ldlp":
        pred = _train_ldlp(traces, meta, t, epochs=epochs, lr=lr, batch=batch, patience=patience,
                           width=width or 32, seed=seed, base=base)
        save_predictor(pred, out)
        return pred
    rw = rejection_weight if rejection_weight is not None else (6.0 if kind == "specdecpp" else 1.0)
    calibrate = calibrate or "none"
    h = t["tok_hidden"].float()
    s = t["tok_scalars"].float()
    y = t["tok_match"].float()
    tried = t["tok_tried"].bool()
    dev = _split(t["round_prompt"][t["tok_round"]])
    if dev.all() or not dev.any():
        raise InvalidArgumentError(f"{traces}: too few prompts for a dev split (need >= {DEV_MOD})")
    d = h.shape[-1]
    if kind == "specdecpp":
        config = {"d": d, "blocks": 2, "width": width or d}
        feats = {"hidden": "draft_last_hidden", "scalars": [], "attention": False}
    else:
        config = {"d": d, "n_scalar": s.shape[-1], "width": width or 8}
        feats = dict(features)
    head = build_head(kind, config)
    if kind == "context":
        head.set_scalar_stats(s[~dev])

    def logits_of(model: nn.Module, hh: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return model(hh) if kind == "specdecpp" else model(hh, ss)

    def loss_fn(model: nn.Module, hh: torch.Tensor, ss: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        w = torch.where(yy > 0.5, 1.0, rw)
        return nn.functional.binary_cross_entropy_with_logits(logits_of(model, hh, ss), yy, weight=w)

    tr = ~dev
    log = _fit(head, loss_fn, (h[tr], s[tr], y[tr]), (h[dev], s[dev], y[dev]),
               epochs=epochs, lr=lr, batch=batch, patience=patience, seed=seed, weight_decay=weight_decay)
    with torch.no_grad():
        z = logits_of(head, h[dev], s[dev])
    ev = dev & tried  # held-out tokens verified after an accepted prefix (what a policy faces)
    prompt_of = t["round_prompt"][t["tok_round"]]  # [N] each token's prompt index
    metrics, curves, calib = _dev_metrics(z[tried[dev]], y[ev], prompt_of[ev], calibrate)
    metrics.update(train_tokens=int(tr.sum()), dev_tokens=int(dev.sum()), dev_tried_tokens=int(ev.sum()),
                   rejection_weight=rw, calibrate=calibrate, fit=log)
    pred = Predictor(kind, head, dict(base, config=config, features=feats, metrics=metrics), out, calib)
    if eval_traces is not None:
        metrics["heldout"] = evaluate_on(pred, eval_traces)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(metrics, indent=2))
    plot_reliability(curves, out / "reliability.png", f"{kind}: held-out tokens (dev prompts)")
    save_predictor(pred, out)  # last: predictor.json is the commit point
    return pred


def _dev_metrics(zt: torch.Tensor, yt: torch.Tensor, prompt: torch.Tensor, calibrate: str,
                 ) -> tuple[dict, dict, tuple[float, float]]:
    """Held-out metrics of logits ``zt`` [n] against labels ``yt`` [n] (``prompt`` [n]: each
    token's prompt index), the reliability curves, and the Platt (a, b) when ``calibrate``."""
    raw = torch.sigmoid(zt)
    calib = (1.0, 0.0)
    if calibrate == "platt":
        # two-fold cross-fit over dev prompts: each half is scored with (a, b) fitted on the
        # other half, so the reported metrics never see their own calibration data; the
        # shipped (a, b) is fitted on the whole dev split
        half = (prompt // DEV_MOD) % 2 == 0
        cal = torch.empty_like(raw)
        for part in (half, ~half):
            a, b = fit_platt(zt[~part], yt[~part]) if (~part).any() else (1.0, 0.0)
            cal[part] = torch.sigmoid(a * zt[part] + b)
        calib = fit_platt(zt, yt)
        metrics = {"raw": binary_report(raw, yt), "calibrated": binary_report(cal, yt),
                   "note": "Platt (a, b) cross-fitted over two halves of the dev prompts"}
        curves = {"raw": (raw, yt), "platt": (cal, yt)}
    else:
        metrics = {"raw": binary_report(raw, yt)}
        curves = {"raw": (raw, yt)}
    return metrics, curves, calib


def _train_ldlp(traces: Path, meta: dict, t: dict, *, epochs: int, lr: float, batch: int, patience: int,
                width: int, seed: int, base: dict) -> Predictor:
    from safetensors.torch import load_file

    k = int(meta["args"]["k"])
    prompt, acc = t["round_prompt"], t["round_accepted"].long()
    same = prompt[1:] == prompt[:-1]  # round r has a successor in the same answer
    idx = torch.nonzero(same).squeeze(-1)
    label = acc[idx + 1].clamp(1, k) - 1  # class c <-> length c + 1
    emb = load_file(str(traces / "target_embed.safetensors"))["embed"]
    h = t["round_hidden"][idx].float()
    e = emb[t["round_token"][idx]].float()
    dev = _split(prompt[idx])
    if dev.all() or not dev.any():
        raise InvalidArgumentError(f"{traces}: too few prompts for a dev split (need >= {DEV_MOD})")
    config = {"d_t": h.shape[-1], "d_e": e.shape[-1], "k_max": k, "width": width}
    head = build_head("ldlp", config)

    def loss_fn(model: nn.Module, hh: torch.Tensor, ee: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(hh, ee), yy)

    log = _fit(head, loss_fn, (h[~dev], e[~dev], label[~dev]), (h[dev], e[dev], label[dev]),
               epochs=epochs, lr=lr, batch=batch, patience=patience, seed=seed)
    with torch.no_grad():
        pl = head(h[dev], e[dev]).argmax(-1)
    yd = label[dev]
    prior = torch.bincount(label[~dev], minlength=k).argmax()
    metrics = {"dev_rounds": int(dev.sum()), "train_rounds": int((~dev).sum()),
               "accuracy": float((pl == yd).float().mean()),
               "within_1": float(((pl - yd).abs() <= 1).float().mean()),
               "mae": float((pl - yd).abs().float().mean()),
               "majority_accuracy": float((yd == prior).float().mean()),
               "mean_label_len": float(yd.float().mean() + 1), "mean_pred_len": float(pl.float().mean() + 1),
               "fit": log}
    assert isinstance(head, LengthHead)
    head.fold_embeddings(emb)
    feats = {"hidden": "target_last_hidden_at_committed", "embedding": "target_input_embedding"}
    pred = Predictor("ldlp", head, dict(base, config=config, features=feats, metrics=metrics), None)
    return pred
