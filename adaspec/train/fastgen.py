"""Batched greedy generation for training data: a preallocated KV cache and grouped-query attention.

Training data need not be exact (only verification must be), so the corpus can come from the
target in bf16 in large batches. Hugging Face's ``DynamicCache`` grows every layer's cache with a
``torch.cat`` per step and its eager attention repeats the key/value heads for grouped-query
attention, so a 128-row batch at 400 context tokens moves gigabytes per step and spends most of
its time there. This loop runs the same modules (projections, norms, MLP, rotary embedding) over
a cache written in place and calls ``scaled_dot_product_attention`` with ``enable_gqa``.

Llama-family decoders only (``model.model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp``,
``input_layernorm``, ``post_attention_layernorm``, ``model.model.norm``, ``model.lm_head``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[B, heads, T, hd]`` with ``cos``/``sin`` ``[B, 1, T, hd]``."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class StaticBatch:
    """KV cache for ``B`` rows of at most ``capacity`` positions, written in place.

    Attributes:
        k, v: ``[layers, B, kv_heads, capacity, head_dim]``.
        valid: ``[B, capacity]`` bool, True where a slot holds a real (non-padding) token.
    """

    def __init__(self, model: Any, batch: int, capacity: int) -> None:
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kvh = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        dtype = next(model.parameters()).dtype
        shape = (cfg.num_hidden_layers, batch, self.kvh, capacity, self.hd)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.length = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` ``[b]`` (in that order)."""
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()
        self.valid = self.valid[rows]


def _forward(model: Any, cache: StaticBatch, ids: torch.Tensor, pos: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
    """Run ``ids`` ``[B, T]`` at positions ``pos`` ``[B, T]`` after the cached slots.

    ``valid`` ``[B, T]`` marks real tokens. Returns the final hidden state of the last position
    ``[B, d]``.
    """
    body = model.model
    b, t = ids.shape
    start, end = cache.length, cache.length + t
    cache.valid[:, start:end] = valid
    keys_ok = cache.valid[:, None, None, :end]  # [B, 1, 1, end]
    causal = torch.ones(t, end, dtype=torch.bool).tril(start)  # [T, end]
    mask = keys_ok & causal  # [B, 1, T, end]
    mask = mask | ~mask.any(-1, keepdim=True)  # a padding query attends somewhere (result unused)
    x = body.embed_tokens(ids)
    cos, sin = body.rotary_emb(x, pos)
    cos, sin = cos[:, None], sin[:, None]
    for i, layer in enumerate(body.layers):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q = att.q_proj(h).view(b, t, cache.heads, cache.hd).transpose(1, 2)
        k = att.k_proj(h).view(b, t, cache.kvh, cache.hd).transpose(1, 2)
        v = att.v_proj(h).view(b, t, cache.kvh, cache.hd).transpose(1, 2)
        cache.k[i, :, :, start:end] = _rotate(k, cos, sin)
        cache.v[i, :, :, start:end] = v
        o = F.scaled_dot_product_attention(_rotate(q, cos, sin), cache.k[i, :, :, :end],
                                           cache.v[i, :, :, :end], attn_mask=mask,
                                           enable_gqa=cache.kvh != cache.heads)
        x = x + att.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.length = end
    return body.norm(x[:, -1])


@torch.no_grad()
def greedy_static(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, eos: int | Collection[int] | None) -> list[list[int]]:
    """Greedy continuations of a left-padded batch (same contract as ``draft_data.greedy_batch``).

    Args:
        input_ids: ``[B, P]`` left-padded prompt ids.
        attention_mask: ``[B, P]``, 1 on real tokens.
        eos: end-of-sequence id(s); a row stops after producing one.
    Returns:
        ``B`` lists of new ids; a list ends with an EOS id if the model produced one.

    Rows that finished are dropped from the cache once they are a quarter of the batch.
    """
    bsz, plen = input_ids.shape
    cache = StaticBatch(model, bsz, plen + max_new_tokens)
    mask = attention_mask.bool()
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, P]
    head = model.get_output_embeddings()
    logits = head(_forward(model, cache, input_ids, pos, mask))
    eos_ids = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or ())), dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(bsz)]
    alive = torch.arange(bsz)  # original row of each batch row
    done = torch.zeros(bsz, dtype=torch.bool)
    last = pos[:, -1]
    for step in range(max_new_tokens):
        nxt = logits.float().argmax(-1)  # [b]
        for r, tok, d in zip(alive.tolist(), nxt.tolist(), done.tolist(), strict=True):
            if not d:
                out[r].append(tok)
        done = done | torch.isin(nxt, eos_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if 4 * int(done.sum()) >= len(alive):
            keep = (~done).nonzero().flatten()
            cache.keep(keep)
            alive, nxt, last, done = alive[keep], nxt[keep], last[keep], done[keep]
        last = last + 1
        logits = head(_forward(model, cache, nxt[:, None], last[:, None], ~done[:, None]))
    return out
