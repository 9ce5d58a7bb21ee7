"""Native-precision weights for the compiled runtime: the checkpoint's own encoding, reordered.

A *source* yields every weight matrix of a Llama-style model as an :class:`Encoded` tensor
(the checkpoint's bytes: GGUF blocks, or fp32 / fp16 / bf16 values), in Hugging Face row
order; :func:`pack` reorders its blocks into the panels of :mod:`adaspec.runtime.qkernels`
(never widening them), and :class:`NativeWeights` holds all of them in one uint8 blob with
a table of (kind, offset, panels, K) per matrix. Sources:

- :class:`GGUFSource`: a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors; llama.cpp's
  q/k row order is undone, as transformers does when it loads a GGUF);
- :class:`SafetensorsSource`: a directory of ``*.safetensors`` (fp32 / fp16 / bf16);
- :class:`ModuleSource`: the tensors of an in-memory module, optionally re-encoded
  (``encoding="q8_0"`` / ``"bf16"``: for drafts, whose precision never changes the output).

The decoded value of every weight is the reference one (gguf's ``dequantize``, or the exact
widening of fp16 / bf16), so logits equal those of the ``compiled-fp32`` runtime over the
de-quantised checkpoint bit for bit.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import AdaspecError, InvalidArgumentError, ModelLoadError
from .compiled import MAX_CAPACITY, UnsupportedModelError, unsupported_reason

F32, F16, BF16, Q8_0, Q4_0, Q4_1 = range(6)
KIND_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
BLOCK_BYTES = (2048, 1024, 1024, 544, 288, 320)  # one panel block (32 k x 16 outputs) per kind
GGUF_BLOCK = {Q8_0: 34, Q4_0: 18, Q4_1: 20}  # bytes of one GGUF block of 32 weights
ENCODINGS = {"f32": F32, "fp32": F32, "f16": F16, "fp16": F16, "bf16": BF16, "q8_0": Q8_0}


class UnsupportedEncodingError(UnsupportedModelError):
    """A tensor is stored in an encoding the native kernels do not decode."""


@dataclass
class Encoded:
    """One weight matrix [n, k] as stored: ``data`` is [n, k] float32 / uint16 (fp16 or
    bf16 bits) for float kinds, [n, k / 32 * block bytes] uint8 GGUF blocks otherwise."""

    kind: int
    n: int
    k: int
    data: np.ndarray

    def rows(self, idx: np.ndarray) -> Encoded:
        """The same matrix with its rows reordered / selected by ``idx``."""
        return Encoded(self.kind, len(idx), self.k, self.data[idx])


def _concat(parts: list[Encoded]) -> Encoded:
    """Stack matrices' rows (one kind; mixed kinds are widened to fp32, exactly)."""
    if len({p.kind for p in parts}) > 1:
        parts = [Encoded(F32, p.n, p.k, decode(p)) for p in parts]
    if len(parts) == 1:
        return parts[0]
    rows = sum(p.n for p in parts)
    return Encoded(parts[0].kind, rows, parts[0].k, np.concatenate([p.data for p in parts]))


