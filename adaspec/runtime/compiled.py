"""The compiled CPU runtime's weights: a model packed for the lean Llama forward.

- :class:`LeanWeights`: fp32 weights packed once per model into 16-feature panels
  (:func:`kernels.pack_weight`) and shared by every runner of that model (``LeanWeights.of``);
  the checkpoint's own encoding is :class:`~adaspec.runtime.native.NativeWeights`, built on
  these helpers;
- :func:`unsupported_reason`: what the compiled runtime cannot run; :func:`read_geometry`,
  :func:`tree_mask`, the causal masks and the memory-release helpers both kinds share.

The runner over them is :class:`~adaspec.runtime.compiled_runner.CompiledRunner`.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import AdaspecError
from .eager import tree_rows

MAX_CAPACITY = 16384  # KV slots when the config does not bound the context


class UnsupportedModelError(AdaspecError):
    """The compiled runtime cannot run this model (architecture, dtype or device)."""


def unsupported_reason(model: nn.Module, native: bool = False) -> str | None:
    """Why the compiled runtime cannot run ``model``, or None when it can (``native``: the
    native-precision path, which also takes fp16 / bf16 modules)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ("llama", "mistral") or not hasattr(getattr(model, "model", None), "layers"):
        return f"architecture {kind or type(model).__name__!r}: it runs the Llama family"
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"device {p.device.type}: it runs on CPUs"
    if p.dtype != torch.float32 and not (native and p.dtype in (torch.float16, torch.bfloat16)):
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
    heads = int(cfg.num_attention_heads)
    if heads % int(getattr(cfg, "num_key_value_heads", None) or heads):
        return "query heads not a multiple of the key/value heads"
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if abs(getattr(layer.self_attn, "scaling", hd ** -0.5) - hd ** -0.5) > 1e-9:
        return "a custom attention scale"
    return None


