"""Compatibility alias: the prompt sets and the split rule live in :mod:`adaspec.data`."""

from ..data import *  # noqa: F403
from ..data import __all__, read_jsonl_objects  # noqa: F401
