"""Where the compiled policy kernels come from (:mod:`adaspec.runtime.policy_kernels`).

They are used only once the compiled runtime has set numba up (its kernels module is
loaded): a policy never imports numba itself, and with the eager runtime, or without
numba, every feature keeps its torch / numpy path. ``ADASPEC_POLICY_KERNELS=0`` turns
them off (for comparisons).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

_KERNELS = "adaspec.runtime.kernels"
_loaded: ModuleType | None = None


def kernels() -> ModuleType | None:
    """:mod:`adaspec.runtime.policy_kernels` when numba is already set up, else None."""
    global _loaded
    if os.environ.get("ADASPEC_POLICY_KERNELS", "1") == "0":
        return None
    if _loaded is not None:
        return _loaded
    if _KERNELS not in sys.modules:
        return None
    from ..runtime import policy_kernels

    _loaded = policy_kernels
    return _loaded
