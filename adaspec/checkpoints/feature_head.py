"""A feature head: an EAGLE-style drafter that reads the target's own hidden states.

For the token x_p at position p the head reads the target's last hidden state f_{p-1}
(after its final norm: the state that predicted x_p) and x_p's embedding, and predicts
f_p through one Llama decoder layer and a final norm::

    h_p = fc([e(x_p), f_{p-1}])          # [2d] -> [d]
    f^_p = norm(layer(h_<=p))[p]          # the head's estimate of f_p
    q(x_{p+1}) = softmax(W_sub f^_p)      # the target's own LM-head rows, a vocabulary subset

Drafting runs autoregressively on the head's own estimates: f^_p stands in for f_p when
the next draft token is fed. The embedding e and the output rows W_sub are the target's
(frozen, never stored with the head), so a head only fits the target it was trained for;
its directory records the target's vocabulary fingerprint and hidden size.

Directory layout: ``config.json`` (an HF Llama config of the 1-layer body plus an
``adaspec_head`` dict) and ``model.safetensors`` (``fc.weight``, ``body.*``, ``token_ids``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError

HEAD_KEY = "adaspec_head"


def body_config(target_config: Any, intermediate: int | None = None) -> Any:
    """A 1-layer Llama config of the target's width, heads and RoPE (vocabulary unused: 16)."""
    from transformers import LlamaConfig

    tc = target_config.to_dict()
    keep = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings", "hidden_act")
    cfg = {k: tc[k] for k in keep if k in tc and tc[k] is not None}
    cfg.update(num_hidden_layers=1, vocab_size=16, tie_word_embeddings=False,
               intermediate_size=int(intermediate or tc["intermediate_size"]),
               attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaConfig(**cfg)


class FeatureHead(nn.Module):
    """fc + a 1-layer Llama body (its own final norm). Output rows are the target's.

    Args:
        config: the body's Llama config (:func:`body_config`).
        token_ids: [Vs] int64 target ids the head scores (a frequent-token subset).
        meta: the ``adaspec_head`` dict (target fingerprint, training record).
    """

    def __init__(self, config: Any, token_ids: torch.Tensor, meta: dict | None = None) -> None:
        super().__init__()
        from transformers import LlamaModel

        d = int(config.hidden_size)
        self.config = config
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.body = LlamaModel(config)
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())
        self.meta = dict(meta or {})

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def forward(self, emb: torch.Tensor, feats_prev: torch.Tensor, position_ids: torch.Tensor,
                cache: Any = None) -> torch.Tensor:
        """emb, feats_prev: [B, T, d]; position_ids: [B, T] -> predicted features [B, T, d].

        Causal over the T rows (and over ``cache``, an HF cache, when given).
        """
        from ..runtime.eager import cache_kwargs

        h = self.fc(torch.cat([emb, feats_prev], dim=-1))
        out = self.body(inputs_embeds=h, position_ids=position_ids, **cache_kwargs(self.body, cache),
                        use_cache=cache is not None)
        return out.last_hidden_state


def save_head(head: FeatureHead, path: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (atomic per file)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = head.config.to_dict()
    cfg[HEAD_KEY] = head.meta
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in head.state_dict().items()}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.rename(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


DEFAULT_HEAD_DIR = Path(__file__).parents[1] / "assets" / "default-head"


def head_dir(spec: Any) -> Path | None:
    """The head directory a draft spec names, or None when it is not a head.

    ``head:DIR`` (``head:default`` = the head shipped for the default target) or a
    directory holding a head.

    Raises:
        ModelLoadError: ``head:DIR`` whose directory holds no head.
    """
    if not isinstance(spec, str):
        return None
    if spec.startswith("head:"):
        rest = spec[5:].strip()
        path = DEFAULT_HEAD_DIR if rest == "default" else Path(rest).expanduser()
        if not is_head_dir(path):
            raise ModelLoadError(f"draft {spec!r}: {path} holds no adaspec feature head (config.json "
                                 f"with {HEAD_KEY}); train one with `adaspec train-head`")
        return path
    path = Path(spec).expanduser()
    return path if is_head_dir(path) else None


def is_head_dir(path: Path) -> bool:
    """True when ``path/config.json`` declares an adaspec feature head."""
    cfg = path / "config.json"
    try:
        return cfg.is_file() and HEAD_KEY in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_head(path: Path, *, target_hidden: int | None = None, target_vocab_sha: str | None = None,
              ) -> FeatureHead:
    """Load a head written by :func:`save_head`, refusing one trained for another target.

    Raises:
        ModelLoadError: not a head directory, unreadable, or another target's head.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    if not is_head_dir(path):
        raise ModelLoadError(f"{path} is not an adaspec feature head (no {HEAD_KEY} in config.json)")
    raw = json.loads((path / "config.json").read_text())
    meta = raw.pop(HEAD_KEY)
    if target_hidden is not None and int(raw["hidden_size"]) != target_hidden:
        raise ModelLoadError(f"feature head {path} reads hidden size {raw['hidden_size']} but the "
                             f"target's is {target_hidden}: it was trained for another target")
    want = meta.get("target_vocab_sha256")
    if target_vocab_sha is not None and want and want != target_vocab_sha:
        raise ModelLoadError(f"feature head {path} was trained for {meta.get('target', 'another target')} "
                             "(its vocabulary fingerprint differs from this target's)")
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot load feature head {path}: {exc}") from None
    head = FeatureHead(LlamaConfig(**raw), tensors["token_ids"], meta)
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"feature head {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return head.eval()
