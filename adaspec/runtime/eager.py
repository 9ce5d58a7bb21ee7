"""One model plus its KV cache, and the token ids that cache currently holds.

Rollback is implicit and exact: before each forward the cache is cropped to the longest
common prefix of what it holds and the sequence asked for, then only the rest is fed.
After a rejected draft this crops the rejected tokens away; after a fully accepted
draft it feeds the last draft token together with the bonus token, so the drafter's
cache is completed without a separate forward (docs/design.md §1 step 5). A crop never
recomputes anything.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` for an HF forward: the argument ``cache`` where ``model.forward``
    declares it (transformers >= 5.2x, which deprecates ``past_key_values``), else
    ``past_key_values`` (older releases and models that only take that): the one switch
    between the two names, checked on the model's own signature (a model that swallows
    unknown keywords must not silently lose its cache)."""
    cls = type(model)
    name = _CACHE_ARG.get(cls)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = _CACHE_ARG[cls] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


_CACHE_ARG: dict[type, str] = {}  # model class -> the name its forward takes the KV cache by


def cache_length(cache) -> int:
    """Number of positions held by an HF cache (0 for None)."""
    return 0 if cache is None else int(cache.get_seq_length())


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of an HF cache, in place."""
    cur = cache_length(cache)
    if length < cur:
        # transformers >= 5 takes a negative count of positions to remove.
        cache.crop(length - cur)


def select_cache(cache, keep: torch.Tensor) -> None:
    """Keep only positions ``keep`` ([n] int64, ascending) of every layer, in place.

    Used after a tree verification to keep the accepted path.
    """
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            idx = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)


def tree_rows(start: int, n_lin: int, parents: list[int]) -> tuple[np.ndarray, list[int]]:
    """The fed rows of a causal tail plus a token tree (every runtime's ``forward_tree``).

    Args:
        start: cache slots before the fed rows (their positions start there).
        n_lin: tail tokens fed causally; the last one is the tree's root.
        parents: T nodes; node j's parent is ``parents[j]`` (-1 = the root, else an
            earlier node index).

    Returns:
        mask: [n_lin + T, n_lin + T] uint8 visibility among the fed rows (every row sees
            the cached slots too); positions: n_lin + T ints, a node at its root's position
            plus its depth.
    """
    size = n_lin + len(parents)
    mask = np.zeros((size, size), np.uint8)
    mask[:n_lin, :n_lin] = np.tril(np.ones((n_lin, n_lin), np.uint8))
    mask[n_lin:, :n_lin] = 1
    pos = list(range(start, start + n_lin))
    depth: list[int] = []
    for j, par in enumerate(parents):
        row = n_lin + j
        if par >= 0:
            mask[row] = mask[n_lin + par]
        depth.append(depth[par] + 1 if par >= 0 else 1)
        mask[row, row] = 1
        pos.append(start + n_lin - 1 + depth[-1])
    return mask, pos


@dataclass
class ForwardOut:
    """Outputs for the last n positions of a forward.

    logits: [n, V] float32; hidden: [n, d] last-layer hidden states or None;
    attentions: [heads, n, S] last-layer attention weights or None.
    """

    logits: torch.Tensor  # [n, V] float32
    hidden: torch.Tensor | None  # [n, d] or None
    attentions: torch.Tensor | None = None  # [heads, n, S] or None


class RunnerBase:
    """What every runtime's runner shares: the model, the ids its cache holds, the count of
    forwards, and the prefix sync that makes rollback implicit (a crop, never a recompute).

    Subclasses implement ``_crop`` and the forwards (see :class:`ModelRunner`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokens: list[int] = []  # ids whose keys / values are in the cache
        self.forwards = 0

    def _crop(self, length: int) -> None:
        raise NotImplementedError

    def _sync_prefix(self, seq: list[int], keep_out: int, synced: int = 0) -> int:
        """Crop the cache to the common prefix of self.tokens and seq, leaving at least
        ``keep_out`` tokens of seq to feed. Returns the cropped length.

        ``synced``: the caller knows ``seq[:synced]`` is what the cache holds (it fed them
        itself, e.g. a drafter's previous step), so only the rest is compared: O(1) per draft
        step instead of O(len(seq))."""
        limit = min(len(self.tokens), len(seq) - keep_out)
        n = min(synced, limit)
        if self.tokens[n:limit] == seq[n:limit]:  # the usual case, compared in C
            n = limit
        else:
            while n < limit and self.tokens[n] == seq[n]:
                n += 1
        if n < len(self.tokens):
            self._crop(n)
            del self.tokens[n:]
        return n

    def prefill(self, seq: list[int], hidden: bool = False) -> torch.Tensor | None:
        """Put ``seq`` into the cache without computing logits (no-op when it is there).

        ``hidden``: also return the last hidden states [n, d] of the n fed (not already
        cached) positions len(seq)-n .. len(seq)-1 (None when nothing was fed).
        """
        start = self._sync_prefix(seq, 0)
        if start == len(seq):
            return None
        out = self._prefill(seq[start:], start, hidden)
        self.tokens.extend(seq[start:])
        return out

    def _prefill(self, feed: list[int], start: int, hidden: bool) -> torch.Tensor | None:
        """Feed ``feed`` at positions start.. (the runtime's part of :meth:`prefill`)."""
        raise NotImplementedError

    def rollback(self, committed: list[int]) -> None:
        """Crop the cache to its longest common prefix with ``committed`` (docs/design.md §1 step 5)."""
        self._sync_prefix(committed, 0)


class ModelRunner(RunnerBase):
    """The eager runtime: feeds token sequences to an HF causal LM, reusing its KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.cache = None
        self._probe = None  # AttentionProbe, created on the first forward that asks for attention
        self._conc = 0.0
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def reset(self) -> None:
        """Forget the cache (start of a generate call)."""
        from transformers import DynamicCache

        self.tokens = []
        self.cache = DynamicCache(config=getattr(self.model, "config", None))
        self.forwards = 0

    def _crop(self, length: int) -> None:
        crop_cache(self.cache, length)

    def _attention_probe(self):
        """The cheap last-layer attention probe, or False when the model family lacks one
        (then the concentration comes from ``output_attentions``, which needs eager attention)."""
        if self._probe is None:
            from .attention import AttentionProbe

            try:
                self._probe = AttentionProbe(self.model)
            except NotImplementedError:
                self._probe = False
        return self._probe

    def attention_concentration(self) -> float:
        """mean over heads of the max last-layer attention weight of the newest query of the
        last forward that asked for ``concentration``."""
        return self._conc

    @torch.inference_mode()
    def forward(
        self,
        seq: list[int],
        n_out: int,
        *,
        hidden: bool = False,
        attentions: bool = False,
        concentration: bool = False,
        synced: int = 0,
    ) -> ForwardOut:
        """Bring the cache to ``seq`` and return outputs for its last ``n_out`` positions.

        Args:
            seq: the full token sequence (prompt + committed + any proposed tokens).
            n_out: >= 1, positions whose outputs are needed (they are always re-fed
                if cached, so at least n_out tokens are fed).
            attentions: return the last layer's attention weights (eager attention).
            concentration: make :meth:`attention_concentration` report this forward's newest
                query (through the cheap probe when the family has one).
            synced: ``seq[:synced]`` is known to be in the cache (see :meth:`_sync_prefix`).
        """
        start = self._sync_prefix(seq, n_out, synced)
        feed = torch.tensor([seq[start:]], dtype=torch.long, device=self.device)  # [1, T]
        kwargs = {**cache_kwargs(self.model, self.cache), "use_cache": True}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = n_out
        if hidden:
            kwargs["output_hidden_states"] = True
        probe = self._attention_probe() if concentration and not attentions else None
        weights = attentions or (concentration and not probe)
        if weights:
            kwargs["output_attentions"] = True
        out = self.model(feed, **kwargs)
        self.forwards += 1
        self.tokens.extend(seq[start:])
        logits = out.logits[0, -n_out:].float()
        hid = out.hidden_states[-1][0, -n_out:] if hidden else None
        att = out.attentions[-1][0, :, -n_out:] if weights else None
        if probe:
            self._conc = probe.concentration(self.cache)
        elif concentration:
            self._conc = float(att[:, -1].max(dim=-1).values.mean())
        return ForwardOut(logits, hid, att if attentions else None)

    @torch.inference_mode()
    def forward_tree(self, committed: list[int], nodes: list[int], parents: list[int], *,
                     hidden: bool = False) -> ForwardOut:
        """One forward over the committed tail plus a token tree, with a tree attention mask.

        Args:
            committed: committed ids; its last token is the tree's root.
            nodes: T tree tokens; node j's parent is ``parents[j]`` (-1 = the root,
                else an earlier node index).

        Returns outputs for [root, node 0..T-1] (1 + T rows). The cache then holds the
        whole tree; call :meth:`keep_path` to keep only the accepted branch.
        """
        start = self._sync_prefix(committed, 1)
        linear = committed[start:]  # fed causally, ends with the root
        n_lin, n_tree = len(linear), len(nodes)
        rows, pos = tree_rows(start, n_lin, parents)
        mask = torch.ones(n_lin + n_tree, start + n_lin + n_tree, dtype=torch.bool)  # cached slots: seen
        mask[:, start:] = torch.from_numpy(rows).bool()
        feed = torch.tensor([linear + nodes], dtype=torch.long, device=self.device)
        kwargs = {**cache_kwargs(self.model, self.cache), "use_cache": True,
                  "attention_mask": mask[None, None].to(self.device),
                  "position_ids": torch.tensor([pos], device=self.device)}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = n_tree + 1
        if hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(feed, **kwargs)
        self.forwards += 1
        self.tokens.extend(linear + nodes)  # provisional: not a linear sequence until keep_path
        logits = out.logits[0, -(n_tree + 1):].float()
        hid = out.hidden_states[-1][0, -(n_tree + 1):] if hidden else None
        return ForwardOut(logits, hid)

    def keep_path(self, committed_len: int, nodes: list[int], path: list[int]) -> None:
        """After :meth:`forward_tree`: keep the cached prefix (committed ids) plus the tree
        nodes in ``path`` (node indices, root to leaf), dropping every other branch."""
        base = committed_len  # cache positions 0..committed_len-1 hold the committed ids
        keep = list(range(base)) + [base + j for j in path]
        select_cache(self.cache, torch.tensor(keep, dtype=torch.long))
        self.tokens = self.tokens[:base] + [nodes[j] for j in path]

    @torch.inference_mode()
    def _prefill(self, feed: list[int], start: int, hidden: bool) -> torch.Tensor | None:
        kwargs = {**cache_kwargs(self.model, self.cache), "use_cache": True}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        if hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(torch.tensor([feed], dtype=torch.long, device=self.device), **kwargs)
        return out.hidden_states[-1][0].float() if hidden else None
