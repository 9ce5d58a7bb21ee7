"""Typed exceptions. Every user mistake raises an :class:`AdaspecError` subclass.

The CLI turns these into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class AdaspecError(Exception):
    """Base class for errors caused by user input or environment, not by bugs."""


class InvalidArgumentError(AdaspecError, ValueError):
    """A call argument is out of range or malformed (empty prompt, max_new_tokens <= 0...)."""


class ModelLoadError(AdaspecError):
    """A model id or path cannot be resolved or loaded."""


class VocabMismatchError(AdaspecError):
    """Target and draft do not share a vocabulary, so draft tokens mean nothing to the target."""


class PolicyArgumentError(InvalidArgumentError):
    """Unknown policy, unknown policy argument, or a policy argument out of range."""


class PromptTooLongError(InvalidArgumentError):
    """The prompt (plus generation budget) does not fit in the model's context."""
