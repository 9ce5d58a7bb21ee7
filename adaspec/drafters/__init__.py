"""Drafters propose tokens for the target to verify (docs/design.md §1; protocol: :class:`.base.Drafter`)."""

from .base import Drafter, DraftNeeds
from .model import ModelDrafter
from .ngram import NgramDrafter

__all__ = ["DraftNeeds", "Drafter", "ModelDrafter", "NgramDrafter"]
