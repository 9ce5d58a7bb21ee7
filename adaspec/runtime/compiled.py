"""The compiled CPU runtime: a lean Llama forward over packed weights and a static KV cache.

:class:`CompiledRunner` has the same contract as the eager :class:`~adaspec.kv.ModelRunner`
(forward / forward_tree / keep_path / prefill / rollback over the ids its cache holds), so
the engine and the drafters do not know which runtime they drive. Differences inside:

- weights are packed once per model into 16-feature panels (:func:`kernels.pack_weight`)
  and shared by every runner of that model (``LeanWeights.of``);
- the KV cache is a static buffer of ``capacity`` slots (keys stored transposed), so a
  rollback is a length change and a tree's accepted path is a copy of a few slots;
- one forward is one call of :func:`kernels.forward` (all layers), compiled once per
  machine by numba and cached on disk (no shape specialisation: any number of fed rows
  runs the same machine code, so verify widths never recompile).
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import AdaspecError
from ..kv import ForwardOut, RunnerBase

MAX_CAPACITY = 16384  # KV slots when the config does not bound the context


class UnsupportedModelError(AdaspecError):
    """The compiled runtime cannot run this model (architecture, dtype or device)."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the compiled runtime cannot run ``model``, or None when it can."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ("llama", "mistral") or not hasattr(getattr(model, "model", None), "layers"):
        return f"architecture {kind or type(model).__name__!r}: it runs the Llama family"
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"device {p.device.type}: it runs on CPUs"
    if p.dtype != torch.float32:
        return f"dtype {str(p.dtype).replace('torch.', '')}: it computes in fp32"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biases in attention or MLP"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        return f"rope type {rope.get('rope_type')!r}"
    layer = model.model.layers[0]
    if getattr(layer.self_attn, "q_norm", None) is not None:
        return "q/k norms"
    return None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


class LeanWeights:
    """Packed weights of one HF Llama-style model (built once per model, then shared).

    Shapes (L layers, d hidden, H / KVH heads of hd, I intermediate, P panels of 16):
    emb [V, d] (a view of the model's embedding); ln1, ln2 [L, d]; wqkv [L, P, d, 16];
    wo [L, P, H hd, 16]; wgu [L, P, d, 16]; wd [L, P, I, 16]; normw [d]; lm [P, d, 16];
    cos, sin [capacity, hd]; ``out_ids`` [Vs] int64 when the head scores a vocabulary
    subset (adaspec reduced-vocabulary drafts), else None.
    """

    _lock = threading.Lock()
    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module) -> LeanWeights:
        with cls._lock:
            lean = cls._by_model.get(model)
            if lean is None:
                lean = cls(model)
                cls._by_model[model] = lean
            return lean

    @torch.inference_mode()
    def __init__(self, model: nn.Module) -> None:
        from . import kernels as K

        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModelError(f"the compiled runtime does not support {reason}")
        cfg = model.config
        layers = model.model.layers
        self.heads = int(cfg.num_attention_heads)
        self.kvh = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.inter = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.d = int(cfg.hidden_size)
        scaling = getattr(layers[0].self_attn, "scaling", self.hd ** -0.5)
        if abs(scaling - self.hd ** -0.5) > 1e-9:
            raise UnsupportedModelError("the compiled runtime does not support a custom attention scale")
        ctx = getattr(cfg, "max_position_embeddings", None) or MAX_CAPACITY
        self.capacity = int(min(ctx, MAX_CAPACITY))
        self.emb = _np(model.get_input_embeddings().weight)
        stack = lambda f: np.stack([f(layer) for layer in layers])  # noqa: E731
        self.ln1 = stack(lambda ly: _np(ly.input_layernorm.weight))
        self.ln2 = stack(lambda ly: _np(ly.post_attention_layernorm.weight))
        a = lambda ly: ly.self_attn  # noqa: E731
        self.wqkv = stack(lambda ly: K.pack_weight(np.concatenate(
            [_np(a(ly).q_proj.weight), _np(a(ly).k_proj.weight), _np(a(ly).v_proj.weight)])))
        self.wo = stack(lambda ly: K.pack_weight(_np(a(ly).o_proj.weight)))
        self.wgu = stack(lambda ly: K.pack_weight(np.concatenate(
            [_np(ly.mlp.gate_proj.weight), _np(ly.mlp.up_proj.weight)])))
        self.wd = stack(lambda ly: K.pack_weight(_np(ly.mlp.down_proj.weight)))
        self.normw = _np(model.model.norm.weight)
        head = model.get_output_embeddings()
        self.lm = K.pack_weight(_np(head.weight))
        self.n_logits = int(head.weight.shape[0])
        ids = getattr(head, "token_ids", None)
        self.out_ids = None if ids is None else ids.detach().to(torch.long)
        self.vocab = int(getattr(head, "full_vocab_size", self.n_logits))
        pos = torch.arange(self.capacity)[None]
        dummy = torch.zeros(1, dtype=torch.float32)
        cos, sin = model.model.rotary_emb(dummy, pos)  # HF's own tables: [1, cap, hd]
        self.cos, self.sin = _np(cos[0]), _np(sin[0])
        self.layers = len(layers)

    def new_cache(self) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed K^T [L, KVH, hd, cap] and V [L, KVH, cap, hd] (pages are touched lazily)."""
        kt = np.zeros((self.layers, self.kvh, self.hd, self.capacity), np.float32)
        vc = np.zeros((self.layers, self.kvh, self.capacity, self.hd), np.float32)
        return kt, vc

    def run(self, ids: np.ndarray, pos: np.ndarray, start: int, mask: np.ndarray, n_out: int,
            kt: np.ndarray, vc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward (see :func:`kernels.forward`); logits are [n_out, n_logits]."""
        from .kernels import forward

        logits, hidden, conc = forward(ids, pos, start, mask, n_out, self.emb, self.ln1, self.wqkv,
                                       self.wo, self.ln2, self.wgu, self.wd, self.normw, self.lm,
                                       self.cos, self.sin, kt, vc, self.heads, self.kvh,
                                       self.inter, self.eps)
        return logits[:, : self.n_logits], hidden, conc


