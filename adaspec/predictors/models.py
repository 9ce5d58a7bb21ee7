"""The predictor heads and their checkpoint format.

A predictor directory holds ``model.safetensors`` (the head's weights) and
``predictor.json``::

    {"format": "adaspec-predictor/1", "kind": "specdecpp" | "context" | "ldlp",
     "config": {...constructor arguments...},
     "features": {"hidden": "draft_last_hidden", "scalars": [...]} ,
     "pair": {"target": name, "draft": name, "target_hidden": d_t, "draft_hidden": d_d,
              "vocab_sha256": "..."},
     "calibration": {"a": 1.0, "b": 0.0},   # Platt scaling of the logit (binary heads)
     "metrics": {...}}

Heads:
- ``specdecpp``: residual MLP on the draft's last hidden state h [d] -> logit of P(accept)
  (SpecDec++).
- ``context``: one hidden layer on [h, scalar features] -> logit of P(accept).
- ``ldlp``: 3-layer MLP on [target hidden h_t, embedding of the last committed token]
  -> logits over draft lengths 1..k_max (AdaEAGLE). The first layer's embedding half is
  folded into a [V, width] table at save time (``emb_proj``) so that inference does not
  need the target's embedding matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PolicyArgumentError

FORMAT = "adaspec-predictor/1"
KINDS = ("specdecpp", "context", "ldlp")
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "predictors"


class ResidualHead(nn.Module):
    """SpecDec++ acceptance head: x + MLP(x) blocks on [.., d], then Linear(d, 1).

    forward: [..., d] -> [...] logits.
    """

    def __init__(self, d: int, blocks: int = 2, width: int = 0) -> None:
        super().__init__()
        width = width or d
        self.norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, width), nn.SiLU(), nn.Linear(width, d)) for _ in range(blocks))
        self.out = nn.Linear(d, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x).squeeze(-1)

    def logit_one(self, h: torch.Tensor) -> float:
        """:meth:`forward` for one position (h [d]) in numpy, without per-op torch dispatch
        (a decode-time hot path); weights copied on first use and after in-place changes."""
        import numpy as np

        w = self._np_weights()
        x = h.detach().float().numpy()
        x = (x - x.mean()) / np.sqrt(x.var() + self.norm.eps) * w["g"] + w["beta"]
        for w1, b1, w2, b2 in w["blocks"]:
            a = w1 @ x + b1
            x = x + w2 @ (a / (1.0 + np.exp(-a))) + b2  # SiLU
        return float(w["out"] @ x + w["out_b"])

    def _np_weights(self) -> dict:
        version = sum(p._version for p in self.parameters())
        cache = getattr(self, "_np_cache", None)
        if cache is None or cache[0] != version:
            def np_(t: torch.Tensor):
                return t.detach().float().numpy().copy()

            cache = (version, {"g": np_(self.norm.weight), "beta": np_(self.norm.bias),
                               "blocks": [(np_(b[0].weight), np_(b[0].bias), np_(b[2].weight), np_(b[2].bias))
                                          for b in self.blocks],
                               "out": np_(self.out.weight)[0], "out_b": float(self.out.bias.detach())})
            self._np_cache = cache
        return cache[1]


class ContextHead(nn.Module):
    """Context-aware difficulty predictor: one hidden layer on [h, scalars].

    forward(h [..., d], s [..., n_scalar]) -> [...] logits. The hidden state is
    normalised (LayerNorm without affine); the scalars are standardised with the training
    set's statistics (buffers ``s_mean`` / ``s_std``) and feed both the hidden layer and
    a linear skip to the output, so that a few strong scalar features (entropy, top-1
    probability) are not drowned by the d hidden dimensions.
    """

    def __init__(self, d: int, n_scalar: int, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.hidden = nn.Linear(d + n_scalar, width)
        self.out = nn.Linear(width, 1)
        self.skip = nn.Linear(n_scalar, 1, bias=False)
        self.register_buffer("s_mean", torch.zeros(n_scalar))
        self.register_buffer("s_std", torch.ones(n_scalar))

    def set_scalar_stats(self, s: torch.Tensor) -> None:
        """Standardise scalars with the mean / std of ``s`` [N, n_scalar] (training rows)."""
        self.s_mean.copy_(s.mean(0))
        self.s_std.copy_(s.std(0).clamp_min(1e-3))

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        z = (s - self.s_mean) / self.s_std
        x = torch.cat([self.norm(h), z], dim=-1)
        return (self.out(torch.relu(self.hidden(x))) + self.skip(z)).squeeze(-1)

    def logit_one(self, h: torch.Tensor, s: torch.Tensor) -> float:
        """:meth:`forward` for one position (h [d], s [n_scalar]) in numpy: the same maths
        without per-op torch dispatch (a decode-time hot path). The weights are copied on the
        first call and again whenever the hidden layer's weight changed in place."""
        import numpy as np

        from .fastpath import kernels

        w = self._np_weights()
        x, sn = h.detach().float().numpy(), s.detach().float().numpy()
        fast = kernels()
        if fast is not None:  # one compiled pass (same maths, float64 sums)
            return fast.context_logit(x, sn, w["wh"], w["ws"], w["b"], w["out"], w["out_b"], w["skip"],
                                      w["s_mean"], w["s_std"], self.norm.eps)
        x = (x - x.mean()) / np.sqrt(x.var() + self.norm.eps)
        z = (sn - w["s_mean"]) / w["s_std"]
        a = np.maximum(w["wh"] @ x + w["ws"] @ z + w["b"], 0.0)
        return float(w["out"] @ a + w["out_b"] + w["skip"] @ z)

    def _np_weights(self) -> dict:
        version = self.hidden.weight._version
        cache = getattr(self, "_np_cache", None)
        if cache is None or cache[0] != version:
            d = self.hidden.weight.shape[1] - self.s_mean.shape[0]
            wt = self.hidden.weight.detach().float().numpy()
            cache = (version, {"wh": wt[:, :d].copy(), "ws": wt[:, d:].copy(),
                               "b": self.hidden.bias.detach().float().numpy(),
                               "out": self.out.weight.detach().float().numpy()[0],
                               "out_b": float(self.out.bias.detach()),
                               "skip": self.skip.weight.detach().float().numpy()[0],
                               "s_mean": self.s_mean.numpy(), "s_std": self.s_std.numpy()})
            self._np_cache = cache
        return cache[1]


