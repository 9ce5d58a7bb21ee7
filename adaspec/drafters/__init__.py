"""Drafters propose tokens for the target to verify: ``propose(context, DraftRequest) -> Draft``
(docs/design.md §1; protocol :class:`~.base.Drafter`; one drafting loop, :class:`~.base.DraftBuilder`)."""

from .base import DraftBuilder, Drafter, DraftNeeds, DraftRequest
from .model import ModelDrafter
from .ngram import NgramDrafter

__all__ = ["DraftBuilder", "DraftNeeds", "DraftRequest", "Drafter", "ModelDrafter", "NgramDrafter"]
