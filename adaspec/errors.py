"""Typed exceptions. Every user mistake raises an :class:`AdaspecError` subclass.

The CLI turns these into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


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


def ensure_writable_dir(path: Path, what: str = "--out") -> None:
    """Create directory ``path`` if needed and check that files can be written in it.

    Raises:
        InvalidArgumentError: one line naming ``what`` and the reason (a file in the way,
            no permission, read-only file system...).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".adaspec-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InvalidArgumentError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc}") from None
