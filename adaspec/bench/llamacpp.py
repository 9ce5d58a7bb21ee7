"""The CPU peer row: plain greedy decoding of the same weights in llama.cpp.

Method ``llamacpp`` (optional: ``pip install "adaspec[llamacpp]"``, i.e.
llama-cpp-python, which builds llama.cpp from source). The default target ships as a
Q4_1 GGUF; adaspec runs its de-quantised fp32 weights, so the peer runs the same fp32
numbers: :func:`f32_gguf` rewrites the shipped GGUF with every tensor de-quantised to
F32 (metadata and tokenizer copied unchanged), once, under ``$ADASPEC_CACHE``. Another
target needs its own GGUF: ``llamacpp:gguf=PATH``. Threads follow ``--threads``
(default 2). Its greedy text may differ from ``ar`` at near-ties (other kernels).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from ..errors import InvalidArgumentError
from ..types import GenerationStats


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def f32_gguf(src: Path | None = None, out: Path | None = None) -> Path:
    """The shipped default target's GGUF with every tensor de-quantised to F32 (cached)."""
    import gguf
    import numpy as np

    from ..models import _GGUF_FILE, _gguf_dir, cache_dir

    src = src or _gguf_dir() / _GGUF_FILE
    out = out or cache_dir() / "smollm2-135m-instruct-f32.gguf"
    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_key_value(name, int(gguf.LlamaFileType.ALL_F32), field.types[0])
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


class LlamaCppRunner:
    """``llamacpp``: greedy plain decoding with llama-cpp-python (the CPU engine users know)."""

    runtime = "llama.cpp"

    def __init__(self, args: dict[str, str], target_name: str, eos_ids: frozenset[int],
                 threads: int | None) -> None:
        if not llama_cpp_available():
            raise InvalidArgumentError(
                'method llamacpp needs llama-cpp-python: pip install "adaspec[llamacpp]"')
        from llama_cpp import Llama

        from ..models import DEFAULT_TARGET_NAME

        path = Path(args["gguf"]) if "gguf" in args else None
        if path is None:
            if target_name != DEFAULT_TARGET_NAME:
                raise InvalidArgumentError("method llamacpp converts only the default target; give "
                                           "llamacpp:gguf=PATH for another one")
            path = f32_gguf()
        if not path.is_file():
            raise InvalidArgumentError(f"llamacpp: GGUF file {path} does not exist")
        self.eos_ids = eos_ids
        self.llm = Llama(model_path=str(path), n_ctx=int(args.get("n_ctx", 4096)), n_threads=threads or 2,
                         n_threads_batch=threads or 2, verbose=False)

    def generate(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int | None):
        from .methods import TurnResult

        if temperature > 0:
            raise InvalidArgumentError("method llamacpp is greedy only (the speed peer row)")
        t0 = time.perf_counter()
        new: list[int] = []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            new.append(int(tok))
            if tok in self.eos_ids or len(new) >= max_new_tokens:
                break
        wall = time.perf_counter() - t0
        stats = GenerationStats(prompt_tokens=len(ids), new_tokens=len(new), wall_s=wall,
                                target_forwards=len(new))
        for _ in new:
            stats.record_round(0, 0)
        stats.stop_reason = "eos" if new and new[-1] in self.eos_ids else "max_new_tokens"
        stats.extra["stats_source"] = "llama-cpp-python; no stage times"
        return TurnResult(new, stats)
