"""Integrations of adaspec's drafting into other serving engines (optional extras).

- :mod:`adaspec.integrations.vllm`: adaspec proposers as a vLLM V1 ``custom_class``
  speculator (extra ``[vllm]``).
- :mod:`adaspec.integrations.adaptive`: the engine-free parts they share (request tracking
  from a batch's token table, online per-request draft length from accepted counts and
  measured step costs); importable and testable without any serving engine.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import AdaspecError


class MissingExtraError(AdaspecError, ImportError):
    """An optional dependency of an integration is not installed (names the extra)."""


def require(module: str, extra: str, hint: str = "") -> ModuleType:
    """Import ``module`` or raise a one-line :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        tail = f" ({hint})" if hint else ""
        raise MissingExtraError(
            f"{module} is not installed: pip install 'adaspec[{extra}]'{tail}") from None


__all__ = ["MissingExtraError", "require"]
