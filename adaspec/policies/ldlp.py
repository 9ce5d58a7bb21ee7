"""``ldlp``: AdaEAGLE-style draft length prediction from the target's state.

After each verification a 3-layer MLP reads the target's last hidden state at the last
committed position (h_t, [d_t]) and the embedding of the committed extra token and
predicts the next round's length as a class over 1..k_max; the next round drafts that
many tokens. Optionally combined with a stop rule (stop after a token with q(x) < stop_q,
token kept). The length is fixed before drafting, so the rule is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PolicyArgumentError
from ..predictors.models import Predictor, load_predictor
from ..types import Action, DraftStep, RoundContext, RoundOutcome
from . import register
from .base import Policy


@register
@dataclass
class LDLPPolicy(Policy):
    """Draft the predicted length; the first round of a call drafts ``k_first``.

    Args:
        predictor: predictor directory (default: the shipped ``assets/predictors/ldlp``).
        k_first: length of the first round (no target state yet; default 4).
        stop_q: also stop after a token whose draft probability is below this (0 = off).
        bias: added to the predicted length (default 0), clamped to 1..k_max.
    """

    name = "ldlp"
    needs_target_hidden = True
    predictor: str | None = None
    k_first: int = 4
    stop_q: float = 0.0
    bias: int = 0
    _pred: Predictor | None = field(default=None, init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)
    _k_max: int = field(default=1, init=False, repr=False)
    _trace: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_first < 1 or not 0.0 <= self.stop_q < 1.0:
            raise PolicyArgumentError(f"ldlp: need k_first >= 1 and 0 <= stop_q < 1; got {self}")
        self._pred = load_predictor(self.predictor, "ldlp")
        self._k_max = int(self._pred.meta["config"]["k_max"])
        self.reset()

    def reset(self) -> None:
        self._next = self.k_first
        self._trace = []

    def begin_round(self, ctx: RoundContext) -> int:
        return self._next

    def decide(self, step: DraftStep) -> Action:
        if self.stop_q > 0.0 and step.token_prob < self.stop_q:
            return Action.STOP
        return Action.CONTINUE

    @torch.inference_mode()
    def observe(self, outcome: RoundOutcome) -> None:
        if outcome.target_hidden is None:
            raise PolicyArgumentError("ldlp: the engine gave no target hidden state")
        m = outcome.verdict.accepted
        h = outcome.target_hidden[m].float()  # [d_t] state that produced the committed token
        if outcome.context is not None and outcome.context.round_index == 0:
            self._pred.check_dim("target", h.shape[-1])
        logits = self._pred.head.forward_token(h, outcome.verdict.token)  # [k_max]
        self._next = min(self._k_max, max(1, int(logits.argmax()) + 1 + self.bias))
        self._trace.append(self._next)

    def report(self) -> dict:
        return {"ldlp_lengths": list(self._trace)}