class CompiledRunner(RunnerBase):
    """Feeds token sequences to one model through the compiled runtime (static KV cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        ensure_compiled()
        self.lean = LeanWeights.of(model)
        self.kt, self.vc = self.lean.new_cache()
        self._conc = np.zeros(1, np.float32)

    @property
    def capacity(self) -> int:
        return self.lean.capacity

    def reset(self) -> None:
        self.tokens = []
        self.forwards = 0

    def _crop(self, length: int) -> None:
        pass  # slots >= len(self.tokens) are simply overwritten by the next forward

    def _run(self, feed: list[int], pos: list[int], start: int, mask: np.ndarray, n_out: int,
             hidden: bool) -> ForwardOut:
        if start + len(feed) > self.lean.capacity:
            raise AdaspecError(f"the compiled runtime's KV cache holds {self.lean.capacity} positions")
        logits, hid, conc = self.lean.run(np.asarray(feed, np.int64), np.asarray(pos, np.int64), start,
                                          mask, n_out, self.kt, self.vc)
        self.forwards += 1
        self._conc = conc
        out = torch.from_numpy(logits)
        if self.lean.out_ids is not None:  # reduced-vocabulary head: q = 0 outside the subset
            full = out.new_full((n_out, self.lean.vocab), float("-inf"))
            out = full.index_copy_(1, self.lean.out_ids, out)
        return ForwardOut(out, torch.from_numpy(hid) if hidden else None)

    def forward(self, seq: list[int], n_out: int, *, hidden: bool = False,
                attentions: bool = False, concentration: bool = False) -> ForwardOut:
        """Bring the cache to ``seq``; outputs for its last ``n_out`` positions (see ModelRunner).

        The attention concentration is always computed (:meth:`attention_concentration`);
        attention weights themselves are not materialised.
        """
        if attentions:
            raise NotImplementedError("the compiled runtime does not return attention weights")
        start = self._sync_prefix(seq, n_out)
        feed = seq[start:]
        n = len(feed)
        out = self._run(feed, list(range(start, start + n)), start, _causal(n), n_out, hidden)
        self.tokens.extend(feed)
        return out

    def forward_tree(self, committed: list[int], nodes: list[int], parents: list[int], *,
                     hidden: bool = False) -> ForwardOut:
        """Committed tail plus a token tree in one forward (tree mask); see ModelRunner."""
        start = self._sync_prefix(committed, 1)
        linear = committed[start:]
        n_lin = len(linear)
        mask = np.zeros((n_lin + len(nodes), n_lin + len(nodes)), np.uint8)
        mask[:n_lin, :n_lin] = _causal(n_lin)
        mask[n_lin:, :n_lin] = 1
        depth: list[int] = []
        for j, par in enumerate(parents):
            row = n_lin + j
            if par >= 0:
                mask[row] = mask[n_lin + par]
                depth.append(depth[par] + 1)
            else:
                depth.append(1)
            mask[row, row] = 1
        pos = list(range(start, start + n_lin)) + [start + n_lin - 1 + d for d in depth]
        out = self._run(linear + nodes, pos, start, mask, len(nodes) + 1, hidden)
        self.tokens.extend(linear + nodes)
        return out

    def keep_path(self, committed_len: int, nodes: list[int], path: list[int]) -> None:
        """Keep the committed slots plus the tree nodes in ``path``: node j's slot moves to
        committed_len + i for the i-th node of the path (sources never precede targets)."""
        for i, j in enumerate(path):
            if i != j:
                self.kt[:, :, :, committed_len + i] = self.kt[:, :, :, committed_len + j]
                self.vc[:, :, committed_len + i] = self.vc[:, :, committed_len + j]
        self.tokens = self.tokens[:committed_len] + [nodes[j] for j in path]

    def prefill(self, seq: list[int]) -> None:
        """Put ``seq`` into the cache without computing any logits."""
        start = self._sync_prefix(seq, 0)
        if start == len(seq):
            return
        feed = seq[start:]
        self._run(feed, list(range(start, len(seq))), start, _causal(len(feed)), 0, False)
        self.tokens.extend(feed)

    def attention_concentration(self) -> float:
        """Last-layer attention concentration of the last forward's newest query."""
        return float(self._conc[-1]) if len(self._conc) else 0.0


