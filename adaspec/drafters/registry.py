"""Draft sources by name: ``--draft`` / ``draft=`` values and the drafter they build.

A draft is a model (``default``, a local directory, an HF id or a loaded model), a
model-free source (``ngram``), or a combination: ``model+ngram`` / ``default+ngram``
(``model`` means the default draft), or a list in the API (``["default", "ngram"]``).
At most one model; ``none`` means plain decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, PolicyArgumentError
from .base import Drafter
from .mixed import MixedDrafter
from .model import ModelDrafter
from .ngram import NgramDrafter
from .suffix import SuffixCache

# model-free sources: name -> factory(target vocabulary size)
MODEL_FREE: dict[str, Callable[[int], Any]] = {
    "ngram": lambda vocab_size: NgramDrafter(vocab_size),
}
MODEL_ALIASES = {"model": "default", "head": "head:default"}


@dataclass(frozen=True)
class DraftSpec:
    """A parsed draft argument.

    Attributes:
        model: the draft model's spec (a string or a LoadedModel), or None.
        sources: model-free source names, in the order given (e.g. ``("ngram",)``).
    """

    model: Any = None
    sources: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.model is None and not self.sources


def parse_draft(draft: Any) -> DraftSpec:
    """``"default"``, ``"ngram"``, ``"model+ngram"``, ``["default", "ngram"]``, a LoadedModel,
    ``None`` / ``"none"`` -> :class:`DraftSpec`.

    Raises:
        InvalidArgumentError: two models, a repeated source, ``none`` inside a combination.
    """
    if draft is None or (isinstance(draft, str) and draft.strip() == "none"):
        return DraftSpec()
    if isinstance(draft, str):
        parts: Sequence[Any] = [draft] if "+" not in draft or Path(draft).exists() else draft.split("+")
    elif isinstance(draft, (list, tuple)):
        parts = list(draft)
    else:
        parts = [draft]
    if not parts:
        raise InvalidArgumentError("draft list is empty (use None or 'none' for plain decoding)")
    model, sources = None, []
    for part in parts:
        if isinstance(part, str):
            name = part.strip()
            if not name or (name == "none" and len(parts) > 1):
                raise InvalidArgumentError(f"bad draft {draft!r}: empty or 'none' inside a combination")
            if name in MODEL_FREE:
                if name in sources:
                    raise InvalidArgumentError(f"bad draft {draft!r}: {name!r} given twice")
                sources.append(name)
                continue
            part = MODEL_ALIASES.get(name, name)
        if model is not None:
            raise InvalidArgumentError(f"bad draft {draft!r}: at most one draft model")
        model = part
    return DraftSpec(model, tuple(sources))


def check_policy(policy: Any, spec: DraftSpec) -> None:
    """Refuse a policy that cannot work with these sources (one clear line).

    Policies reading the draft model's hidden state / attention need a model; with a model
    plus model-free sources they must also understand model-free steps (``choose_source``).
    ``ldlp`` predicts the length of a model draft, so it needs the model too.
    """
    if not spec.sources:
        return
    name = getattr(policy, "name", "?")
    reads_draft = policy.needs.hidden or policy.needs.attention
    src = "+".join(spec.sources)
    if spec.model is None and (reads_draft or policy.needs_target_hidden):
        raise PolicyArgumentError(f"policy {name!r} needs a draft model (its hidden state or its draft "
                                  f"lengths); draft {src!r} has none; try --draft model+{src}")
    if reads_draft and not hasattr(policy, "choose_source"):
        raise PolicyArgumentError(f"policy {name!r} reads the draft model's hidden state, which {src!r} "
                                  "drafts lack; use it with a model draft only")


def build_drafter(spec: DraftSpec, model_drafter: ModelDrafter | None, vocab_size: int,
                  policy: Any = None, suffix_cache: SuffixCache | None = None) -> Drafter | None:
    """The drafter for ``spec``: the model's, a model-free one, or a :class:`MixedDrafter`
    (whose per-round choice is ``policy.choose_source`` when the policy has one).
    ``suffix_cache`` (cross-request drafts) goes to the n-gram source."""
    free = [MODEL_FREE[name](vocab_size) for name in spec.sources]
    if len(free) > 1:
        raise InvalidArgumentError("only one model-free draft source is supported per drafter")
    for source in free:
        if isinstance(source, NgramDrafter):
            source.cache = suffix_cache
    if not free:
        return model_drafter
    if model_drafter is None:
        return free[0]
    return MixedDrafter(model_drafter, free[0], chooser=getattr(policy, "choose_source", None))


__all__ = ["MODEL_FREE", "DraftSpec", "build_drafter", "check_policy", "parse_draft"]
