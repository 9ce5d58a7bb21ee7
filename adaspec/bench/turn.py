"""What every benchmark method returns, and how a method that cannot run says so.

Kept apart from :mod:`adaspec.bench.methods` so that method runners living in other
modules (:mod:`adaspec.bench.llamacpp`) import it without importing ``methods``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AdaspecError
from ..types import GenerationStats


@dataclass
class TurnResult:
    """One generate call: new ids (EOS included) and its statistics (GenerationStats)."""

    token_ids: list[int]
    stats: GenerationStats


class MethodFailedError(AdaspecError):
    """A method that cannot run on this machine (e.g. its peer engine crashed).

    The benchmark records the one-line reason for the method and goes on with the others
    (never a lost run); the message is that reason.
    """


__all__ = ["MethodFailedError", "TurnResult"]