def _causal(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), np.uint8))


_compiled = False


def ensure_compiled() -> None:
    """Compile (first run on this machine, with a progress line) or load the kernels.

    A cache that fails to load is deleted and rebuilt, never trusted.
    """
    global _compiled
    if _compiled:
        return
    from . import kernels

    cache = Path(kernels.os.environ["NUMBA_CACHE_DIR"])
    fresh = not any(cache.rglob("*forward*.nbi")) if cache.is_dir() else True
    t0 = time.perf_counter()
    if fresh:
        print(f"adaspec: compiling the CPU runtime kernels (once per machine, cached in {cache}) ...",
              file=sys.stderr, flush=True)
    try:
        _warm_up(kernels)
    except Exception as exc:  # a corrupt or incompatible cache: rebuild it
        print(f"adaspec: runtime kernel cache unusable ({type(exc).__name__}); rebuilding",
              file=sys.stderr, flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        _warm_up(kernels)
    if fresh:
        print(f"adaspec: runtime kernels ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    _compiled = True


def _warm_up(kernels) -> None:
    """Run a 2-layer toy forward so every kernel is compiled or loaded from the cache."""
    rng = np.random.default_rng(0)
    d, hd, heads, kvh, inter, cap, vocab, layers = 32, 8, 4, 2, 48, 8, 40, 2
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    pk = kernels.pack_weight
    w = [np.stack([pk(f(n, k)) for _ in range(layers)])
         for n, k in (((heads + 2 * kvh) * hd, d), (d, heads * hd), (2 * inter, d), (d, inter))]
    kt = np.zeros((layers, kvh, hd, cap), np.float32)
    vc = np.zeros((layers, kvh, cap, hd), np.float32)
    for n in (2, 1):
        kernels.forward(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), 0, _causal(n), 1,
                        f(vocab, d), f(layers, d), w[0], w[1], f(layers, d), w[2], w[3], f(d),
                        pk(f(vocab, d)), f(cap, hd), f(cap, hd), kt, vc, heads, kvh, inter, 1e-5)