def decode(enc: Encoded) -> np.ndarray:
    """[n, k] fp32 values of ``enc`` with gguf's reference arithmetic (numpy)."""
    if enc.kind == F32:
        return np.asarray(enc.data, np.float32)
    if enc.kind == F16:
        return enc.data.view(np.float16).astype(np.float32)
    if enc.kind == BF16:
        return (enc.data.astype(np.uint32) << 16).view(np.float32)
    blocks = enc.data.reshape(enc.n, enc.k // 32, GGUF_BLOCK[enc.kind])
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [n, nb, 1]
    if enc.kind == Q8_0:
        w = d * blocks[..., 2:].view(np.int8).astype(np.float32)
    else:
        q = _nibbles(blocks[..., -16:]).astype(np.float32)
        if enc.kind == Q4_0:
            w = d * (q - np.float32(8))
        else:
            w = d * q + blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    return w.reshape(enc.n, enc.k)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 4-bit blocks [..., 16] bytes -> [..., 32] values (low nibbles are 0..15)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _panels(a: np.ndarray, p: int) -> np.ndarray:
    """[n, nb, X...] -> [p, nb, 16 lanes, X...] (rows zero padded to p * 16)."""
    n = a.shape[0]
    if n < p * 16:
        a = np.concatenate([a, np.zeros((p * 16 - n,) + a.shape[1:], a.dtype)])
    return np.moveaxis(a.reshape((p, 16) + a.shape[1:]), 1, 2)


def pack(enc: Encoded) -> tuple[int, np.ndarray]:
    """Reorder ``enc`` into native panels: (kind, [P * K/32 * block bytes] uint8); K must be
    a multiple of 32 (:func:`_fit`)."""
    p = -(-enc.n // 16)
    nb = enc.k // 32
    if enc.kind in (F32, F16, BF16):
        a = _panels(np.ascontiguousarray(enc.data).reshape(enc.n, nb, 32), p)  # [p, nb, 16, 32]
        out = np.ascontiguousarray(a.swapaxes(2, 3))  # [p, nb, 32 k, 16 lanes]
        return enc.kind, out.view(np.uint8).reshape(-1)
    blocks = _panels(enc.data.reshape(enc.n, nb, GGUF_BLOCK[enc.kind]), p)  # [p, nb, 16, bytes]
    parts = [blocks[..., 0:2].reshape(p, nb, 32)]  # d of the 16 lanes
    if enc.kind == Q8_0:
        parts.append(np.ascontiguousarray(blocks[..., 2:].swapaxes(2, 3)).reshape(p, nb, 512))
    else:
        if enc.kind == Q4_1:
            parts.append(blocks[..., 2:4].reshape(p, nb, 32))
        q = _nibbles(blocks[..., -16:])  # [p, nb, 16 lanes, 32 k]
        pairs = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [p, nb, 16, 16 pairs]
        parts.append(np.ascontiguousarray(pairs.swapaxes(2, 3)).reshape(p, nb, 256))
    return enc.kind, np.ascontiguousarray(np.concatenate(parts, axis=-1)).reshape(-1)


def _fit(enc: Encoded) -> Encoded:
    """``enc`` when its K is a multiple of 32 (the kernels read 32 input features per block).

    Raises:
        UnsupportedEncodingError: otherwise (``auto`` then runs compiled-fp32).
    """
    if enc.k % 32 == 0:
        return enc
    raise UnsupportedEncodingError(f"an input width of {enc.k} (the native kernels need a multiple of 32)")


GGUF_TYPES = {"F32": F32, "F16": F16, "BF16": BF16, "Q8_0": Q8_0, "Q4_0": Q4_0, "Q4_1": Q4_1}


class GGUFSource:
    """Weights of a Llama-family GGUF file, in Hugging Face order.

    Raises:
        ModelLoadError: the file is truncated or not a GGUF (one line naming it).
    """

    def __init__(self, path: str | Path, heads: int | None = None, kv_heads: int | None = None) -> None:
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
            self.tensors = {t.name: t for t in self.reader.tensors}
            for t in self.tensors.values():  # a truncated file may still parse its header
                if t.data_offset + t.n_bytes > len(self.reader.data):
                    raise ValueError(f"tensor {t.name} runs past the end of the file")
        except (ValueError, OSError, KeyError, IndexError, TypeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"corrupt or truncated GGUF file {self.path}: {msg}") from None
        self.heads = heads or self._field("llama.attention.head_count")
        self.kv_heads = kv_heads or self._field("llama.attention.head_count_kv") or self.heads

    def _field(self, key: str) -> int | None:
        f = self.reader.fields.get(key)
        return None if f is None else int(f.parts[f.data[0]][0])

    def check(self) -> None:
        """Raise UnsupportedEncodingError naming the first tensor the kernels cannot decode."""
        for name, t in self.tensors.items():
            if t.tensor_type.name not in GGUF_TYPES:
                raise UnsupportedEncodingError(f"tensor {name} of {self.path.name} is {t.tensor_type.name}, "
                                               "which the native kernels do not decode")

    def get(self, name: str) -> Encoded | None:
        """The HF-named matrix (``q``, ``k``, ..., ``embed``, ``head``), None when absent."""
        gname = _GGUF_NAMES.get(name.split(".")[-1], name)
        layer = name.split(".")[0] if "." in name else None
        key = f"blk.{layer}.{gname}.weight" if layer is not None else f"{gname}.weight"
        t = self.tensors.get(key)
        if t is None:
            return None
        kind = GGUF_TYPES.get(t.tensor_type.name)
        if kind is None:
            raise UnsupportedEncodingError(f"tensor {key} of {self.path.name} is {t.tensor_type.name}, "
                                           "which the native kernels do not decode")
        k, n = (int(x) for x in t.shape[:2]) if len(t.shape) > 1 else (int(t.shape[0]), 1)
        data = t.data.reshape(n, -1)
        data = data.view(np.uint16) if kind in (F16, BF16) else data
        enc = Encoded(kind, n, k, data)
        if name.endswith((".q", ".k")):  # llama.cpp interleaves rotary halves: undo (as transformers)
            h = self.heads if name.endswith(".q") else self.kv_heads
            enc = enc.rows(np.arange(n).reshape(h, 2, n // h // 2).swapaxes(1, 2).reshape(-1))
        return enc

    def vector(self, name: str) -> np.ndarray | None:
        """A norm weight [d] as fp32 (None when absent)."""
        enc = self.get(name)
        return None if enc is None else decode(enc).reshape(-1)


_GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
               "up": "ffn_up", "down": "ffn_down", "ln1": "attn_norm", "ln2": "ffn_norm",
               "embed": "token_embd", "head": "output", "norm": "output_norm"}
_HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_HF_GLOBAL = {"embed": "model.embed_tokens", "head": "lm_head", "norm": "model.norm"}


def _hf_name(name: str) -> str:
    if "." in name:
        layer, short = name.split(".")
        return f"model.layers.{layer}.{_HF_NAMES[short]}.weight"
    return f"{_HF_GLOBAL[name]}.weight"


def _from_tensor(t: torch.Tensor, encoding: int | None = None) -> Encoded:
    """A torch matrix as stored (fp32 / fp16 / bf16), or re-encoded to ``encoding``."""
    t = t.detach()
    if encoding is None:
        encoding = {torch.float16: F16, torch.bfloat16: BF16}.get(t.dtype, F32)
    n, k = t.shape
    if encoding == F32:
        return Encoded(F32, n, k, t.to(torch.float32).contiguous().numpy())
    if encoding in (F16, BF16):
        dt = torch.float16 if encoding == F16 else torch.bfloat16
        return Encoded(encoding, n, k, t.to(dt).contiguous().view(torch.int16).numpy().view(np.uint16))
    if encoding == Q8_0:
        import gguf

        raw = gguf.quants.quantize(t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.Q8_0)
        return Encoded(Q8_0, n, k, raw.reshape(n, -1))
    raise InvalidArgumentError(f"unknown native encoding {encoding!r}")


class SafetensorsSource:
    """Weights of a directory of ``*.safetensors`` files (HF names), in their stored dtype."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.files = {}
        for f in sorted(self.path.glob("*.safetensors")):
            try:
                h = safe_open(str(f), "pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
                raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {exc}") from None
            for key in h.keys():
                self.files[key] = h

    def check(self) -> None:
        """Nothing to check: every safetensors float dtype decodes."""

    def get(self, name: str) -> Encoded | None:
        h = self.files.get(_hf_name(name))
        if h is None:
            return None
        t = h.get_tensor(_hf_name(name))
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UnsupportedEncodingError(f"tensor {_hf_name(name)} is {t.dtype}")
        return _from_tensor(t)

    def vector(self, name: str) -> np.ndarray | None:
        h = self.files.get(_hf_name(name))
        return None if h is None else h.get_tensor(_hf_name(name)).float().numpy().reshape(-1)


class ModuleSource:
    """The weights of an in-memory HF module (as they are, or re-encoded to ``encoding``)."""

    def __init__(self, model: nn.Module, encoding: int | None = None) -> None:
        self.params = dict(model.named_parameters())
        head = model.get_output_embeddings()
        self.head = head.weight
        self.encoding = encoding

    def check(self) -> None:
        """Nothing to check."""

    def get(self, name: str) -> Encoded | None:
        t = self.head if name == "head" else self.params.get(_hf_name(name))
        if t is None or not t.numel():
            return None
        return _from_tensor(t, self.encoding)

    def vector(self, name: str) -> np.ndarray | None:
        t = self.params.get(_hf_name(name))
        return None if t is None else t.detach().float().numpy().copy().reshape(-1)


def source_of(model: nn.Module, encoding: str | None = None):
    """The native source of ``model``: the file adaspec loaded it from (``adaspec_source``
    attribute: ("gguf" | "safetensors", path)), else the module's own tensors."""
    if encoding is not None:
        if encoding.lower() not in ENCODINGS:
            raise InvalidArgumentError(f"unknown native encoding {encoding!r}; choose one of "
                                       f"{', '.join(ENCODINGS)}")
        return ModuleSource(model, ENCODINGS[encoding.lower()])
    src = getattr(model, "adaspec_source", None)
    if src is None:
        return ModuleSource(model)
    kind, path = src
    if kind == "gguf":
        cfg = model.config
        return GGUFSource(path, int(cfg.num_attention_heads),
                          int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    return SafetensorsSource(path)


def native_unsupported(model: nn.Module) -> str | None:
    """Why the native runtime cannot run ``model`` (None when it can)."""
    reason = unsupported_reason(model, native=True)
    if reason:
        return reason
    try:
        source_of(model).check()
    except UnsupportedEncodingError as exc:
        return str(exc)
    return None


class NativeWeights:
    """Native panels of one HF Llama-style model (built once per model and encoding, shared).

    ``blob`` holds every matrix; ``mats`` [4 L + 2, 4] int64: (kind, offset, panels, K) of
    layer l's wqkv, wo, wgu, wd at rows 4 l .. 4 l + 3, the LM head at 4 L and the embedding
    at 4 L + 1. Other attributes as :class:`~adaspec.runtime.compiled.LeanWeights`.
    """

    _lock = threading.Lock()
    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module, release: bool = False, encoding: str | None = None) -> NativeWeights:
        """The native weights of ``model`` (re-encoded to ``encoding`` when given: "q8_0",
        "bf16", "f16", "f32"), built on first use; ``release`` frees the module's weights."""
        with cls._lock:
            per = cls._by_model.setdefault(model, {})
            lean = per.get(encoding)
            if lean is None:
                lean = per[encoding] = cls(model, source_of(model, encoding))
            if release:
                lean.release_eager_weights()
            return lean

    @torch.inference_mode()
    def __init__(self, model: nn.Module, source) -> None:
        from .qkernels import wide_default

        reason = unsupported_reason(model, native=True)
        if reason:
            raise UnsupportedModelError(f"the compiled runtime does not support {reason}")
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.kvh = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.inter = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.d = int(cfg.hidden_size)
        self.layers = len(model.model.layers)
        ctx = getattr(cfg, "max_position_embeddings", None) or MAX_CAPACITY
        self.capacity = int(min(ctx, MAX_CAPACITY))
        self.wide = wide_default()
        self._model_ref = weakref.ref(model)
        self._restore_hook = None
        self._pack_all(model, source)
        head = model.get_output_embeddings()
        ids = getattr(head, "token_ids", None)
        self.out_ids = None if ids is None else ids.detach().to(torch.long)
        self.vocab = int(getattr(head, "full_vocab_size", self.n_logits))
        pos = torch.arange(self.capacity)[None]
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # HF's own tables
        self.cos = cos[0].float().numpy().copy()
        self.sin = sin[0].float().numpy().copy()

    def _pack_all(self, model: nn.Module, source) -> None:
        """Fill blob, mats, ln1, ln2, normw from ``source``."""
        chunks: list[np.ndarray] = []
        rows: list[tuple[int, int, int, int]] = []
        self.shapes: list[int] = []  # output rows of each matrix (unpadded)
        offset = 0

        def add(enc: Encoded) -> None:
            nonlocal offset
            kind, data = pack(_fit(enc))
            rows.append((kind, offset, -(-enc.n // 16), enc.k))
            self.shapes.append(enc.n)
            chunks.append(data)
            offset += -(-data.size // 64) * 64
            if data.size % 64:
                chunks.append(np.zeros(-data.size % 64, np.uint8))

        for i in range(self.layers):
            for group in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)):
                add(_concat([_need(source, f"{i}.{g}") for g in group]))
        head = source.get("head")
        emb = source.get("embed")
        if head is None or _tied(model):
            head = emb if head is None else head
            add(head)
            rows.append(rows[-1])
            self.shapes.append(self.shapes[-1])
        else:
            add(head)
            add(_need(source, "embed"))
        self.n_logits = self.shapes[4 * self.layers]
        self.blob = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        chunks.clear()
        self.mats = np.array(rows, np.int64)
        self.ln1 = np.stack([_vec(source, f"{i}.ln1") for i in range(self.layers)])
        self.ln2 = np.stack([_vec(source, f"{i}.ln2") for i in range(self.layers)])
        self.normw = _vec(source, "norm")

    def matrix(self, index: int) -> np.ndarray:
        """Decoded fp32 [n, K] of matrix row ``index`` of :attr:`mats` (reference values)."""
        from .qkernels import qembed

        return qembed(np.arange(self.shapes[index], dtype=np.int64), self.blob, self.mats[index])

    def new_cache(self, slots: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed K^T and V caches (see LeanWeights.new_cache)."""
        slots = -(-min(slots, self.capacity) // 16) * 16
        kt = np.zeros((self.layers, self.kvh, self.hd, slots), np.float32)
        vc = np.zeros((self.layers, self.kvh, slots, -(-self.hd // 16) * 16), np.float32)
        return kt, vc

    def fit_cache(self, kt: np.ndarray, vc: np.ndarray, need: int, keep: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
        """See LeanWeights.fit_cache."""
        from .compiled import LeanWeights

        return LeanWeights.fit_cache(self, kt, vc, need, keep)  # type: ignore[arg-type]

    def run(self, ids: np.ndarray, pos: np.ndarray, start: int, mask: np.ndarray, n_out: int,
            kt: np.ndarray, vc: np.ndarray, n_logits: int | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward (:func:`qkernels.forward_native`); same contract as LeanWeights.run."""
        from .qkernels import forward_native

        n_logits = n_out if n_logits is None else n_logits
        logits, hidden, conc = forward_native(ids, pos, start, mask, n_out, n_logits, self.blob, self.mats,
                                              self.ln1, self.ln2, self.normw, self.cos, self.sin, kt, vc,
                                              self.heads, self.kvh, self.inter, self.eps, self.wide)
        return logits[:, : self.n_logits], hidden, conc

    def release_eager_weights(self) -> None:
        """Free the module's own copies of the big weights (an eager forward rebuilds them
        from the native panels first)."""
        from .compiled import _file_maps, _own_remaining_tensors, _release

        model = self._model_ref()
        if model is None or self._restore_hook is not None:
            return
        maps = _file_maps()
        for _, param in self._params(model):
            if param.numel():
                _release(param, maps)
        self._restore_hook = model.register_forward_pre_hook(lambda *_: self.restore_eager_weights())
        _own_remaining_tensors(model)

    def _params(self, model: nn.Module) -> list[tuple[tuple[int, int, int], nn.Parameter]]:
        """((matrix index, first row, rows), parameter) of every big weight of the module."""
        out = []
        for i, ly in enumerate(model.model.layers):
            for j, mods in enumerate(([ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj],
                                      [ly.self_attn.o_proj], [ly.mlp.gate_proj, ly.mlp.up_proj],
                                      [ly.mlp.down_proj])):
                row0 = 0
                for m in mods:
                    n = int(m.out_features)
                    out.append(((4 * i + j, row0, n), m.weight))
                    row0 += n
        head = model.get_output_embeddings()
        out.append(((4 * self.layers, 0, self.n_logits), head.weight))
        emb = model.get_input_embeddings().weight
        if emb is not head.weight:
            out.append(((4 * self.layers + 1, 0, self.shapes[-1]), emb))
        return out

    @torch.no_grad()
    def restore_eager_weights(self) -> None:
        """Give the HF module its weights back (decoded from the native panels)."""
        model = self._model_ref()
        if self._restore_hook is None or model is None:
            return
        decoded: dict[int, np.ndarray] = {}
        for (idx, row0, n), param in self._params(model):
            if not param.numel():
                if idx not in decoded:
                    decoded[idx] = self.matrix(idx)
                param.data = torch.from_numpy(np.ascontiguousarray(decoded[idx][row0:row0 + n]))
        self._restore_hook.remove()
        self._restore_hook = None


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _need(source, name: str) -> Encoded:
    enc = source.get(name)
    if enc is None:
        raise ModelLoadError(f"weight {name!r} missing from {getattr(source, 'path', 'the model')}")
    return enc


def _vec(source, name: str) -> np.ndarray:
    v = source.vector(name)
    if v is None:
        raise ModelLoadError(f"weight {name!r} missing from {getattr(source, 'path', 'the model')}")
    return np.ascontiguousarray(v, np.float32)


def check_encodable(model: nn.Module) -> None:
    """Raise AdaspecError when ``model`` cannot be run natively (one line)."""
    reason = native_unsupported(model)
    if reason:
        raise AdaspecError(f"--runtime compiled does not support {reason}")
