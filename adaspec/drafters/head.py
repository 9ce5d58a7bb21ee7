"""The feature-head drafter (EAGLE-style): drafts from the target's own hidden states.

Contract with the engine (``needs_target_hidden = True``): after prefill and after every
verification the engine calls :meth:`HeadDrafter.observe_target` with the target's last
hidden states f_p of the committed positions. The head keeps one KV cache row per
position p >= 1, computed from (x_p, f_{p-1}) with *true* features only; a round first
feeds the rows committed since the last round (one forward), then drafts
autoregressively on its own estimates f^ (one forward per token). Drafted rows are
dropped afterwards: once verified, their positions are fed again with the target's
features.

Two cores: the eager one (the head's HF body with a DynamicCache) and the compiled one
(the runtime's numba decoder kernel fed with rows instead of token ids).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..checkpoints.feature_head import FeatureHead
from ..sampling import argmax, fit_vocab, processed_probs, sample
from ..types import Draft, DraftRequest
from .base import DraftBuilder
from .model import ModelStep


class _EagerCore:
    """The head in PyTorch (any device / dtype the target uses)."""

    def __init__(self, head: FeatureHead, emb: torch.Tensor, w_sub: torch.Tensor) -> None:
        self.head, self.emb, self.w_sub = head, emb, w_sub
        self.cache = None

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.head.config)

    @torch.inference_mode()
    def step(self, tokens: list[int], feats: torch.Tensor, pos0: int,
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Rows for positions pos0.. (tokens [T], previous features [T, d]) ->
        (subset logits [Vs] and estimated feature [d] of the last row, concentration)."""
        e = self.emb[torch.tensor(tokens)].to(self.w_sub.dtype)[None]
        pos = torch.arange(pos0, pos0 + len(tokens))[None]
        f = self.head(e, feats.to(self.w_sub.dtype)[None], pos, cache=self.cache)[0, -1]
        return (f @ self.w_sub.T).float(), f.float(), 0.0

    def crop(self, rows: int) -> None:
        from ..runtime.eager import crop_cache

        crop_cache(self.cache, rows)


