"""``context``: context-aware adaptive drafting (Accelerating Speculative Decoding via
Efficient Context-Aware Draft Generation, ACL 2025) with a throughput-driven online threshold.

A single-hidden-layer MLP reads the draft's hidden state h_i [d] plus scalar features
(entropy, top-4 probabilities, last-layer attention concentration, position, recent
acceptance; see :mod:`adaspec.predictors.features`) and predicts p_i = P(x_i accepted |
x_<i accepted). With P_i = prod_{j<=i} p_j and the online thresholds of
:class:`~adaspec.predictors.costs.OnlineTau`:

- P_i < tau_keep  -> DROP x_i (not worth its marginal verify cost);
- P_i * p_i < tau -> STOP after x_i (drafting x_{i+1}, whose acceptance is estimated by
  p_i, would not pay for a draft step plus its verify cost);
- otherwise CONTINUE.

All features depend on the draft distribution at position i, not on the sampled token,
so dropping is lossless under sampling too. The tau trace is reported in stats.extra.

Extra compute at difficult positions (``branch=on``, verified as a token tree by the
engine): an extra candidate j (the next most likely draft tokens) at kept position i pays
when the chain reaches i, x_i is rejected and j is accepted instead, weighed against its
verify cost:  P_{i-1} * (1 - p_i) * q_j / (1 - q_top) * T > max(b, node_floor * T).
Up to ``max_branch`` candidates pass; the fewer, the more confident the model.
Draft sources (``--draft model+ngram``): before each round :meth:`ContextPolicy.choose_source`
picks the n-gram copy, the model or nothing, and the copy's length, by predicted tokens per
second (:class:`~adaspec.predictors.source_choice.SourceChoice`: the copy's acceptance
predicted from its match length and recurrence, corrected online; the model's yield and
every verify cost measured). An n-gram draft (q one-hot, no hidden state) is cut at that
length; only model rounds feed the predictor's features and the tau cost model.
Without a trained predictor (``predictor=online``: what the default falls back to for a pair
nobody trained one for) p_i is the draft's own top-1 probability calibrated online against
the target's verdicts (:class:`~adaspec.predictors.online.OnlineAcceptance`); the rules
above are unchanged.
No draft at all (model draft alone): a round drafts nothing when the measured acceptance of
a round's first token, times T, is below the cost of drafting it (c_d + b): the first
token would not pay for itself. Every ``probe_every``-th such round drafts anyway, so the
estimate keeps up with the text. (With ``--draft model+ngram`` the source choice decides
"none" instead.)
Ablations: ``adapt=false`` keeps tau fixed at ``tau``; ``mode=random`` drafts a uniformly
random length in 1..k_max (no predictor); ``branch_rule=always`` spends the extra candidates
without difficulty prediction: ``max_branch`` of them at every kept position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..errors import PolicyArgumentError
from ..predictors.costs import OnlineTau, WarmEma
from ..predictors.features import RecentAcceptance, entropy_and_top, scalar_features
from ..predictors.models import Predictor, load_predictor
from ..predictors.online import OnlineAcceptance
from ..predictors.source_choice import SourceChoice
from ..types import Action, DraftNeeds, DraftStep, RoundContext, RoundOutcome
from . import register
from .base import Policy


@register
@dataclass
class ContextPolicy(Policy):
    """Stop / drop by predicted cumulative acceptance against a cost-derived threshold.

    Args:
        predictor: predictor directory (default: the shipped ``assets/predictors/context``);
            ``online``: no trained predictor, the draft's top-1 probability calibrated online.
        tau: initial (or, with adapt=false, fixed) continue threshold (default 0.5).
        adapt: adapt tau online from measured draft / verify costs (default true).
        tau_min / tau_max: bounds on tau (defaults 0.05 / 0.95).
        k_max: upper bound on the draft length (default 16).
        mode: "model" (default) or "random" (ablation: random length, no predictor).
        seed: RNG seed of mode=random.
        branch: propose extra candidates at difficult positions (default off).
        max_branch: at most this many extra candidates per position (default 3).
        branch_rule: "cost" (default: the rule in the module doc) or "always" (ablation:
            ``max_branch`` candidates at every kept position).
        node_floor: minimum verify cost of a tree node as a fraction of T (default 0.05).
        probe_every: with the model draft alone, draft anyway after this many rounds that
            drafted nothing (default 4; 0 = never skip a round).
        recalibrate: > 0: correct the trained predictor online against the target's verdicts
            (per bin of its probability, a Beta posterior with this many pseudo-observations
            at the predicted value); 0 (default): the predictor as trained.
        carry: keep what was measured about this machine and pair from one generate() to
            the next (draft / verify costs, online calibration, first-token acceptance):
            true: a generator or a server starts each request warm; false: every call
            starts cold (sessions 1-7); auto (default): warm after a call that drafted from
            the model alone, cold after one with several sources (HumanEval dev, 16
            prompts: model alone 1.01x / 1.02x ``ar`` warm vs 0.96x cold; model+ngram
            1.14x / 1.13x warm vs 1.17x / 1.21x cold). Per-text state (recent
            acceptance, the source choice's statistics, this round's plan) always starts
            afresh.
    """

    name = "context"
    predictor: str | None = None
    tau: float = 0.5
    adapt: bool = True
    tau_min: float = 0.05
    tau_max: float = 0.95
    k_max: int = 16
    mode: str = "model"
    seed: int = 0
    branch: bool = False  # on: extra candidates at difficult positions (extra_candidates)
    max_branch: int = 3
    branch_rule: str = "cost"
    node_floor: float = 0.05
    probe_every: int = 4
    recalibrate: float = 0.0
    carry: str = "auto"  # true | false | auto (a bool is accepted too)
    _pred: Predictor | None = field(default=None, init=False, repr=False)
    _costs: OnlineTau | None = field(default=None, init=False, repr=False)
    _recent: RecentAcceptance = field(default_factory=RecentAcceptance, init=False, repr=False)
    _prod: float = field(default=1.0, init=False, repr=False)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False)
    _probs: list = field(default_factory=list, init=False, repr=False)
    _last: tuple = field(default=(1.0, 1.0), init=False, repr=False)  # (P_{i-1}, p_i)
    _branch_on: bool = field(default=False, init=False, repr=False)
    _sources: SourceChoice = field(default_factory=SourceChoice, init=False, repr=False)
    _round: tuple = field(default=("model", 0, 0.0, 0, False), init=False, repr=False)
    # (source, match length, agreement, n-gram draft length, a cache copy) of the round being drafted
    _online: OnlineAcceptance | None = field(default=None, init=False, repr=False)
    _conf: list = field(default_factory=list, init=False, repr=False)  # top-1 q of this round's tokens
    _first: WarmEma = field(default_factory=WarmEma, init=False, repr=False)  # P(x_1 accepted)
    _skipped: int = field(default=0, init=False, repr=False)  # rounds in a row that drafted nothing
    _skips: int = field(default=0, init=False, repr=False)
    _mixed: bool = field(default=False, init=False, repr=False)  # a source chooser asked this call
    _carry: bool | str = field(default="auto", init=False, repr=False)  # carry, parsed

    def __post_init__(self) -> None:
        if not 0 < self.tau_min <= self.tau <= self.tau_max < 1 or self.k_max < 1:
            raise PolicyArgumentError(
                f"context: need 0 < tau_min <= tau <= tau_max < 1 and k_max >= 1; got {self}")
        if self.max_branch < 0 or self.node_floor < 0:
            raise PolicyArgumentError("context: max_branch and node_floor must be >= 0")
        if self.branch_rule not in ("cost", "always"):
            raise PolicyArgumentError(
                f"context: branch_rule must be 'cost' or 'always', got {self.branch_rule!r}")
        if self.mode not in ("model", "random"):
            raise PolicyArgumentError(f"context: mode must be 'model' or 'random', got {self.mode!r}")
        self._branch_on = bool(self.branch)  # ``--policy-arg branch=on|off``
        word = str(self.carry).lower()
        if word not in ("true", "false", "auto", "on", "off", "1", "0"):
            raise PolicyArgumentError(f"context: carry must be true, false or auto, got {self.carry!r}")
        self._carry = "auto" if word == "auto" else word in ("true", "on", "1")
        self._costs = OnlineTau(self.tau, self.tau_min, self.tau_max)
        if self.probe_every < 0:
            raise PolicyArgumentError("context: probe_every must be >= 0")
        if self.mode == "model" and self.predictor == "online":
            self._online = OnlineAcceptance()
            self.needs = DraftNeeds()
        elif self.mode == "model":
            self._pred = load_predictor(self.predictor, "context")
            if self.recalibrate > 0:
                self._online = OnlineAcceptance(prior_weight=self.recalibrate)
            attention = bool(self._pred.meta.get("features", {}).get("attention", False))
            self.needs = DraftNeeds(hidden=True, attention=attention)
        self._forget()
        self.reset()

    def _forget(self) -> None:
        """Drop what was measured about the machine and the pair (costs, calibration)."""
        self._costs.reset()
        if self._online is not None:
            self._online.reset()
        self._first = WarmEma()
        self._skipped = 0  # rounds in a row that drafted nothing (carried: probes span calls)

    def reset(self) -> None:
        """Per generate(): per-text state afresh (the source choice's statistics too: an
        n-gram copy's odds are the text's); the machine's and pair's measurements as well
        unless ``carry``."""
        if self._carry is False or (self._carry == "auto" and self._mixed):
            self._forget()
        self._costs.trace = []  # the report's tau trace covers this call
        self._sources.reset()
        self._recent.reset()
        self._rng = random.Random(self.seed)
        self._probs = []
        self._round = ("model", 0, 0.0, 0, False)
        self._conf = []
        self._skips = 0
        self._mixed = False

    def choose_source(self, match, budget: int) -> str:
        """Draft source of this round with ``--draft model+ngram`` (``match``: the n-gram
        :class:`~adaspec.drafters.ngram.Match`): the best predicted tokens per second; an
        n-gram draft's length is kept for :meth:`decide`."""
        self._mixed = True
        probs = match.probs if match.origin == "cache" else ()  # a cache copy's frequencies
        plan = self._sources.plan(match.length, match.agreement, budget, len(match.tokens), probs)
        self._round = (plan.source, match.length, match.agreement, plan.length, bool(probs))
        return plan.source

    @property
    def current_tau(self) -> float:
        return self._costs.tau if self.adapt else self.tau

    def begin_round(self, ctx: RoundContext) -> int:
        self._prod, self._conf = 1.0, []
        if self.mode == "random":
            return self._rng.randint(1, self.k_max)
        if self._skip_round():
            self._skipped += 1
            self._skips += 1
            return 0
        self._skipped = 0
        return self.k_max

    def _skip_round(self) -> bool:
        """No draft this round: the first token's measured acceptance times T is below its
        cost c_d + b (module doc); never with a source chooser, at most ``probe_every`` in a row."""
        c = self._costs
        if not self.adapt or self._mixed or self.probe_every == 0 or self._first.n < 4 or c.T <= 0:
            return False
        if self._skipped >= self.probe_every:
            return False
        return self._first.value * c.T < c.c_d + c.slope

    @torch.inference_mode()
    def predict(self, step: DraftStep) -> float:
        """Calibrated P(x_i accepted | x_<i accepted) for one drafted position."""
        if self._pred is None:
            raw = step.top1
        else:
            raw = self._pred.step_prob(step, "context", scalar_features(step, self._recent.value))
        if self._online is None:
            return raw
        self._conf.append(raw)
        return self._online.prob(raw)

    def decide(self, step: DraftStep) -> Action:
        if getattr(step, "source", "model") == "ngram":  # the copy's length was chosen with it
            return Action.STOP if step.index >= self._round[3] else Action.CONTINUE
        if self.mode == "random":
            return Action.CONTINUE
        p = self.predict(step)
        self._last = (self._prod, p)
        self._prod *= p
        tau = self.current_tau
        tau_keep = self._costs.tau_keep if self.adapt else 0.0
        if self._prod < tau_keep:
            return Action.DROP
        if self._prod * p < tau:
            return Action.STOP
        return Action.CONTINUE

    def extra_candidates(self, step: DraftStep) -> int:
        """Extra candidates beside ``step.token`` at this kept position (rule in the module doc)."""
        if not self._branch_on or self.mode != "model" or self.max_branch == 0 or \
                getattr(step, "source", "model") == "ngram":
            return 0
        if self.branch_rule == "always":
            return self.max_branch
        c = self._costs
        if c.T <= 0:
            return 0
        prev, p = self._last
        top = entropy_and_top(step.scored, self.max_branch + 1)[1].tolist()  # q_top, q_2, ...
        rest = max(1e-6, 1.0 - top[0])
        node_cost = max(c.slope, self.node_floor * c.T)
        n = 0
        for q in top[1:]:
            if prev * (1.0 - p) * (q / rest) * c.T <= node_cost:
                break
            n += 1
        return n

    def observe(self, outcome: RoundOutcome) -> None:
        k, m = len(outcome.draft.tokens), outcome.verdict.accepted
        source, match_len, agreement, _, cached = self._round
        self._round = ("model", 0, 0.0, 0, False)
        self._sources.update(source, match_len, agreement, outcome.draft_s, outcome.verify_s,
                             outcome.draft.tree_size + 1, k, m, m + 1, cached)
        if source == "ngram":
            return  # the predictor's features and the tau cost model describe model drafts
        self._recent.update(k, m)
        if k:
            self._first.add(float(m > 0), 0.1)
        if self._online is not None:
            self._online.update(self._conf[:k], m)  # a dropped token was never tested
        self._costs.update(outcome.draft_s, outcome.draft.forwards, outcome.verify_s,
                           outcome.draft.tree_size + 1, m + 1)  # tree: candidates are verified too

    def report(self) -> dict:
        c = self._costs
        return {"tau_trace": list(c.trace), "tau": self.current_tau, "tau_keep": c.tau_keep,
                "draft_step_s": c.c_d, "verify_slope_s": c.slope, "s_per_token": c.T,
                "skipped_rounds": self._skips,
                **(self._online.report() if self._online is not None else {}),
                **(self._sources.report() if self._sources.ngram_rounds else {})}
