"""Benchmark: datasets with fixed splits, methods (ar, hf, policies), runner, reports, plots.

``adaspec bench`` (see :mod:`adaspec.bench.cli`); Python: :func:`run_benchmark`.
"""

from __future__ import annotations

from .datasets import DATASETS, SPLITS, DatasetError, Prompt, load_dataset
from .methods import MethodError, MethodSpec, parse_methods
from .runner import BenchConfig, ResumeMismatchError, run_benchmark

__all__ = ["DATASETS", "SPLITS", "BenchConfig", "DatasetError", "MethodError", "MethodSpec", "Prompt",
           "ResumeMismatchError", "load_dataset", "parse_methods", "run_benchmark"]
