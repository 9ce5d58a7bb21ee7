"""Where adaspec keeps what it builds once per machine (a leaf module: the kernels read it
while the runtime package is still importing them)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models and the compiled kernels live: ``$ADASPEC_CACHE`` or
    ``~/.cache/adaspec``."""
    return Path(os.environ.get("ADASPEC_CACHE") or Path.home() / ".cache" / "adaspec")
