"""Command-line options shared by several subcommands (one definition each)."""

from __future__ import annotations

import argparse

from ..runtime import RUNTIMES
from ..runtime.plan import DTYPE_CHOICES

_ARGS: dict[str, dict] = {
    "target": {"default": "default"},
    "draft": {"default": "default"},
    "dtype": {"default": "auto", "choices": list(DTYPE_CHOICES)},
    "device": {"default": "cpu"},
    "threads": {"type": int, "default": None},
    "runtime": {"default": "auto", "choices": list(RUNTIMES)},
}
MODEL_OPTIONS = tuple(_ARGS)

_HELP = {
    "target": "target model: 'default' (SmolLM2-135M-Instruct), a local directory or an HF id",
    "draft": "draft: 'default' (the shipped adaspec draft), 'none' (plain decoding of the "
             "target), a local directory or an HF id; 'ngram' (model-free: copy the "
             "continuation of the longest earlier match of the text); 'model+ngram' (or "
             "ID+ngram: per round, the n-gram source or the model); 'head:DIR' (a feature "
             "head trained by `adaspec train-head`: drafts from the target's own hidden "
             "states; 'head:default' = the one shipped for the default target)",
    "dtype": "weights and activations dtype; auto (default) = bf16 on a GPU, fp32 on a CPU "
             "(the compiled runtime computes in fp32); with --runtime eager, bf16 on a CPU "
             "with native bf16 (AVX-512 BF16 / AMX)",
    "device": "torch device (default cpu)",
    "threads": "torch CPU threads (default: torch's)",
    "runtime": "how model forwards run: compiled = lean CPU forward over the checkpoint's own "
               "encoding (GGUF Q4_0/Q4_1/Q8_0/F16/BF16/F32, fp32/fp16/bf16 safetensors) decoded in "
               "registers, fp32 arithmetic, static KV cache (Llama family; compiled once per machine "
               "and cached); compiled-fp32 = the same over weights widened to fp32 (same numbers, "
               "more memory); eager = Hugging Face modules; auto (default) = compiled where "
               "supported, compiled-fp32 when an encoding is not, else eager",
}


def add_model_args(p: argparse.ArgumentParser, options: tuple[str, ...] = MODEL_OPTIONS,
                   **help_text: str) -> None:
    """The model options of every subcommand that runs models, one definition each:
    ``--target --draft --dtype --device --threads --runtime``.

    generate, serve, bench and collect take all of them; the training commands and the
    measuring tools the subset they use (``options``). ``help_text`` replaces an option's
    help where a command reads it differently (e.g. ``draft="the draft to start from"``);
    a command with another default calls ``p.set_defaults(...)`` after this.
    """
    unknown = (set(options) - set(MODEL_OPTIONS)) | (set(help_text) - set(options))
    if unknown:
        raise ValueError(f"add_model_args: unknown or unused options {sorted(unknown)}")
    helps = _HELP | help_text
    for name, kwargs in _ARGS.items():
        if name in options:
            p.add_argument(f"--{name}", help=helps[name], **kwargs)


def add_suffix_cache_args(p: argparse.ArgumentParser, persist: bool = False) -> None:
    """``--suffix-cache-tokens N`` / ``--no-suffix-cache`` (and with ``persist``
    ``--suffix-cache-file PATH``): the n-gram source's cross-request cache of finished texts
    (read back with :func:`suffix_cache_arg` / :func:`persisted_suffix_cache`)."""
    from ..drafters.suffix import DEFAULT_TOKENS

    p.add_argument("--suffix-cache-tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help="with an n-gram draft source: draft also from the last N tokens of "
                        "finished outputs of this process (oldest evicted first; memory "
                        f"~4 + 96 bytes a token; default {DEFAULT_TOKENS})")
    p.add_argument("--no-suffix-cache", action="store_true",
                   help="n-gram drafts from each request's own text only")
    if persist:
        p.add_argument("--suffix-cache-file", metavar="PATH", default=None,
                       help="start the suffix cache from PATH if it exists and write it back "
                            "there at exit (a damaged file is a one-line error)")


def persisted_suffix_cache(args: argparse.Namespace):
    """The ``suffix_cache`` generator argument, read from ``--suffix-cache-file`` when one is
    given (a :class:`~adaspec.drafters.suffix.SuffixCache`, saved back at exit), else
    :func:`suffix_cache_arg`.

    Raises:
        InvalidArgumentError: as :func:`suffix_cache_arg`.
        CacheFileError: the file exists but is not a valid cache file.
    """
    import atexit
    from pathlib import Path

    from ..drafters.suffix import SuffixCache

    n, path = suffix_cache_arg(args), getattr(args, "suffix_cache_file", None)
    if not path or not n:
        return n
    cache = SuffixCache(n)
    if Path(path).is_file():
        cache.load(path)
    atexit.register(cache.save, path)
    return cache


def suffix_cache_arg(args: argparse.Namespace) -> int:
    """The ``suffix_cache`` generator argument from the flags: a token count, 0 = off.

    Raises:
        InvalidArgumentError: a count below 64 that is not 0.
    """
    from ..errors import InvalidArgumentError

    n = 0 if getattr(args, "no_suffix_cache", False) else getattr(args, "suffix_cache_tokens", 0)
    if n < 0 or 0 < n < 64:
        raise InvalidArgumentError(f"--suffix-cache-tokens must be 0 or >= 64, got {n}")
    return n
