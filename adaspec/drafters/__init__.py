"""Drafters propose tokens for the target to verify (DESIGN §3 ``propose(context, budget, stop_fn)``)."""

from .base import Drafter, DraftNeeds
from .model import ModelDrafter
from .ngram import NgramDrafter

__all__ = ["DraftNeeds", "Drafter", "ModelDrafter", "NgramDrafter"]
