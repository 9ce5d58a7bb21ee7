"""The recording policy of ``adaspec collect``: drafts ``k`` tokens every round and keeps,
per drafted token and per round, the features and labels a trace shard stores (the
tensors are listed in :mod:`adaspec.train.traces`). The engine and the replay
(:mod:`adaspec.train.replay`) both drive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policies.base import Policy
from ..predictors.features import SCALAR_FEATURES, RecentAcceptance, scalar_features, soft_label
from ..types import Action, DraftNeeds, DraftStep, RoundContext, RoundOutcome

# the per-token and per-round rows of a shard besides the hidden states and scalars, and their dtypes
TOKEN_DTYPES = {"match": torch.uint8, "tried": torch.uint8, "soft": torch.float32, "qx": torch.float32,
                "pos": torch.int32, "round": torch.int64}
ROUND_DTYPES = {"prompt": torch.int64, "index": torch.int32, "k": torch.int32, "accepted": torch.int32,
                "draft_s": torch.float32, "verify_s": torch.float32, "draft_forwards": torch.int32,
                "token": torch.int64}


@dataclass
class RecorderPolicy(Policy):
    """Drafts ``k`` tokens every round and records features and labels (collection only)."""

    name = "recorder"
    needs_target_hidden = True
    k: int = 8
    attention: bool = False
    tok: dict = field(default_factory=dict)
    rnd: dict = field(default_factory=dict)
    prompt_index: int = 0
    _recent: RecentAcceptance = field(default_factory=RecentAcceptance)
    _scalars: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.needs = DraftNeeds(hidden=True, attention=self.attention)
        self.clear()

    def clear(self) -> None:
        self.tok = {k: [] for k in ("hidden", "scalars", *TOKEN_DTYPES)}
        self.rnd = {k: [] for k in ("hidden", *ROUND_DTYPES)}

    def reset(self) -> None:
        self._recent.reset()

    def begin_round(self, ctx: RoundContext) -> int:
        self._scalars = []
        return self.k

    def decide(self, step: DraftStep) -> Action:
        self._scalars.append(scalar_features(step, self._recent.value))
        return Action.CONTINUE

    def observe(self, outcome: RoundOutcome) -> None:
        steps, v = outcome.draft.steps, outcome.verdict
        k, m = len(steps), v.accepted
        p = torch.softmax(outcome.target_logits.float(), dim=-1)  # [K+1, V]
        argmax = outcome.target_logits.argmax(dim=-1).tolist()
        r = len(self.rnd["prompt"])
        for i, step in enumerate(steps):
            self.tok["hidden"].append(step.hidden.to(torch.float16))
            self.tok["scalars"].append(self._scalars[i])
            self.tok["match"].append(int(step.token == argmax[i]))
            self.tok["tried"].append(int(i <= m))
            self.tok["soft"].append(soft_label(p[i], step.probs, step.token))
            self.tok["qx"].append(step.token_prob)
            self.tok["pos"].append(step.index)
            self.tok["round"].append(r)
        self.rnd["prompt"].append(self.prompt_index)
        self.rnd["index"].append(outcome.context.round_index if outcome.context else r)
        self.rnd["k"].append(k)
        self.rnd["accepted"].append(m)
        self.rnd["draft_s"].append(outcome.draft_s)
        self.rnd["verify_s"].append(outcome.verify_s)
        self.rnd["draft_forwards"].append(outcome.draft.forwards)
        self.rnd["hidden"].append(outcome.target_hidden[m].to(torch.float16))
        self.rnd["token"].append(v.token)
        self._recent.update(k, m)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The recorded rows as the shard's tensors (see the module docstring)."""
        t, r = self.tok, self.rnd
        d_d = t["hidden"][0].shape[-1] if t["hidden"] else 0
        d_t = r["hidden"][0].shape[-1] if r["hidden"] else 0
        scalars = torch.stack(t["scalars"]) if t["scalars"] else torch.zeros(0, len(SCALAR_FEATURES))
        out = {"tok_hidden": _stack(t["hidden"], d_d), "tok_scalars": scalars,
               "round_hidden": _stack(r["hidden"], d_t)}
        for prefix, rows, dtypes in (("tok", t, TOKEN_DTYPES), ("round", r, ROUND_DTYPES)):
            out.update({f"{prefix}_{k}": torch.tensor(rows[k], dtype=dt) for k, dt in dtypes.items()})
        return out


def _stack(rows: list[torch.Tensor], d: int) -> torch.Tensor:
    """[n, d] fp16 stack of [d] rows (an empty [0, d] when there are none)."""
    return torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float16)
