"""Command-line options shared by several subcommands (one definition each)."""

from __future__ import annotations

import argparse


def add_runtime_arg(p: argparse.ArgumentParser) -> None:
    """``--runtime auto|eager|compiled`` (shared by generate, bench and collect)."""
    p.add_argument("--runtime", default="auto", choices=["auto", "eager", "compiled"],
                   help="how model forwards run: compiled = lean CPU forward with packed fp32 weights "
                        "and a static KV cache (Llama family; compiled once per machine and cached); "
                        "eager = Hugging Face modules; auto (default) = compiled where supported")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--target --draft --dtype --device --threads --runtime``: the model options of every
    subcommand that runs models (generate, serve, bench, collect)."""
    p.add_argument("--target", default="default",
                   help="target model: 'default' (SmolLM2-135M-Instruct), a local directory or an HF id")
    p.add_argument("--draft", default="default",
                   help="draft: 'default' (the shipped adaspec draft), 'none' (plain decoding of the "
                        "target), a local directory or an HF id; 'ngram' (model-free: copy the "
                        "continuation of the longest earlier match of the text); 'model+ngram' (or "
                        "ID+ngram: per round, the n-gram source or the model); 'head:DIR' (a feature "
                        "head trained by `adaspec train-head`: drafts from the target's own hidden "
                        "states; 'head:default' = the one shipped for the default target)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="weights and activations dtype; auto (default) = bf16 on a GPU, fp32 on a CPU "
                        "(the compiled runtime computes in fp32); with --runtime eager, bf16 on a CPU "
                        "with native bf16 (AVX-512 BF16 / AMX)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_runtime_arg(p)
