"""The compiled CPU runtime's runner: a lean Llama forward over packed weights and a static KV cache.

:class:`CompiledRunner` has the same contract as the eager :class:`~adaspec.runtime.eager.ModelRunner`
(forward / forward_tree / keep_path / prefill / rollback over the ids its cache holds), so
the engine and the drafters do not know which runtime they drive. Differences inside:

- weights are packed once per model (:class:`~adaspec.runtime.compiled.LeanWeights`, fp32
  panels, or :class:`~adaspec.runtime.native.NativeWeights`, the checkpoint's own encoding)
  and shared by every runner of that model;
- the KV cache is a static buffer of ``capacity`` slots (keys stored transposed), so a
  rollback is a length change and a tree's accepted path is a copy of a few slots;
- one forward is one call of :func:`qkernels.forward` (all layers), compiled once per
  machine by numba and cached on disk (:func:`ensure_compiled`; no shape specialisation: any
  number of fed rows runs the same machine code, so verify widths never recompile).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .compiled import LeanWeights, _causal, trim_heap
from .eager import ForwardOut, RunnerBase, tree_rows
from .native import NativeWeights


class CompiledRunner(RunnerBase):
    """Feeds token sequences to one model through the compiled runtime (static KV cache)."""

    def __init__(self, model: nn.Module, release: bool = False, native: bool = False,
                 encoding: str | None = None) -> None:
        """``native``: the checkpoint's own encoding (:class:`~adaspec.runtime.native.NativeWeights`,
        re-encoded to ``encoding`` when given), else packed fp32 (``compiled-fp32``)."""
        super().__init__(model)
        ensure_compiled()
        if native or encoding is not None:
            self.lean = NativeWeights.of(model, release, encoding)
        else:
            nw = NativeWeights.existing(model)
            if nw is not None:  # a natively loaded module: decode its weights before packing fp32
                nw.restore_eager_weights()
            self.lean = LeanWeights.of(model, release)
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

    full_vocab = True  # False: a reduced-vocabulary head's logits stay [n, Vs] (lean.out_ids order)

    def _run(self, feed: list[int], pos: list[int], start: int, mask: np.ndarray, n_out: int,
             hidden: bool, n_logits: int | None = None) -> ForwardOut:
        self.kt, self.vc = self.lean.fit_cache(self.kt, self.vc, start + len(feed), start)
        logits, hid, conc = self.lean.run(np.asarray(feed, np.int64), np.asarray(pos, np.int64), start,
                                          mask, n_out, self.kt, self.vc, n_logits)
        self.forwards += 1
        self._conc = conc
        out = torch.from_numpy(logits)
        if self.lean.out_ids is not None and self.full_vocab:  # reduced-vocabulary head: q = 0 elsewhere
            full = out.new_full((out.shape[0], self.lean.vocab), float("-inf"))
            out = full.index_copy_(1, self.lean.out_ids, out)
        return ForwardOut(out, torch.from_numpy(hid) if hidden else None)

    def forward(self, seq: list[int], n_out: int, *, hidden: bool = False,
                attentions: bool = False, concentration: bool = False, synced: int = 0) -> ForwardOut:
        """Bring the cache to ``seq``; outputs for its last ``n_out`` positions (see ModelRunner).

        The attention concentration is always computed (:meth:`attention_concentration`);
        attention weights themselves are not materialised.
        """
        if attentions:
            raise NotImplementedError("the compiled runtime does not return attention weights")
        start = self._sync_prefix(seq, n_out, synced)
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
        mask, pos = tree_rows(start, len(linear), parents)
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

    def _prefill(self, feed: list[int], start: int, hidden: bool) -> torch.Tensor | None:
        n_out = len(feed) if hidden else 0
        pos = list(range(start, start + len(feed)))
        return self._run(feed, pos, start, _causal(len(feed)), n_out, hidden, 0).hidden

    def attention_concentration(self) -> float:
        """Last-layer attention concentration of the last forward's newest query."""
        return float(self._conc[-1]) if len(self._conc) else 0.0

    def attention_concentrations(self, n: int) -> torch.Tensor:
        """[n] last-layer attention concentrations of the last forward's newest ``n`` output
        rows (n <= its ``n_out``), as :meth:`attention_concentration` reads the newest one."""
        return torch.from_numpy(np.ascontiguousarray(self._conc[len(self._conc) - n:]))


_compiled = False