class LengthHead(nn.Module):
    """AdaEAGLE length predictor: 3-layer MLP on [h_t, e] -> [..., k_max] logits (lengths 1..k_max).

    ``emb_proj`` ([V, width], optional) replaces ``first_e(e)`` by a row lookup at inference.
    """

    def __init__(self, d_t: int, d_e: int, k_max: int, width: int = 128) -> None:
        super().__init__()
        self.norm_h = nn.LayerNorm(d_t, elementwise_affine=False)
        self.norm_e = nn.LayerNorm(d_e, elementwise_affine=False)
        self.first_h = nn.Linear(d_t, width)
        self.first_e = nn.Linear(d_e, width, bias=False)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, k_max)
        self.emb_proj: torch.Tensor | None = None

    def trunk(self, first: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(first))))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.first_h(self.norm_h(h)) + self.first_e(self.norm_e(e)))

    def forward_token(self, h: torch.Tensor, token: int) -> torch.Tensor:
        """[d_t] hidden + committed token id -> [k_max] logits, using ``emb_proj``."""
        if self.emb_proj is None:
            raise PolicyArgumentError("ldlp predictor has no embedding table (emb_proj)")
        return self.trunk(self.first_h(self.norm_h(h)) + self.emb_proj[token].float())

    def fold_embeddings(self, embed: torch.Tensor, chunk: int = 8192) -> None:
        """Precompute emb_proj = first_e(norm_e(E)) for E [V, d_e] (stored fp16)."""
        rows = []
        with torch.no_grad():
            for i in range(0, embed.shape[0], chunk):
                rows.append(self.first_e(self.norm_e(embed[i:i + chunk].float())).half())
        self.emb_proj = torch.cat(rows)


def build_head(kind: str, config: dict) -> nn.Module:
    """Instantiate a head from its ``predictor.json`` config."""
    if kind == "specdecpp":
        return ResidualHead(config["d"], config.get("blocks", 2), config.get("width", 0))
    if kind == "context":
        return ContextHead(config["d"], config["n_scalar"], config.get("width", 64))
    if kind == "ldlp":
        return LengthHead(config["d_t"], config["d_e"], config["k_max"], config.get("width", 128))
    raise PolicyArgumentError(f"unknown predictor kind {kind!r}; choose one of {', '.join(KINDS)}")


