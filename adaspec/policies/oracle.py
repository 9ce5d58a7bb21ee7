"""``oracle``: drafts exactly the tokens the target's greedy decoding would accept.

Analysis only: it peeks at the target's own greedy continuation (asked of the engine,
untimed, through the ``before_generate`` hook). It compares the draft's *argmax* with that reference (a
function of the draft distribution, not of the sampled token), so under sampling it
stays lossless, although it is then only a heuristic.

In bf16 a k-token verify can break a near-tie differently from single-token decoding, so
the committed text may leave the reference; from then on the oracle has no future to
peek at and drafts (almost) nothing. ``report()`` gives where that happened
(``oracle_diverged_at``, new-token index, or None), so such runs can be discounted.

Mixed sources (``--draft model+ngram``): the oracle also chooses each round's source
knowing what each would get accepted. Before timing starts it runs the draft model once
over prompt + reference (teacher-forced; under greedy an accepted prefix *is* the
reference, so row j's argmax is what a draft round reaching position j proposes) and
keeps, per position, how many tokens in a row the model would get accepted from there
(m). Per round it counts how many of the n-gram copy's tokens equal the reference (a)
and drafts from the n-gram source when a >= m (a free draft at least as long), from
the model when m > a, and nothing when both are 0 (a plain step, no wasted draft step).
That makes ``oracle:draft=model+ngram`` the reference for the policy efficiency of
``context:draft=model+ngram`` and of the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import PolicyArgumentError
from ..types import Action, DraftStep, RoundContext
from . import register
from .base import Policy


@register
@dataclass
class OraclePolicy(Policy):
    """Keep drafting while the draft's argmax equals the target's next greedy token; drop
    the first position where it does not (the target would reject it).

    Args:
        k_max: upper bound on the draft length (default 64).
    """

    name = "oracle"
    k_max: int = 64
    _ref: list = field(default_factory=list, init=False, repr=False)
    _pos: int = field(default=0, init=False, repr=False)
    _diverged: int | None = field(default=None, init=False, repr=False)
    _checked: int = field(default=0, init=False, repr=False)
    _draft: object = field(default=None, init=False, repr=False)  # LoadedModel, for mixed sources
    _runner: object = field(default=None, init=False, repr=False)
    _model_run: list = field(default_factory=list, init=False, repr=False)  # m per reference position
    _sources: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise PolicyArgumentError(f"oracle: k_max must be >= 1, got {self.k_max}")

    def reset(self) -> None:
        self._diverged, self._checked = None, 0
        self._sources = {}

    def check_pair(self, target: object, draft: object) -> None:
        """Keep the draft model (a LoadedModel or None) for the mixed-source reference."""
        from ..checkpoints.feature_head import FeatureHead

        self._draft = None if draft is None or isinstance(draft.model, FeatureHead) else draft

    def before_generate(self, prompt: list[int], plain_greedy: Callable[[], list[int]]) -> None:
        self._ref = list(plain_greedy())  # the target's own greedy continuation (untimed)
        self._model_run = self._model_runs(prompt) if self._draft is not None else []

    def _model_runs(self, prompt: list[int]) -> list[int]:
        """[len(ref)] m_j: reference tokens the draft model's argmax gets right in a row from j."""
        import torch

        from ..runtime import make_runner, resolve_runtime
        from ..sampling import fit_vocab

        ref = self._ref
        if not ref:
            return []
        model = self._draft.model
        if self._runner is None:
            self._runner = make_runner(model, resolve_runtime("auto", model)[0])
        runner = self._runner
        seq = prompt + ref
        if len(seq) > getattr(runner, "capacity", len(seq)):
            return []
        with torch.inference_mode():
            runner.reset()
            runner.prefill(prompt[:-1])
            logits = runner.forward(seq[:-1], len(ref)).logits  # row j predicts ref[j]
            vocab = getattr(self._draft, "vocab_size", logits.shape[-1])
            ok = (fit_vocab(logits, vocab).argmax(-1) == torch.tensor(ref)).tolist()
        runs, n = [0] * len(ref), 0
        for j in range(len(ref) - 1, -1, -1):
            n = n + 1 if ok[j] else 0
            runs[j] = n
        return runs

    def choose_source(self, match, budget: int) -> str:
        """With ``model+ngram``: the source that gets more tokens accepted this round
        (n-gram on ties, nothing when neither gets one); see the module doc."""
        j, ref = self._pos, self._ref
        a = 0
        for tok in match.tokens[:budget]:
            if j + a >= len(ref) or tok != ref[j + a]:
                break
            a += 1
        m = min(budget, self._model_run[j]) if j < len(self._model_run) else None
        if m is None:
            source = "ngram" if a else "model"
        else:
            source = "none" if a == 0 and m == 0 else ("ngram" if a >= m else "model")
        self._sources[source] = self._sources.get(source, 0) + 1
        return source

    def begin_round(self, ctx: RoundContext) -> int:
        self._pos = len(ctx.committed) - ctx.prompt_len  # reference index of the next token
        if self._diverged is None:  # compare only the tokens committed since the last check
            for j in range(self._checked, self._pos):
                if j >= len(self._ref) or ctx.committed[ctx.prompt_len + j] != self._ref[j]:
                    self._diverged = j
                    break
            self._checked = self._pos
        return max(1, min(self.k_max, len(self._ref) - self._pos))

    def decide(self, step: DraftStep) -> Action:
        j = self._pos + step.index - 1
        if j >= len(self._ref) or int(step.logits.argmax()) != self._ref[j]:
            return Action.DROP
        return Action.CONTINUE

    def report(self) -> dict:
        return {"oracle_diverged_at": self._diverged,
                **({"oracle_sources": dict(self._sources)} if self._sources else {})}