def ensure_compiled() -> None:
    """Compile (first run on this machine, with a progress line) or load the kernels.

    A cache that fails to load is not trusted: this checkout's entries of the kernel modules
    are deleted (:func:`remove_cache_entries`) and rebuilt. The cache directory is shared by
    every checkout and version of adaspec on the machine (numba keeps one folder per source
    folder), so nothing else in it is touched.
    """
    global _compiled
    if _compiled:
        return
    from . import kernels, qkernels

    cache = kernels.CACHE_DIR
    index = getattr(getattr(getattr(qkernels.forward_layers, "_cache", None), "_cache_file", None),
                    "_index_path", None)
    fresh = index is None or not Path(index).is_file()
    t0 = time.perf_counter()
    if fresh:
        print(f"adaspec: compiling the CPU runtime kernels (once per machine, cached in {cache}) ...",
              file=sys.stderr, flush=True)
    try:
        _warm_up(kernels)
    except Exception as exc:  # a corrupt or incompatible cache: rebuild this checkout's entries
        gone = remove_cache_entries(kernel_modules())
        print(f"adaspec: runtime kernel cache unusable ({type(exc).__name__}); removed {gone} cache "
              "files of these kernels, rebuilding", file=sys.stderr, flush=True)
        _warm_up(kernels)
    trim_heap()  # the cache's unpickling buffers
    if fresh:
        print(f"adaspec: runtime kernels ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    _compiled = True


def kernel_modules() -> tuple:
    """The modules whose compiled kernels :func:`ensure_compiled` loads (kernels, qkernels)."""
    from . import kernels, qkernels

    return kernels, qkernels


def cache_folders(modules) -> set[Path]:
    """The numba cache folders of ``modules``' cached kernels (one per source folder, i.e. per
    checkout: ``<cache>/runtime_<hash of the folder path>``)."""
    out = set()
    for mod in modules:
        for obj in vars(mod).values():
            path = getattr(getattr(obj, "_cache", None), "_cache_path", None)
            if path and getattr(obj, "__module__", None) == mod.__name__:
                out.add(Path(path))
    return out


def remove_cache_entries(modules, folders: set[Path] | None = None) -> int:
    """Delete the numba cache files of ``modules`` (``<module>.<function>-<line>.py<ver>.nbi``
    and its ``.N.nbc`` data, every line-number version) in their cache folders (``folders``,
    default :func:`cache_folders`); other modules' entries (e.g. ``batch_kernels.*``) and
    other checkouts' folders stay. Returns the number of files removed."""
    prefixes = tuple(m.__name__.rsplit(".", 1)[-1] + "." for m in modules)
    gone = 0
    for folder in cache_folders(modules) if folders is None else folders:
        for f in folder.glob("*.nb[ic]"):
            if f.name.startswith(prefixes):
                f.unlink(missing_ok=True)
                gone += 1
    return gone


def _warm_up(kernels) -> None:
    """Run a 2-layer toy forward so every kernel is compiled or loaded from the cache."""
    rng = np.random.default_rng(0)
    d, hd, heads, kvh, inter, cap, vocab, layers = 32, 8, 4, 2, 64, 16, 40, 2
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    pk = kernels.pack_weight
    w = [np.stack([pk(f(n, k)) for _ in range(layers)])
         for n, k in (((heads + 2 * kvh) * hd, d), (d, heads * hd), (2 * inter, d), (d, inter))]
    kt = np.zeros((layers, kvh, hd, cap), np.float32)
    vc = np.zeros((layers, kvh, cap, 16), np.float32)
    _warm_up_native(rng, d, hd, heads, kvh, inter, cap, vocab, layers)
    from .qkernels import forward

    for n in (2, 1):
        forward(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), 0, _causal(n), 1, 1,
                f(vocab, d), n == 1, f(layers, d), w[0], w[1], f(layers, d), w[2], w[3], f(d),
                pk(f(vocab, d)), f(cap, hd), f(cap, hd), kt, vc, heads, kvh, inter, 1e-5)


def _warm_up_native(rng, d: int, hd: int, heads: int, kvh: int, inter: int, cap: int, vocab: int,
                    layers: int) -> None:
    """Compile or load the native kernels (:mod:`qkernels`) with a toy fp16 forward."""
    from . import native, qkernels

    chunks, mats, off = [], [], 0
    shapes = [((heads + 2 * kvh) * hd, d), (d, heads * hd), (2 * inter, d), (d, inter)] * layers
    shapes.append((vocab, d))
    for n, k in shapes:
        w = rng.standard_normal((n, k)).astype(np.float16).view(np.uint16)
        kind, data = native.pack(native.Encoded(native.F16, n, k, w))
        mats.append((kind, off, -(-n // 16), k))
        chunks.append(data)
        off += data.size
    mats.append(mats[-1])
    blob, table = np.concatenate(chunks), np.array(mats, np.int64)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    kt = np.zeros((layers, kvh, hd, cap), np.float32)
    vc = np.zeros((layers, kvh, cap, 16), np.float32)
    for n in (2, 1):
        ids = np.arange(n, dtype=np.int64)
        qkernels.forward_native(ids, ids, 0, _causal(n), 1, 1, blob, table, f(layers, d), f(layers, d), f(d),
                                f(cap, hd), f(cap, hd), kt, vc, heads, kvh, inter, 1e-5, n == 1)
