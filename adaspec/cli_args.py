"""Command-line options shared by several subcommands."""

from __future__ import annotations

import argparse


def add_runtime_arg(p: argparse.ArgumentParser) -> None:
    """``--runtime auto|eager|compiled`` (shared by generate, bench and collect)."""
    p.add_argument("--runtime", default="auto", choices=["auto", "eager", "compiled"],
                   help="how model forwards run: compiled = lean CPU forward with packed fp32 weights "
                        "and a static KV cache (Llama family; compiled once per machine and cached); "
                        "eager = Hugging Face modules; auto (default) = compiled where supported")
