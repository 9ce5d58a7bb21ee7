"""Drafts by name: ``--draft`` / ``draft=`` values, parsed once into a :class:`DraftSpec`
that loads its model and builds its drafter.

A draft is a model (``default``, a local directory, an HF id or a loaded model), a feature
head (``head:DIR``, ``head:default``), a model-free source (``ngram``), or a combination:
``model+ngram`` / ``default+ngram`` (``model`` means the default draft), or a list in the API
(``["default", "ngram"]``). At most one model; ``none`` means plain decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoints.feature_head import FeatureHead, head_dir, load_head
from ..checkpoints.loader import LoadedModel, check_vocab_compat, load_model, vocab_fingerprint
from ..errors import InvalidArgumentError, ModelLoadError, PolicyArgumentError, VocabMismatchError
from .base import Drafter
from .mixed import MixedDrafter
from .model import ModelDrafter
from .ngram import NgramDrafter
from .suffix import SuffixCache

if TYPE_CHECKING:
    from ..runtime.plan import RuntimePlan

# model-free sources: name -> factory(target vocabulary size)
MODEL_FREE: dict[str, Callable[[int], Any]] = {
    "ngram": lambda vocab_size: NgramDrafter(vocab_size),
}
MODEL_ALIASES = {"model": "default", "head": "head:default"}


@dataclass(frozen=True)
class DraftSpec:
    """What a draft is: at most one draft model plus model-free sources.

    The one place that knows the kinds of draft (:attr:`kind`), writes a spec back as an
    argument (:attr:`arg`, :attr:`name`), loads its model (:meth:`load`) and builds its
    drafter (:meth:`drafter`); the API, the benchmark and the server only call these.

    Attributes:
        model: the draft model part: a name (``default``, a directory, an HF id,
            ``head:DIR``), a :class:`~adaspec.checkpoints.loader.LoadedModel` (a model or a
            wrapped feature head), or None.
        sources: model-free source names, in the order given (e.g. ``("ngram",)``).
    """

    model: Any = None
    sources: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.model is None and not self.sources

    @property
    def kind(self) -> str | None:
        """``"head"`` (a feature head: ``head:DIR``, a directory holding one, or a loaded
        one), ``"model"`` (any other draft model) or None (no draft model)."""
        if self.model is None:
            return None
        if not isinstance(self.model, str):
            return "head" if isinstance(getattr(self.model, "model", None), FeatureHead) else "model"
        try:
            return "model" if head_dir(self.model) is None else "head"
        except ModelLoadError:  # head:DIR without a head in DIR: refused when loaded
            return "head"

    @property
    def arg(self) -> Any:
        """This spec as a ``draft`` argument again: None (plain decoding), a string
        (``"default+ngram"``, ``"head:DIR"``) when every part is a name, else a list."""
        if self.empty:
            return None
        parts = ([self.model] if self.model is not None else []) + list(self.sources)
        if all(isinstance(p, str) and "+" not in p for p in parts):
            return "+".join(parts)
        return parts if len(parts) > 1 else parts[0]

    @property
    def name(self) -> str:
        """For people: ``"adaspec-draft+ngram"``, ``"ngram"``, ``"none"``."""
        model = [] if self.model is None else [getattr(self.model, "name", self.model)]
        return "+".join([*map(str, model), *self.sources]) or "none"

    def with_model(self, model: Any) -> DraftSpec:
        """The same sources over another model part (e.g. the benchmark's loaded draft)."""
        return replace(self, model=model)

    def load(self, target: LoadedModel, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
             runtime: str = "auto", fallback: bool = False) -> tuple[DraftSpec, str | None]:
        """This spec with its model part loaded, and a note when it had to fall back.

        A named model is loaded in ``dtype`` for ``runtime``; a feature head is read for
        ``target`` and wrapped as a :class:`LoadedModel`. ``fallback`` (the default draft):
        a model whose vocabulary does not fit the target is dropped, leaving the model-free
        sources, with a one-line note, instead of raising.

        Raises:
            ModelLoadError: the model or head cannot be loaded (or was trained for another target).
            VocabMismatchError: the draft's vocabulary does not fit the target's.
        """
        if self.kind is None:
            return self, None
        if self.kind == "head":
            if isinstance(self.model, str):
                return self.with_model(load_head_draft(head_dir(self.model), target)), None
            return self, None  # another generator's head
        draft = self.model if isinstance(self.model, LoadedModel) else load_model(
            self.model, dtype=dtype, device=device, role="draft", runtime=runtime)
        try:
            check_vocab_compat(target, draft)
        except VocabMismatchError as exc:
            if not fallback:
                raise
            return DraftSpec(None, self.sources), f"default draft: ngram only ({exc})"
        return self.with_model(draft), None

    def drafter(self, target: LoadedModel, plan: RuntimePlan, policy: Any = None,
                suffix_cache: SuffixCache | None = None) -> Drafter | None:
        """A fresh drafter of this (loaded) spec for ``target``, on the runtimes of ``plan``
        (its own caches and state; the weights are shared)."""
        model_drafter = None
        if self.kind == "head":
            from .head import HeadDrafter

            model_drafter = HeadDrafter(self.model.model, target.model, target.vocab_size, plan.target,
                                        target.max_context)
        elif self.model is not None:
            model_drafter = ModelDrafter(self.model, target.vocab_size, plan.draft)  # releases if owned
        return build_drafter(self, model_drafter, target.vocab_size, policy, suffix_cache)


def load_head_draft(path: Path, target: LoadedModel) -> LoadedModel:
    """The feature head in ``path`` for ``target``, wrapped as a draft :class:`LoadedModel`.

    Raises:
        ModelLoadError: a head trained for another target (hidden size or vocabulary).
    """
    sha = vocab_fingerprint(target.tokenizer) if target.tokenizer is not None else None
    head = load_head(path, target_hidden=int(target.model.config.hidden_size), target_vocab_sha=sha)
    return LoadedModel(head, None, f"head:{path}", target.vocab_size, target.max_context)


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


__all__ = ["MODEL_FREE", "DraftSpec", "build_drafter", "check_policy", "load_head_draft", "parse_draft"]