@dataclass
class Predictor:
    """A loaded head plus its metadata. ``calib_a``/``calib_b`` apply Platt scaling to logits."""

    kind: str
    head: nn.Module
    meta: dict
    path: Path | None = None
    calib: tuple[float, float] = field(default=(1.0, 0.0))

    def prob(self, logit: torch.Tensor) -> torch.Tensor:
        """Calibrated P(accept) from raw logits (binary heads)."""
        a, b = self.calib
        return torch.sigmoid(a * logit + b)

    @property
    def pair(self) -> dict:
        return self.meta.get("pair", {})

    def check_pair(self, target=None, draft=None) -> None:
        """Raise PolicyArgumentError if this predictor was trained for another model pair.

        ``target`` / ``draft`` are :class:`adaspec.checkpoints.loader.LoadedModel` (either may be None).
        """
        pair = self.pair
        where = f"predictor {self.path or ''} ({self.kind})"
        if target is not None and target.tokenizer is not None and pair.get("vocab_sha256"):
            from ..checkpoints.loader import vocab_fingerprint

            if vocab_fingerprint(target.tokenizer) != pair["vocab_sha256"]:
                raise PolicyArgumentError(
                    f"{where} was trained for target {pair.get('target')!r} with another vocabulary; "
                    f"train one for {target.name!r} with `adaspec collect` + `adaspec train-predictor`")
        for role, model, key in (("target", target, "target_hidden"), ("draft", draft, "draft_hidden")):
            if model is None or pair.get(key) is None:
                continue
            d = int(getattr(model.model.config, "hidden_size", -1))
            if d != pair[key]:
                raise PolicyArgumentError(
                    f"{where} was trained for {role} {pair.get(role)!r} (hidden size {pair[key]}), "
                    f"but the {role} {model.name!r} has hidden size {d}; train a predictor for this pair")

    def step_prob(self, step, policy: str, *scalars: torch.Tensor) -> float:
        """Calibrated P(x_i accepted | x_<i accepted) of one drafted position (a
        :class:`~adaspec.types.DraftStep`) from its draft hidden state [d] (and the scalar
        features, for heads that read them): the one check-and-predict of every policy
        that reads a predictor (``policy`` names it in the error).

        Raises:
            PolicyArgumentError: the drafter gave no hidden state, or one of another width.
        """
        if step.hidden is None:
            raise PolicyArgumentError(f"{policy}: the drafter gave no hidden state")
        if step.index == 1:
            self.check_dim("draft", step.hidden.shape[-1])
        a, b = self.calib
        return 1.0 / (1.0 + math.exp(-(a * self.head.logit_one(step.hidden, *scalars) + b)))

    def check_dim(self, role: str, d: int) -> None:
        """Runtime guard: the hidden state handed to the head has the trained width."""
        want = self.pair.get(f"{role}_hidden")
        if want is not None and want != d:
            raise PolicyArgumentError(
                f"predictor {self.path or ''} ({self.kind}) expects {role} hidden size {want} "
                f"(trained for {self.pair.get(role)!r}) but got {d}; train a predictor for this pair")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_predictor(pred: Predictor, out: Path) -> None:
    """Write ``model.safetensors`` + ``predictor.json`` under ``out``.

    Each file goes to a temporary name and is renamed into place, weights first;
    ``predictor.json`` (written last) records the weights' sha256, so an interrupted
    write is refused by :func:`load_predictor` instead of pairing old and new files.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in pred.head.state_dict().items()}
    if isinstance(pred.head, LengthHead) and pred.head.emb_proj is not None:
        state["emb_proj"] = pred.head.emb_proj.contiguous().cpu()
    weights = out / "model.safetensors"
    save_file(state, str(out / "model.safetensors.tmp"), metadata={"format": FORMAT, "kind": pred.kind})
    os.replace(out / "model.safetensors.tmp", weights)
    meta = dict(pred.meta, format=FORMAT, kind=pred.kind,
                calibration={"a": pred.calib[0], "b": pred.calib[1]}, weights_sha256=_sha256(weights))
    (out / "predictor.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / "predictor.json.tmp", out / "predictor.json")


def default_predictor_dir(kind: str) -> Path:
    return ASSETS / kind


def load_predictor(path: str | Path | None, kind: str) -> Predictor:
    """Load a predictor of ``kind`` from ``path`` (None: the shipped default).

    Raises:
        PolicyArgumentError: missing, corrupt, or of another kind (message says how to train one).
    """
    how = (f"train one with `adaspec collect --out TRACES` then "
           f"`adaspec train-predictor --kind {kind} --traces TRACES --out DIR` and pass predictor=DIR")
    p = Path(path).expanduser() if path else default_predictor_dir(kind)
    if not (p / "predictor.json").is_file() or not (p / "model.safetensors").is_file():
        what = "no shipped predictor" if not path else f"no predictor at {p}"
        raise PolicyArgumentError(f"{kind}: {what} (needs predictor.json + model.safetensors); {how}")
    try:
        meta = json.loads((p / "predictor.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyArgumentError(f"{kind}: corrupt predictor.json in {p}: {exc}") from None
    if not isinstance(meta, dict):
        raise PolicyArgumentError(f"{kind}: corrupt predictor.json in {p}: not a JSON object")
    if meta.get("weights_sha256") and _sha256(p / "model.safetensors") != meta["weights_sha256"]:
        raise PolicyArgumentError(
            f"{kind}: corrupt predictor in {p}: model.safetensors does not match predictor.json "
            f"(interrupted write or altered file); {how}")
    if meta.get("format") != FORMAT:
        raise PolicyArgumentError(f"{kind}: {p} is not an adaspec predictor (format {meta.get('format')!r})")
    if meta.get("kind") != kind:
        raise PolicyArgumentError(f"{kind}: {p} holds a {meta.get('kind')!r} predictor, not {kind!r}")
    try:
        from safetensors.torch import load_file

        state = load_file(str(p / "model.safetensors"))
        head = build_head(kind, meta["config"])
        emb = state.pop("emb_proj", None)
        head.load_state_dict(state, strict=True)
    except PolicyArgumentError:
        raise
    except Exception as exc:  # safetensors raises several types on corrupt files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PolicyArgumentError(f"{kind}: corrupt or incompatible predictor in {p}: {first}") from None
    if isinstance(head, LengthHead):
        head.emb_proj = emb
    head.eval()
    cal = meta.get("calibration") or {}
    return Predictor(kind, head, meta, p, (float(cal.get("a", 1.0)), float(cal.get("b", 0.0))))
