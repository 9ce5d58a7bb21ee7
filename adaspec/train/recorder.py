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
        self.tok = {k: [] for k in ("hidden", "scalars", "match", "tried", "soft", "qx", "pos", "round")}
        self.rnd = {k: [] for k in ("prompt", "index", "k", "accepted", "draft_s", "verify_s",
                                    "draft_forwards", "hidden", "token")}

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
        f = len(SCALAR_FEATURES)
        return {
            "tok_hidden": _stack(t["hidden"], d_d),
            "tok_scalars": torch.stack(t["scalars"]) if t["scalars"] else torch.zeros(0, f),
            "tok_match": torch.tensor(t["match"], dtype=torch.uint8),
            "tok_tried": torch.tensor(t["tried"], dtype=torch.uint8),
            "tok_soft": torch.tensor(t["soft"], dtype=torch.float32),
            "tok_qx": torch.tensor(t["qx"], dtype=torch.float32),
            "tok_pos": torch.tensor(t["pos"], dtype=torch.int32),
            "tok_round": torch.tensor(t["round"], dtype=torch.int64),
            "round_prompt": torch.tensor(r["prompt"], dtype=torch.int64),
            "round_index": torch.tensor(r["index"], dtype=torch.int32),
            "round_k": torch.tensor(r["k"], dtype=torch.int32),
            "round_accepted": torch.tensor(r["accepted"], dtype=torch.int32),
            "round_draft_s": torch.tensor(r["draft_s"], dtype=torch.float32),
            "round_verify_s": torch.tensor(r["verify_s"], dtype=torch.float32),
            "round_draft_forwards": torch.tensor(r["draft_forwards"], dtype=torch.int32),
            "round_hidden": _stack(r["hidden"], d_t),
            "round_token": torch.tensor(r["token"], dtype=torch.int64),
        }


def _stack(rows: list[torch.Tensor], d: int) -> torch.Tensor:
    """[n, d] fp16 stack of [d] rows (an empty [0, d] when there are none)."""
    return torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float16)
