"""adaspec: lossless speculative decoding with context-aware adaptive drafting."""

from .errors import (
    AdaspecError,
    InvalidArgumentError,
    ModelLoadError,
    PolicyArgumentError,
    PromptTooLongError,
    VocabMismatchError,
)

__version__ = "0.1.0"

__all__ = [
    "AdaspecError",
    "InvalidArgumentError",
    "ModelLoadError",
    "PolicyArgumentError",
    "PromptTooLongError",
    "VocabMismatchError",
    "__version__",
]


def __getattr__(name: str):
    """Lazy top-level access to the API (keeps ``import adaspec`` cheap)."""
    if name in ("SpeculativeGenerator", "GenerationResult"):
        from . import api

        return getattr(api, name)
    if name == "load_model":
        from .checkpoints.loader import load_model

        return load_model
    raise AttributeError(name)
