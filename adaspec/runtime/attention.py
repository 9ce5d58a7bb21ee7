"""Cheap last-layer attention concentration for the draft's newest query.

``output_attentions=True`` forces transformers' eager attention on every layer and
materialises every layer's weights. Instead, a forward pre-hook on the last decoder
layer's attention module keeps its input hidden states and rotary (cos, sin); after the
forward, the probe recomputes only the newest query of that layer against the keys
already in the KV cache:

    q = RoPE(q_proj(h_T))                    [H, hd]
    w = softmax(q K^T * scaling)             [H, S]   (K: cached keys, GQA-expanded)
    concentration = mean_h max_s w[h, s]     scalar in [0, 1]

Supported: Llama-style modules (``self_attn.q_proj``, rotary ``position_embeddings``,
optional ``q_norm``; Llama, Mistral, Qwen2/3, SmolLM). Other families raise
:class:`NotImplementedError` at construction, so callers fall back explicitly.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class AttentionProbe:
    """Attach to a causal LM; after each forward, :meth:`concentration` reads the cache."""

    def __init__(self, model: nn.Module) -> None:
        layers = getattr(getattr(model, "model", None), "layers", None)
        attn = getattr(layers[-1], "self_attn", None) if layers is not None and len(layers) else None
        if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "scaling"):
            raise NotImplementedError(f"no Llama-style attention in {type(model).__name__}")
        self.attn = attn
        self.layer_index = len(layers) - 1
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // self.heads))
        self._h: torch.Tensor | None = None
        self._pos: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        self._h = h.detach()  # [1, T, d]: every query of the last forward
        pe = kwargs.get("position_embeddings")
        self._pos = (pe[0].detach(), pe[1].detach()) if pe is not None else None  # [1, T, hd] each

    def remove(self) -> None:
        self._handle.remove()

    @torch.inference_mode()
    def concentration(self, cache) -> float:
        """mean over heads of the max attention weight of the last forward's newest query."""
        return float(self.concentrations(cache, 1)[0])

    @torch.inference_mode()
    def concentrations(self, cache, n: int) -> torch.Tensor:
        """[n] concentrations of the last forward's newest ``n`` queries (causal: query j of
        the last forward sees the cached keys up to its own position)."""
        if self._h is None or self._pos is None:
            raise RuntimeError("AttentionProbe: no forward captured")
        a = self.attn
        h = self._h[:, -n:]  # [1, n, d]
        q = a.q_proj(h).view(1, n, -1, self.head_dim).transpose(1, 2)  # [1, H, n, hd]
        if getattr(a, "q_norm", None) is not None:
            q = a.q_norm(q)
        cos, sin = (t[:, -n:].unsqueeze(1) for t in self._pos)  # [1, 1, n, hd]
        q = q * cos + _rotate_half(q) * sin
        k = cache.layers[self.layer_index].keys  # [1, KVH, S, hd] (RoPE applied)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [1, H, S, hd]
        s = k.shape[2]
        z = (q.float() @ k.float().transpose(-1, -2)) * a.scaling  # [1, H, n, S]
        future = torch.arange(s, device=z.device)[None, :] > torch.arange(s - n, s, device=z.device)[:, None]
        w = torch.softmax(z.masked_fill(future, float("-inf")), dim=-1)  # [1, H, n, S]
        return w.amax(dim=-1).mean(dim=1)[0]  # [n]
