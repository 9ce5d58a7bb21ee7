"""What a user gets without ``--policy`` / ``--draft``: the best adaptive method for the pair.

- draft ``auto`` = the default draft model plus the n-gram source (``model+ngram``): each
  round drafts from the source predicted to commit the most tokens per second;
- policy ``auto`` = ``context`` with the shipped predictor when that predictor was trained
  for exactly this pair (same model names, vocabulary and hidden sizes); for any other
  pair ``context`` with ``predictor=online`` (the draft's own top-1 probability calibrated
  online: no training needed; same cost-driven stop rule and source choice), and a
  one-line note says so. With no draft model at all (``--draft ngram``) ``fixed`` with
  ``k=8``; with no draft, plain decoding.

Nothing here can make the output differ: every policy keeps greedy identity and the
sampling distribution exact.
"""

from __future__ import annotations

from typing import Any

from ..errors import PolicyArgumentError
from . import make_policy
from .base import Policy

AUTO = "auto"
AUTO_DRAFT = "model+ngram"
NGRAM_ONLY_K = 8


def shipped_predictor_fits(target: Any, draft: Any) -> str | None:
    """None when the shipped ``context`` predictor was trained for this (target, draft)
    pair of :class:`~adaspec.checkpoints.loader.LoadedModel` s, else why not (one clause)."""
    from ..predictors.models import load_predictor

    try:
        pred = load_predictor(None, "context")
    except PolicyArgumentError as exc:
        return str(exc)
    pair = pred.pair
    for role, model in (("target", target), ("draft", draft)):
        if pair.get(role) != getattr(model, "name", None):
            return f"the shipped predictor was trained for {role} {pair.get(role)!r}, not {model.name!r}"
    try:
        pred.check_pair(target, draft)
    except PolicyArgumentError as exc:
        return str(exc)
    return None


def auto_policy(target: Any, draft: Any, sources: tuple[str, ...]) -> tuple[Policy, str | None]:
    """The default policy for a loaded pair and draft sources, and a one-line note when it
    is not the trained ``context`` (None otherwise)."""
    if draft is None:
        if not sources:
            return make_policy("fixed"), None  # plain decoding: the policy is never asked
        return make_policy("fixed", {"k": NGRAM_ONLY_K}), (
            f"default policy: fixed k={NGRAM_ONLY_K} (no draft model: {'+'.join(sources)} only)")
    why = shipped_predictor_fits(target, draft)
    if why is None:
        return make_policy("context"), None
    return make_policy("context", {"predictor": "online"}), (
        f"default policy: context with predictor=online (draft confidence calibrated online; "
        f"no trained predictor for this pair: {why})")


__all__ = ["AUTO", "AUTO_DRAFT", "auto_policy", "shipped_predictor_fits"]