def _np(t: torch.Tensor, copy: bool = True) -> np.ndarray:
    """fp32 numpy copy of ``t`` (``copy=False``: a view sharing its memory). Copies never keep
    the checkpoint's memory map alive once the module's own tensors are released."""
    a = t.detach().to(torch.float32).contiguous().numpy()
    return a.copy() if copy else a


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
    def of(cls, model: nn.Module, release: bool = False) -> LeanWeights:
        """The packed weights of ``model``, built on first use.

        ``release``: free each HF weight as soon as it is packed (see
        :meth:`release_eager_weights`), so the peak memory holds one copy of the weights.
        """
        with cls._lock:
            lean = cls._by_model.get(model)
            if lean is None:
                lean = cls(model, release)
                cls._by_model[model] = lean
                trim_heap()  # the freed read buffers: out of the peak
            elif release:
                lean.release_eager_weights()
            return lean

    @torch.inference_mode()
    def __init__(self, model: nn.Module, release: bool = False) -> None:
        from . import kernels as K

        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModelError(f"the compiled runtime does not support {reason}")
        cfg = model.config
        layers = model.model.layers
        read_geometry(self, cfg)
        self._model_ref = weakref.ref(model)
        self._restore_hook = None
        self._released: list[tuple[nn.Parameter, np.ndarray, int, int]] = []  # (param, packed, row0, rows)
        maps = _file_maps() if release else []
        self.ln1 = np.stack([_np(ly.input_layernorm.weight) for ly in layers])
        self.ln2 = np.stack([_np(ly.post_attention_layernorm.weight) for ly in layers])
        self.normw = _np(model.model.norm.weight)
        # (name, modules per layer whose weights are stacked as output rows)
        groups = [("wqkv", lambda ly: [ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj]),
                  ("wo", lambda ly: [ly.self_attn.o_proj]),
                  ("wgu", lambda ly: [ly.mlp.gate_proj, ly.mlp.up_proj]),
                  ("wd", lambda ly: [ly.mlp.down_proj])]
        for name, mods in groups:
            first = mods(layers[0])
            rows = sum(m.weight.shape[0] for m in first)
            packed = np.empty((len(layers), K.panels(rows), first[0].weight.shape[1], K.PANEL), np.float32)
            for i, ly in enumerate(layers):
                ws = [m.weight for m in mods(ly)]
                rows_np = [_np(w, copy=False) for w in ws]
                K.pack_weight(np.concatenate(rows_np) if len(ws) > 1 else rows_np[0], packed[i])
                row0 = 0
                for w in ws:
                    self._released.append((w, packed[i], row0, w.shape[0]))
                    row0 += w.shape[0]
                    if release:
                        _release(w, maps)
            setattr(self, name, packed)
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings().weight
        self.n_logits = int(head.weight.shape[0])
        self.lm = K.pack_weight(_np(head.weight, copy=False))
        # a tied head: token embeddings are read from the packed head (emb_packed), one copy
        self.emb_packed = head.weight.data_ptr() == emb.data_ptr()
        self.emb = np.zeros((1, self.d), np.float32) if self.emb_packed else _np(emb, copy=False)
        self._released.append((head.weight, self.lm, 0, self.n_logits))
        if release:
            _release(head.weight, maps)
        ids = getattr(head, "token_ids", None)
        self.out_ids = None if ids is None else ids.detach().to(torch.long)
        self.vocab = int(getattr(head, "full_vocab_size", self.n_logits))
        self.cos, self.sin = rope_tables(model, self.capacity)
        self.layers = len(layers)
        if release:
            self._await_eager_forward(model)

    def release_eager_weights(self) -> None:
        """Free the HF module's copies of the packed weights (the packed ones are the same
        numbers in another layout); an eager forward of the module rebuilds them first
        (a forward pre-hook), so nothing breaks, it only costs the memory again."""
        model = self._model_ref()
        if model is None or self._restore_hook is not None:
            return
        maps = _file_maps()
        for param, _, _, _ in self._released:
            if param.numel():
                _release(param, maps)
        self._await_eager_forward(model)

    def _await_eager_forward(self, model: nn.Module) -> None:
        """After a release: rebuild the weights before the module's next eager forward, and
        let go of the checkpoint's memory map (the module's small tensors still pin it)."""
        self._restore_hook = model.register_forward_pre_hook(lambda *_: self.restore_eager_weights())
        _own_remaining_tensors(model)

    @torch.no_grad()
    def restore_eager_weights(self) -> None:
        """Give the HF module its weights back (unpacked from the panels)."""
        from .kernels import unpack_weight

        if self._restore_hook is None:
            return
        for param, packed, row0, rows in self._released:
            if not param.numel():  # a tied head and embedding share one Parameter
                param.data = torch.from_numpy(np.ascontiguousarray(unpack_weight(packed, row0 + rows)[row0:]))
        self._restore_hook.remove()
        self._restore_hook = None

    def new_cache(self, slots: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed K^T [L, KVH, hd, slots] and V [L, KVH, slots, hdp] (slots <= capacity; slots
        and hdp = hd rounded up to 16: attention reads keys and values in blocks of 16).
        Small by default: :meth:`fit_cache` doubles it as the context grows, so a cache costs
        about the context in use (every page of K^T is touched by its first token)."""
        slots = -(-min(slots, self.capacity) // 16) * 16
        kt = zeros_untouched((self.layers, self.kvh, self.hd, slots))
        vc = zeros_untouched((self.layers, self.kvh, slots, -(-self.hd // 16) * 16))
        return kt, vc

    def fit_cache(self, kt: np.ndarray, vc: np.ndarray, need: int, keep: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(kt, vc) with room for ``need`` slots: a cache that is too short is replaced by one
        of double size (rare) holding its first ``keep`` slots.

        Raises:
            AdaspecError: ``need`` exceeds the capacity.
        """
        if -(-need // 16) * 16 <= kt.shape[-1]:
            return kt, vc
        if need > self.capacity:
            raise AdaspecError(f"the compiled runtime's KV cache holds {self.capacity} positions")
        grown_kt, grown_vc = self.new_cache(max(need, 2 * kt.shape[-1]))
        grown_kt[..., :keep] = kt[..., :keep]
        grown_vc[:, :, :keep] = vc[:, :, :keep]
        return grown_kt, grown_vc

    def run(self, ids: np.ndarray, pos: np.ndarray, start: int, mask: np.ndarray, n_out: int,
            kt: np.ndarray, vc: np.ndarray, n_logits: int | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward (see :func:`qkernels.forward`); logits are [n_logits (default n_out),
        self.n_logits], hidden [n_out, d]."""
        from .qkernels import forward

        n_logits = n_out if n_logits is None else n_logits
        logits, hidden, conc = forward(ids, pos, start, mask, n_out, n_logits, self.emb, self.emb_packed,
                                       self.ln1,
                                       self.wqkv, self.wo, self.ln2, self.wgu, self.wd, self.normw, self.lm,
                                       self.cos, self.sin, kt, vc, self.heads, self.kvh, self.inter, self.eps)
        return logits[:, : self.n_logits], hidden, conc

    def run_rows(self, h: np.ndarray, pos0: int, start: int, kt: np.ndarray, vc: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`run` from input rows h [T, d] (fp32, overwritten; causal, positions pos0..)
        instead of token ids (a feature head's rows), outputs for the last row: logits
        [1, self.n_logits], hidden [1, d], concentration [1]."""
        from .qkernels import forward_rows

        t = h.shape[0]
        pos = np.arange(pos0, pos0 + t, dtype=np.int64)
        logits, hidden, conc = forward_rows(h, pos, start, _causal(t), 1, 1,
                                            self.ln1, self.wqkv, self.wo, self.ln2, self.wgu, self.wd,
                                            self.normw, self.lm, self.cos, self.sin, kt, vc, self.heads,
                                            self.kvh, self.inter, self.eps)
        return logits[:, : self.n_logits], hidden, conc


_CAUSAL = [np.tril(np.ones((n, n), np.uint8)) for n in range(33)]


def _file_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped checkpoint files (Linux; else [])."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[-1].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def _release(param: torch.Tensor, maps: list[tuple[int, int]]) -> None:
    """Drop ``param``'s data. When it lives in a memory-mapped checkpoint (``maps``, from
    :func:`_file_maps`: transformers maps safetensors files), the whole map stays open while
    any tensor of it lives, so the pages wholly inside this tensor are also handed back to
    the kernel (MADV_DONTNEED on a private file map: they would be read from the file again
    if touched; no one will)."""
    start = param.data_ptr()
    end = start + param.numel() * param.element_size()
    param.data = torch.empty(0, dtype=param.dtype)
    if not maps or not any(lo <= start and end <= hi for lo, hi in maps):
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


_ROPE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def rope_tables(model: nn.Module, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """HF's own rotary tables of ``model`` for positions 0 .. capacity - 1: cos, sin [capacity, hd]
    fp32, shared (never written) by every model whose rotary module has the same frequencies and
    scaling (e.g. a target and its draft), which then hold one copy."""
    rot = model.model.rotary_emb
    key = (np.asarray(rot.inv_freq.detach().float()).tobytes(),
           float(getattr(rot, "attention_scaling", 1.0)), int(capacity))
    with _ROPE_LOCK:
        cos, sin = _ROPE.get(("cos", key)), _ROPE.get(("sin", key))
        if cos is None or sin is None:
            pos = torch.arange(capacity)[None]
            c, s = rot(torch.zeros(1, dtype=torch.float32), pos)  # [1, cap, hd]
            cos, sin = _np(c[0]), _np(s[0])
            _ROPE[("cos", key)], _ROPE[("sin", key)] = cos, sin
    return cos, sin


_ROPE_LOCK = threading.Lock()


def zeros_untouched(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array in its own anonymous memory map: its pages become resident only
    when written (a KV cache costs the slots in use). ``np.zeros`` gives that only while glibc
    serves the size by mmap; once its mmap threshold has grown (after large frees) it takes the
    heap and clears every page."""
    import mmap

    size = int(np.prod(shape, dtype=np.int64)) * 4
    if size == 0:
        return np.zeros(shape, np.float32)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, np.float32).reshape(shape)


def trim_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim``; a no-op
    elsewhere). Packing reads whole checkpoint tensors and frees them again; glibc keeps such
    freed blocks resident (its mmap threshold grows after the first large free), 30-40 MB
    per loaded model that would otherwise stay in the process's peak memory."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _own_remaining_tensors(model: nn.Module) -> None:
    """Copy the module's remaining (small) tensors out of the checkpoint's memory map, so that
    the map, whose touched pages count as resident memory, is closed once the big weights
    are gone."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                t.data = t.data.clone()


def read_geometry(weights, cfg) -> None:
    """Set the decoder geometry a lean forward needs (heads, kvh, hd, inter, eps, d, capacity)
    on ``weights`` (LeanWeights or NativeWeights) from a Llama-style ``cfg``."""
    weights.heads = int(cfg.num_attention_heads)
    weights.kvh = int(getattr(cfg, "num_key_value_heads", None) or weights.heads)
    weights.hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // weights.heads)
    weights.inter = int(cfg.intermediate_size)
    weights.eps = float(cfg.rms_norm_eps)
    weights.d = int(cfg.hidden_size)
    ctx = getattr(cfg, "max_position_embeddings", None) or MAX_CAPACITY
    weights.capacity = int(min(ctx, MAX_CAPACITY))


def tree_mask(n_lin: int, parents: list[int]) -> tuple[np.ndarray, list[int]]:
    """[n_lin + T]^2 visibility of a causal tail plus a tree, and each node's depth
    (:func:`~adaspec.runtime.eager.tree_rows`)."""
    mask, pos = tree_rows(0, n_lin, parents)
    return mask, [p - n_lin + 1 for p in pos[n_lin:]]


def _causal(n: int) -> np.ndarray:
    """[n, n] uint8 lower triangle (cached for the small n of decoding)."""
    return _CAUSAL[n] if n < len(_CAUSAL) else np.tril(np.ones((n, n), np.uint8))
