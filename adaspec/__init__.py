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