class _CompiledCore:
    """The head on the compiled runtime's kernels (fp32, weights packed once)."""

    def __init__(self, head: FeatureHead, target: nn.Module, w_sub: torch.Tensor,
                 native: bool = False) -> None:
        from ..checkpoints.subset_draft import SubsetLMHead
        from ..runtime.compiled import LeanWeights
        from ..runtime.compiled_runner import ensure_compiled
        from ..runtime.kernels import pack_weight
        from ..runtime.native import NativeWeights

        ensure_compiled()
        # the target's embedding (shared, no copy), from the weights its runtime uses
        nw = NativeWeights.of(target) if native else NativeWeights.existing(target)
        self.tl = nw if nw is not None else LeanWeights.of(target)
        lm = SubsetLMHead(head.hidden_size, head.token_ids, self.tl.vocab)
        lm.weight.data = w_sub.float().contiguous()
        self.lean = LeanWeights(_AsCausalLM(head, lm))
        self.fc = pack_weight(head.fc.weight.detach().float().numpy())
        self.kt, self.vc = self.lean.new_cache()

    def reset(self) -> None:
        pass  # rows past the current length are overwritten

    def step(self, tokens: list[int], feats: torch.Tensor, pos0: int,
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
        from ..runtime.kernels import embed, linear

        ids = np.asarray(tokens, np.int64)
        if hasattr(self.tl, "blob"):  # a native target
            e = self.tl.rows(4 * self.tl.layers + 1, ids)
        else:
            e = embed(ids, self.tl.emb, self.tl.emb_packed, self.tl.lm)  # [T, d]
        x = np.concatenate([e, feats.numpy().astype(np.float32, copy=False)], axis=1)
        h = np.empty((len(tokens), self.fc.shape[0] * 16), np.float32)
        linear(x, self.fc, h)
        start = pos0 - 1  # slot of position p is p - 1 (position 0 has no row)
        self.kt, self.vc = self.lean.fit_cache(self.kt, self.vc, start + len(tokens), start)
        logits, hid, conc = self.lean.run_rows(h, pos0, start, self.kt, self.vc)
        return torch.from_numpy(logits[0]), torch.from_numpy(hid[0]), float(conc[-1])

    def crop(self, rows: int) -> None:
        pass


class _AsCausalLM(nn.Module):
    """The head seen as an HF causal LM (what :class:`LeanWeights` packs)."""

    def __init__(self, head: FeatureHead, lm: nn.Module) -> None:
        super().__init__()
        self.config = head.config
        self.model = head.body
        self.lm_head = lm

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


class HeadDrafter:
    """Drafts with a :class:`FeatureHead` on the target's features.

    Args:
        head: the trained head (its target's width and vocabulary).
        target: the target HF model (its embedding and LM-head rows are read, not copied,
            except the head's vocabulary subset of the LM head).
        vocab_size: the target's logits size V.
        runtime: ``eager`` or ``compiled``.
    """

    needs_target_hidden = True

    def __init__(self, head: FeatureHead, target: nn.Module, vocab_size: int, runtime: str = "eager",
                 max_context: int = 8192) -> None:
        emb = target.get_input_embeddings().weight
        out = target.get_output_embeddings().weight
        compiled = runtime in ("compiled", "compiled-fp32")
        if compiled and (out.numel() == 0 or emb.numel() == 0):
            from ..runtime.compiled import LeanWeights
            from ..runtime.kernels import unpack_weight
            from ..runtime.native import NativeWeights

            nw = NativeWeights.of(target) if runtime == "compiled" else NativeWeights.existing(target)
            if nw is not None:
                w_sub = torch.from_numpy(nw.rows(4 * nw.layers, head.token_ids.numpy()))
            else:
                tl = LeanWeights.of(target)
                w_sub = torch.from_numpy(unpack_weight(tl.lm, tl.n_logits))[head.token_ids].clone()
        else:
            w_sub = out.detach()[head.token_ids].clone()
        self.head = head.to(w_sub.dtype)
        self.token_ids = head.token_ids
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.runtime = runtime
        self.core = (_CompiledCore(self.head, target, w_sub, runtime == "compiled") if compiled
                     else _EagerCore(self.head, emb, w_sub))
        self.feats = torch.zeros((0, head.hidden_size))
        self.known = 0  # features f_0 .. f_{known-1} are stored
        self._first: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self.cached = 0  # head rows for positions 1 .. cached are in the cache (true features)

    def reset(self) -> None:
        self.known = self.cached = 0
        self.core.reset()

    def prefill(self, context: list[int]) -> None:
        pass  # rows need the target's features, which arrive with observe_target

    def observe_target(self, pos0: int, hidden: torch.Tensor) -> None:
        """Store the target's features [n, d] of positions pos0 .. pos0+n-1."""
        end = pos0 + hidden.shape[0]
        if end > self.feats.shape[0]:
            grown = torch.zeros((max(end, 2 * self.feats.shape[0], 256), self.feats.shape[1]))
            grown[: self.known] = self.feats[: self.known]
            self.feats = grown
        self.feats[pos0:end] = hidden.detach().float().cpu()
        self.known = max(self.known, end) if pos0 <= self.known else self.known

    def rollback(self, committed: list[int]) -> None:
        self.known = min(self.known, len(committed))
        self.cached = min(self.cached, max(len(committed) - 1, 0))
        self.core.crop(self.cached)

    def propose(self, context: list[int], request: DraftRequest) -> Draft:
        n = len(context)
        if n < 2 or self.known < n - 1:  # the features of the committed text are not all known
            return Draft.empty()
        sampling, needs = request.sampling, request.needs
        build = DraftBuilder(request)
        # catch up: rows cached+1 .. n-1 from (x_p, f_{p-1}), then draft on estimates
        pend_tok = context[self.cached + 1: n]
        pend_feat = self.feats[self.cached: n - 1]
        pos0 = self.cached + 1
        forwards = 0
        for i in range(1, request.budget + 1):
            if pend_tok:
                sub, fhat, conc = self.core.step(pend_tok, pend_feat, pos0)
                forwards += 1
            else:  # the same context as the last round's first step (nothing committed since)
                sub, fhat, conc = self._first
            if i == 1:
                self.cached = n - 1
                self._first = (sub, fhat, conc)
            probs, j = None, None
            if sampling.greedy:  # argmax over the subset; full logits / q only if a policy reads them
                j = argmax(sub)
                token = int(self.token_ids[j])
            else:
                probs = processed_probs(fit_vocab(sub, self.vocab_size, self.token_ids), sampling)
                token = sample(probs, request.generator)
            step = ModelStep(i, token, sub, self.token_ids, self.vocab_size, sampling,
                             fhat if needs.hidden else None, conc if needs.attention else None, n, probs, j)
            if not build.keep(step):
                break
            pend_tok, pend_feat, pos0 = [token], fhat[None], n - 1 + i
        self.core.crop(self.cached)
        return build.finish(forwards)
