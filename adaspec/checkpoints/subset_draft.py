"""Draft LMs with a reduced output vocabulary (FR-Spec style), stored as plain HF checkpoints.

A draft directory is an ordinary Hugging Face causal-LM directory (``config.json`` +
``model.safetensors``) whose config carries an extra ``adaspec_draft`` dict::

    {"draft_vocab_size": Vs, "target_vocab_sha256": "...", "target": "SmolLM2-135M-Instruct"}

The input embedding covers the full target vocabulary V (any context token can be
read), while the output head only scores Vs frequent tokens. :class:`SubsetLMHead`
scatters those scores into a full ``[..., V]`` logits tensor filled with ``-inf``, so
every consumer (the engine, ``transformers.generate(assistant_model=...)``) sees a
normal full-vocabulary model whose distribution q puts zero mass outside the subset.
That keeps verification exact: a token the draft cannot propose simply has q = 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

DRAFT_KEY = "adaspec_draft"


class SubsetLMHead(nn.Module):
    """Output layer over a subset of the vocabulary, scattered into full-size logits.

    Args:
        hidden_size: d, width of the hidden states it reads.
        token_ids: [Vs] int64 target-vocabulary ids the head scores.
        full_vocab_size: V, size of the logits it returns.
    """

    def __init__(self, hidden_size: int, token_ids: torch.Tensor, full_vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(token_ids), hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())
        self.full_vocab_size = full_vocab_size

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden -> [..., Vs] logits over ``token_ids`` (for training and features)."""
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] hidden -> [..., V] logits; -inf outside ``token_ids``."""
        small = self.subset_logits(hidden)
        out = small.new_full((*small.shape[:-1], self.full_vocab_size), float("-inf"))
        return out.index_copy_(-1, self.token_ids, small)


def is_subset_draft_dir(path: Path) -> bool:
    """True when ``path/config.json`` declares an adaspec reduced-vocabulary draft."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return DRAFT_KEY in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def build_subset_draft(config, token_ids: torch.Tensor) -> nn.Module:
    """Instantiate an HF causal LM from ``config`` and swap its head for a :class:`SubsetLMHead`.

    ``config.vocab_size`` is the full target vocabulary V (input embedding size).
    """
    from transformers import AutoModelForCausalLM

    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config)
    model.lm_head = SubsetLMHead(config.hidden_size, token_ids, config.vocab_size)
    return model


def load_subset_draft(path: Path, dtype: torch.dtype) -> nn.Module:
    """Load a reduced-vocabulary draft written by :func:`save_subset_draft`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    model = build_subset_draft(config, state["lm_head.token_ids"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.token_ids"]
    if missing or unexpected:
        raise ValueError(f"draft checkpoint mismatch: missing={missing} unexpected={unexpected}")
    return model.to(dtype).eval()


def save_subset_draft(model: nn.Module, path: Path, meta: dict) -> None:
    """Write ``model`` (built by :func:`build_subset_draft`) as config.json + model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    model.config.tie_word_embeddings = False
    setattr(model.config, DRAFT_KEY, meta)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # temporary names, then renames: an interruption never leaves a half-written file
    save_file(state, str(path / "model.safetensors.tmp"), metadata={"format": "pt"})
    (path / "config.json.tmp").write_text(model.config.to_json_string(use_diff=True))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    os.replace(path / "config.json.tmp", path / "config.json")
