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
from .compiled import UnsupportedModelError, read_geometry, rope_tables, trim_heap, unsupported_reason

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
    if enc.kind == F32:
        from .kernels import pack_weight

        return F32, pack_weight(np.ascontiguousarray(enc.data, np.float32)).view(np.uint8).reshape(-1)
    if enc.kind in (F16, BF16):
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


def unpack(kind: int, data: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack` followed by :func:`decode`: native panels (uint8) -> [n, k] fp32
    with the reference arithmetic (numpy)."""
    p, nb = -(-n // 16), k // 32
    if kind == F32:
        from .kernels import unpack_weight

        return unpack_weight(data[:p * k * 64].view(np.float32).reshape(p, k, 16), n)
    blocks = data[:p * nb * BLOCK_BYTES[kind]].reshape(p, nb, BLOCK_BYTES[kind])
    if kind in (F16, BF16):
        raw = blocks.view(np.uint16).reshape(p, nb, 32, 16)
        w = raw.view(np.float16).astype(np.float32) if kind == F16 else (raw.astype(np.uint32) << 16).view(
            np.float32)
    else:
        d = blocks[..., :32].copy().view(np.float16).astype(np.float32)[:, :, None, :]  # [p, nb, 1, 16]
        if kind == Q8_0:
            w = d * blocks[..., 32:].copy().view(np.int8).reshape(p, nb, 32, 16).astype(np.float32)
        else:
            pairs = blocks[..., -256:].reshape(p, nb, 16, 16)
            q = np.stack([pairs & 15, pairs >> 4], axis=3).reshape(p, nb, 32, 16).astype(np.float32)
            if kind == Q4_0:
                w = d * (q - np.float32(8))
            else:
                w = d * q + blocks[..., 32:64].copy().view(np.float16).astype(np.float32)[:, :, None, :]
    return np.ascontiguousarray(w.transpose(0, 3, 1, 2).reshape(p * 16, k)[:n])


def _fit(enc: Encoded) -> Encoded:
    """``enc``, or (fp16 / bf16 with K not a multiple of 32, the block the kernels decode)
    the same values widened to fp32, exactly."""
    if enc.k % 32 == 0 or enc.kind == F32:
        return enc
    return Encoded(F32, enc.n, enc.k, decode(enc))


class GGUFSource:
    """Weights of a Llama-family GGUF file, in Hugging Face order.

    Only the header and tensor directory are parsed (:func:`read_gguf_index`: no
    vocabulary objects); each tensor is read from the file when asked for, so the peak
    memory holds the packed weights plus one tensor.

    Raises:
        ModelLoadError: the file is truncated or not a GGUF (one line naming it).
    """

    def __init__(self, path: str | Path, heads: int | None = None, kv_heads: int | None = None) -> None:
        self.path = Path(path)
        self.tensors, fields = read_gguf_index(self.path)
        self.heads = heads or fields.get("llama.attention.head_count")
        self.kv_heads = kv_heads or fields.get("llama.attention.head_count_kv") or self.heads

    def check(self) -> None:
        """Raise UnsupportedEncodingError naming the first tensor the kernels cannot decode."""
        for name, (gtype, _, _) in self.tensors.items():
            if gtype not in GGUF_TYPES:
                raise UnsupportedEncodingError(f"tensor {name} of {self.path.name} is {_type_name(gtype)}, "
                                               "which the native kernels do not decode")

    def get(self, name: str) -> Encoded | None:
        """The HF-named matrix (``3.q``, ``3.gate``, ..., ``embed``, ``head``), None when absent."""
        gname = _GGUF_NAMES.get(name.split(".")[-1], name)
        layer = name.split(".")[0] if "." in name else None
        key = f"blk.{layer}.{gname}.weight" if layer is not None else f"{gname}.weight"
        if key not in self.tensors:
            return None
        gtype, dims, offset = self.tensors[key]
        kind = GGUF_TYPES.get(gtype)
        if kind is None:
            raise UnsupportedEncodingError(f"tensor {key} of {self.path.name} is {_type_name(gtype)}, "
                                           "which the native kernels do not decode")
        k, n = dims[0], int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        dtype = {F32: np.float32, F16: np.uint16, BF16: np.uint16}.get(kind, np.uint8)
        per_row = k if kind in (F32, F16, BF16) else k // 32 * GGUF_BLOCK[kind]
        data = np.fromfile(self.path, dtype=dtype, count=n * per_row, offset=offset).reshape(n, per_row)
        enc = Encoded(kind, n, k, data)
        if name.endswith((".q", ".k")):  # llama.cpp interleaves rotary halves: undo (as transformers)
            h = self.heads if name.endswith(".q") else self.kv_heads
            enc = enc.rows(np.arange(n).reshape(h, n // h // 2, 2).swapaxes(1, 2).reshape(-1))
        return enc

    def vector(self, name: str) -> np.ndarray | None:
        """A norm weight [d] as fp32 (None when absent)."""
        enc = self.get(name)
        return None if enc is None else decode(enc).reshape(-1)

    def info(self, name: str) -> tuple[int, int, int] | None:
        """(kind, n, k) of a matrix without reading it (None when absent)."""
        gname = _GGUF_NAMES.get(name.split(".")[-1], name)
        key = f"blk.{name.split('.')[0]}.{gname}.weight" if "." in name else f"{gname}.weight"
        if key not in self.tensors:
            return None
        gtype, dims, _ = self.tensors[key]
        return GGUF_TYPES.get(gtype, -1), int(np.prod(dims[1:], dtype=np.int64)), dims[0]


GGUF_TYPES = {0: F32, 1: F16, 30: BF16, 8: Q8_0, 2: Q4_0, 3: Q4_1}  # GGML type id -> kind


def _type_name(gtype: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(gtype).name
    except ValueError:
        return f"type {gtype}"


def read_gguf_index(path: Path) -> tuple[dict[str, tuple[int, list[int], int]], dict[str, int]]:
    """{tensor name: (GGML type, dims (fastest first), absolute byte offset)} and the
    integer metadata of a GGUF file, checking that every tensor lies inside the file.

    Raises:
        ModelLoadError: not a GGUF, or truncated / corrupt (one line naming the file).
    """
    import struct


    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(f"corrupt or truncated GGUF file {path}: {why}")

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc.strerror}") from None
    with f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise fail("it ends inside its header")
            return struct.unpack("<" + fmt, raw)[0]

        def string() -> str:
            n = read("Q")
            raw = f.read(n)
            if len(raw) != n:
                raise fail("it ends inside its header")
            return raw.decode("utf-8", "replace")

        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def value(vtype: int):
            if vtype in scalar:
                return read(scalar[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = read("I"), read("Q")
                if etype in scalar:
                    size = struct.calcsize(scalar[etype])
                    if len(f.read(size * count)) != size * count:
                        raise fail("it ends inside its header")
                    return None
                if etype == 8:  # e.g. the vocabulary: skipped, never decoded into Python strings
                    for _ in range(count):
                        f.seek(read("Q"), 1)
                    if f.tell() > size_of_file:
                        raise fail("it ends inside its header")
                    return None
                for _ in range(count):
                    value(etype)
                return None
            raise fail(f"unknown metadata type {vtype}")

        size_of_file = path.stat().st_size
        if f.read(4) != b"GGUF":
            raise fail("no GGUF magic number")
        version = read("I")
        if version not in (2, 3):
            raise fail(f"unsupported GGUF version {version}")
        n_tensors, n_kv = read("Q"), read("Q")
        fields: dict[str, int] = {}
        for _ in range(n_kv):
            key = string()
            v = value(read("I"))
            if isinstance(v, int):
                fields[key] = v
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [read("Q") for _ in range(read("I"))]
            infos.append((name, read("I"), dims, read("Q")))
        align = fields.get("general.alignment", 32)
        start = -(-f.tell() // align) * align
        size = path.stat().st_size
    return _tensor_table(infos, start, size, fail), fields


def _tensor_table(infos: list, start: int, size: int, fail) -> dict[str, tuple[int, list[int], int]]:
    """{name: (GGML type, dims, absolute offset)} of a GGUF's tensor directory ``infos``
    ((name, type, dims, offset from ``start``)), each checked to end inside the ``size``
    bytes of the file (``fail(why)``: the error to raise)."""
    import gguf

    tensors = {}
    for name, gtype, dims, off in infos:
        block, nbytes = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(gtype), (1, 0)) \
            if gtype in gguf.GGMLQuantizationType._value2member_map_ else (1, 0)
        need = int(np.prod(dims, dtype=np.int64)) // block * nbytes
        if start + off + need > size:
            raise fail(f"tensor {name} runs past the end of the file ({size} bytes)")
        tensors[name] = (gtype, dims, start + off)
    return tensors


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
    if encoding == Q8_0 and k % 32:  # no Q8_0 block fits: keep fp32
        encoding = F32
    if encoding == F32:
        return Encoded(F32, n, k, t.to(torch.float32).contiguous().numpy())
    if encoding in (F16, BF16):
        dt = torch.float16 if encoding == F16 else torch.bfloat16
        return Encoded(encoding, n, k, t.to(dt).contiguous().view(torch.int16).numpy().view(np.uint16))
    if encoding == Q8_0:
        return Encoded(Q8_0, n, k, quantize_q8_0(t))
    raise InvalidArgumentError(f"unknown native encoding {encoding!r}")


def quantize_q8_0(t: torch.Tensor, step: int = 2048) -> np.ndarray:
    """[n, k] float tensor (k a multiple of 32) -> [n, k / 32 * 34] uint8 GGUF Q8_0 blocks,
    gguf's reference quantisation of its fp32 values, ``step`` rows at a time (every block
    lies in one row, so the bytes are those of one whole-matrix call; the temporaries stay
    small)."""
    import gguf

    n, k = t.shape
    out = np.empty((n, k // 32 * GGUF_BLOCK[Q8_0]), np.uint8)
    for r0 in range(0, n, step):
        rows = t[r0:r0 + step].to(torch.float32).numpy()
        out[r0:r0 + step] = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0).reshape(len(rows), -1)
    return out


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64}


def read_safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """{tensor name: (dtype name, shape, absolute byte offset)} of a safetensors file, each
    tensor checked to lie inside the file (only the JSON header is read).

    Raises:
        ModelLoadError: truncated or corrupt (one line naming the file).
    """
    import json
    import struct

    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(f"corrupt or truncated safetensors file {path}: {why}")

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            size = path.stat().st_size
            if n < 2 or 8 + n > size:
                raise fail("its header runs past the end of the file")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail(f"unreadable header ({type(exc).__name__})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = info["dtype"], [int(x) for x in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise fail(f"bad entry for tensor {name}") from None
        if 8 + n + hi > size or hi < lo:
            raise fail(f"tensor {name} runs past the end of the file ({size} bytes)")
        out[name] = (dtype, shape, 8 + n + lo)
    return out


class SafetensorsSource:
    """Weights of a directory of ``*.safetensors`` files (HF names), in their stored dtype, or
    re-encoded to ``encoding`` (e.g. Q8_0 for a draft).

    Only the headers are parsed; each tensor is read from its file when asked for (no memory
    map, whose touched pages would count as resident), so the peak memory holds the packed
    weights plus one stored tensor.

    Raises:
        ModelLoadError: a truncated or corrupt file (one line naming it).
    """

    def __init__(self, path: str | Path, encoding: int | None = None) -> None:
        self.path = Path(path)
        self.encoding = encoding
        self.files: dict[str, tuple[Path, str, list[int], int]] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            for key, (dtype, shape, offset) in read_safetensors_index(f).items():
                self.files[key] = (f, dtype, shape, offset)

    def check(self) -> None:
        """Raise UnsupportedEncodingError naming the first matrix that is not fp32 / fp16 / bf16."""
        for key, (_, dtype, shape, _) in self.files.items():
            if key.endswith(".weight") and len(shape) == 2 and dtype not in ("F32", "F16", "BF16"):
                raise UnsupportedEncodingError(f"tensor {key} is {dtype}")

    def tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The stored tensor ``key`` (fp16 / bf16 / fp32 / int64), read from its file (``rows``:
        only rows r0 .. r1 - 1 of a matrix); None when absent."""
        if key not in self.files:
            return None
        f, dtype, shape, offset = self.files[key]
        if dtype not in _ST_DTYPES:
            raise UnsupportedEncodingError(f"tensor {key} is {dtype}")
        np_type = _ST_DTYPES[dtype]
        if rows is not None:
            per_row = int(np.prod(shape[1:], dtype=np.int64))
            offset += rows[0] * per_row * np.dtype(np_type).itemsize
            shape = [rows[1] - rows[0], *shape[1:]]
        a = np.fromfile(f, dtype=np_type, count=int(np.prod(shape, dtype=np.int64)), offset=offset)
        t = torch.from_numpy(a.reshape(shape))
        return t.view(torch.bfloat16) if dtype == "BF16" else t

    def info(self, name: str) -> tuple[int, int, int] | None:
        """(kind, n, k) of a matrix without reading it (None when absent; kind -1: not decoded)."""
        entry = self.files.get(_hf_name(name))
        if entry is None:
            return None
        _, dtype, shape, _ = entry
        n, k = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        stored = {"F32": F32, "F16": F16, "BF16": BF16}.get(dtype, -1)
        kind = stored if self.encoding is None or stored < 0 else self.encoding
        return (F32 if kind == Q8_0 and k % 32 else kind), n, k

    def get(self, name: str) -> Encoded | None:
        info = self.info(name)
        if info is None:
            return None
        if info[0] < 0:
            raise UnsupportedEncodingError(f"tensor {_hf_name(name)} is {self.files[_hf_name(name)][1]}")
        if info[0] == Q8_0 and self.encoding == Q8_0:  # quantised as read, a chunk of rows at a time
            n, k = info[1], info[2]
            out = np.empty((n, k // 32 * GGUF_BLOCK[Q8_0]), np.uint8)
            for r0 in range(0, n, 4096):
                out[r0:r0 + 4096] = quantize_q8_0(self.tensor(_hf_name(name), (r0, min(n, r0 + 4096))))
            return Encoded(Q8_0, n, k, out)
        return _from_tensor(self.tensor(_hf_name(name)), self.encoding)

    def vector(self, name: str) -> np.ndarray | None:
        t = self.tensor(_hf_name(name))
        return None if t is None else t.float().numpy().reshape(-1)


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


def _info(source, name: str) -> tuple[int, int, int] | None:
    """(kind, n, k) of a source's matrix (read when the source cannot tell otherwise)."""
    if hasattr(source, "info"):
        return source.info(name)
    enc = source.get(name)
    return None if enc is None else (enc.kind, enc.n, enc.k)


def _packed_kind(infos: list[tuple[int, int, int]]) -> int:
    """The kind a group of stacked matrices is packed in (see :func:`_concat`, :func:`_fit`)."""
    kinds = {i[0] for i in infos}
    kind = kinds.pop() if len(kinds) == 1 else F32
    return F32 if kind in (F16, BF16) and infos[0][2] % 32 else kind


def _nbytes(kind: int, n: int, k: int) -> int:
    """Bytes of the packed panels of an [n, k] matrix of ``kind``, rounded up to 64."""
    per = k * 64 if kind == F32 else k // 32 * BLOCK_BYTES[kind]
    return -(-(-(-n // 16) * per) // 64) * 64


def pack_into(enc: Encoded, out: np.ndarray) -> int:
    """:func:`pack` ``enc`` into the uint8 array ``out`` (in chunks of rows, so temporaries stay
    small); returns the kind."""
    kind, at, step = enc.kind, 0, 4096
    for r0 in range(0, enc.n, step):
        kind, data = pack(enc.rows(np.arange(r0, min(enc.n, r0 + step))))
        out[at:at + data.size] = data
        at += data.size
    return kind


def source_of(model: nn.Module, encoding: str | None = None):
    """The native source of ``model``: the file adaspec loaded it from (``adaspec_source``
    attribute: ("gguf" | "safetensors", path)), else the module's own tensors. ``encoding``
    re-encodes the module's tensors (or, for a module built without them, its files')."""
    src = getattr(model, "adaspec_source", None)
    if encoding is not None:
        if encoding.lower() not in ENCODINGS:
            raise InvalidArgumentError(f"unknown native encoding {encoding!r}; choose one of "
                                       f"{', '.join(ENCODINGS)}")
        if src is not None and src[0] == "safetensors" and _released(model):
            # loaded without its weights (a draft read natively): re-encode straight from the files
            return SafetensorsSource(src[1], ENCODINGS[encoding.lower()])
        return ModuleSource(model, ENCODINGS[encoding.lower()])
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
            if lean is None and encoding is None and per and _released(model):
                # the module's weights were freed by an earlier re-encoding (e.g. the draft's
                # Q8_0 copy): the weights it runs on are the ones it has
                lean = next(iter(per.values()))
            if lean is None:
                lean = per[encoding] = cls(model, source_of(model, encoding))
            if release:
                lean.release_eager_weights()
            trim_heap()  # the freed read buffers and module weights: out of the peak
            return lean

    @classmethod
    def existing(cls, model: nn.Module) -> NativeWeights | None:
        """Native weights already built for ``model`` (its own encoding first), else None."""
        with cls._lock:
            per = cls._by_model.get(model) or {}
            return per.get(None) or next(iter(per.values()), None)

    def rows(self, index: int, ids: np.ndarray) -> np.ndarray:
        """[len(ids), K] fp32 rows ``ids`` of matrix ``index`` of :attr:`mats` (e.g. token
        embeddings: ``index`` = 4 L + 1; LM-head rows: 4 L), reference values."""
        from .qkernels import qembed

        return qembed(np.asarray(ids, np.int64), self.blob, self.mats[index])

    @torch.inference_mode()
    def __init__(self, model: nn.Module, source) -> None:
        from .qkernels import wide_default

        reason = unsupported_reason(model, native=True)
        if reason:
            raise UnsupportedModelError(f"the compiled runtime does not support {reason}")
        cfg = model.config
        read_geometry(self, cfg)
        self.layers = len(model.model.layers)
        self.wide = wide_default()
        self._model_ref = weakref.ref(model)
        self._restore_hook = None
        self._pack_all(model, source)
        head = model.get_output_embeddings()
        ids = getattr(head, "token_ids", None)
        self.out_ids = None if ids is None else ids.detach().to(torch.long)
        self.vocab = int(getattr(head, "full_vocab_size", self.n_logits))
        self.cos, self.sin = rope_tables(model, self.capacity)  # HF's own tables

    def _pack_all(self, model: nn.Module, source) -> None:
        """Fill blob, mats, ln1, ln2, normw from ``source`` (blob sized first, then filled
        matrix by matrix: the peak holds the blob plus one matrix)."""
        groups = [[f"{i}.{g}" for g in grp] for i in range(self.layers)
                  for grp in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))]
        head_info = _info(source, "head")
        tied = head_info is None or _tied(model)
        groups += [["head"] if head_info is not None else ["embed"]] + ([] if tied else [["embed"]])
        plan = []
        for names in groups:
            infos = [_info(source, n) for n in names]
            if any(i is None for i in infos):
                missing = names[[i is None for i in infos].index(True)]
                where = getattr(source, "path", "the model")
                raise ModelLoadError(f"weight {missing!r} missing from {where}")
            if any(i[0] < 0 for i in infos):
                source.check()  # raises, naming the tensor
            n, k = sum(i[1] for i in infos), infos[0][2]
            plan.append((names, _packed_kind(infos), n, k))
        # zeroed (calloc: no extra pages), so the padding between matrices is deterministic
        self.blob = np.zeros(sum(_nbytes(kind, n, k) for _, kind, n, k in plan), np.uint8)
        rows, self.shapes, offset = [], [], 0
        for names, kind, n, k in plan:
            enc = _fit(_concat([source.get(name) for name in names]))
            size = _nbytes(kind, n, k)
            got = pack_into(enc, self.blob[offset:offset + size])
            rows.append((got, offset, -(-n // 16), k))
            self.shapes.append(n)
            offset += size
        if tied:
            rows.append(rows[-1])
            self.shapes.append(self.shapes[-1])
        self.n_logits = self.shapes[4 * self.layers]
        self.mats = np.array(rows, np.int64)
        self.ln1 = np.stack([_vec(source, f"{i}.ln1") for i in range(self.layers)])
        self.ln2 = np.stack([_vec(source, f"{i}.ln2") for i in range(self.layers)])
        self.normw = _vec(source, "norm")

    def matrix(self, index: int) -> np.ndarray:
        """Decoded fp32 [n, K] of matrix row ``index`` of :attr:`mats` (reference values)."""
        kind, off, p, k = (int(v) for v in self.mats[index])
        return unpack(kind, self.blob[off:off + _nbytes(kind, p * 16, k)], self.shapes[index], k)

    def new_cache(self, slots: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed K^T and V caches (see LeanWeights.new_cache: same shapes)."""
        from .compiled import LeanWeights

        return LeanWeights.new_cache(self, slots)  # type: ignore[arg-type]

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


def _released(model: nn.Module) -> bool:
    """Whether some of ``model``'s parameters were freed (an empty tensor left in place)."""
    return any(not p.numel() for p in model.parameters())


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


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
