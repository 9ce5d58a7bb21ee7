"""Native-precision compiled runtime: every encoding bit-identical to compiled-fp32 over the
reference de-quantisation, both kernel widths, speculation identity and distribution, bad input."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import loaded, make_model, perturbed, prompt_ids

from adaspec.api import SpeculativeGenerator
from adaspec.errors import InvalidArgumentError, ModelLoadError
from adaspec.runtime import resolve_runtime
from adaspec.runtime.compiled_runner import CompiledRunner

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        parts = hf.split(".")
        return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
            "model.norm.weight": "output_norm.weight"}[hf]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py)."""
    n = w.shape[0]
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' reverse (modeling_gguf_pytorch_utils), written independently here."""
    n = w.shape[0]
    return w.reshape(heads, n // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path, qtype, tied: bool = False,
               skip_last: int = 0) -> torch.nn.Module:
    """Write ``model`` as a GGUF whose matrices are ``qtype`` (norms F32); returns the fp32
    reference module: the same model with every weight replaced by gguf's own de-quantisation."""
    cfg = model.config
    ref = copy.deepcopy(model)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    params = dict(ref.named_parameters())
    for name, p in params.items():
        if tied and name == "lm_head.weight":
            continue
        a = p.detach().numpy().astype(np.float32)
        heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
        if a.ndim == 2:
            if "q_proj" in name or "k_proj" in name:
                a = _permute(a, heads)
            raw = gguf.quants.quantize(a, qtype)
            w.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
            back = gguf.quants.dequantize(raw, qtype).astype(np.float32)
            if "q_proj" in name or "k_proj" in name:
                back = _unpermute(back, heads)
        else:
            w.add_tensor(_gguf_name(name), a)
            back = a
        with torch.no_grad():
            p.copy_(torch.from_numpy(back.reshape(p.shape)))
    if tied:
        ref.lm_head.weight = ref.model.embed_tokens.weight
        ref.config.tie_word_embeddings = True
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if skip_last:
        data = path.read_bytes()
        path.write_bytes(data[:-skip_last])
    return ref


@pytest.fixture(scope="module")
def tiny():
    """d = 64 (a multiple of the 32-feature blocks), 2 layers, untied head."""
    return make_model("llama", seed=5, hidden=64, layers=2)


def _native_module(ref: torch.nn.Module, source: tuple[str, str]) -> torch.nn.Module:
    m = copy.deepcopy(ref)
    m.adaspec_source = source
    return m


def _assert_identical(ref: torch.nn.Module, native: torch.nn.Module, wide: bool) -> None:
    """Logits of every row count 1-8 (one kernel pass each), 9-16 (passes of 8 and the rest)
    and of a tree: torch.equal against compiled-fp32."""
    r32 = CompiledRunner(ref)
    rn = CompiledRunner(native, native=True)
    rn.lean.wide = wide
    ctx = prompt_ids(1)
    for n in (*range(1, 9), 9, 13, 16):
        extra = [(7 * j + n) % 250 for j in range(n)]
        for r in (r32, rn):
            r.reset()
            r.prefill(ctx)
        a, b = r32.forward(ctx + extra, n).logits, rn.forward(ctx + extra, n).logits
        assert torch.equal(a, b), f"{n} rows: max diff {(a - b).abs().max()}"
    nodes, parents = [11, 12, 13, 40, 41], [-1, 0, 1, 0, -1]
    for r in (r32, rn):
        r.reset()
        r.prefill(ctx[:-1])
    a = r32.forward_tree(ctx, nodes, parents).logits
    assert torch.equal(a, rn.forward_tree(ctx, nodes, parents).logits)


@pytest.mark.parametrize("wide", [False, True], ids=["avx2", "avx512"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_gguf_encodings_bit_identical_to_fp32(tiny, tmp_path, qtype, wide):
    path = tmp_path / f"tiny-{qtype}.gguf"
    ref = write_gguf(tiny, path, Q[qtype])
    _assert_identical(ref, _native_module(ref, ("gguf", str(path))), wide)


def test_gguf_tied_q8_0_head_is_the_embedding(tiny, tmp_path):
    path = tmp_path / "tied.gguf"
    ref = write_gguf(tiny, path, Q.Q8_0, tied=True)
    _assert_identical(ref, _native_module(ref, ("gguf", str(path))), True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_safetensors_encodings_bit_identical_to_fp32(tiny, tmp_path, dtype):
    from safetensors.torch import save_file

    stored = {k: v.detach().to(dtype).contiguous() for k, v in tiny.state_dict().items()}
    save_file(stored, str(tmp_path / "model.safetensors"))
    ref = copy.deepcopy(tiny)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(stored[k].float())
    for wide in (False, True):
        _assert_identical(ref, _native_module(ref, ("safetensors", str(tmp_path))), wide)


def test_bf16_module_runs_natively_and_matches_its_fp32_widening(tiny):
    """A bf16 module (no file): compiled runs it natively; compiled-fp32 needs fp32."""
    b16 = copy.deepcopy(tiny).to(torch.bfloat16)
    assert resolve_runtime("auto", b16)[0] == "compiled"
    _assert_identical(copy.deepcopy(b16).float(), b16, True)


def test_avx2_forced_by_environment():
    code = "from adaspec.runtime.qkernels import wide_default; print(wide_default())"
    env = dict(os.environ, ADASPEC_KERNELS="avx2", PYTHONPATH=str(Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    env["ADASPEC_KERNELS"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(" avx512f" in flags)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculation_identical_on_native_q4_1(tiny, tmp_path, k):
    path = tmp_path / "t.gguf"
    ref = write_gguf(tiny, path, Q.Q4_1)
    target = loaded(_native_module(ref, ("gguf", str(path))))
    draft = loaded(perturbed(ref, 0.6))
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": k}, runtime="compiled")
    assert gen.runtime == "compiled"
    plain = SpeculativeGenerator(loaded(ref), None, runtime="compiled-fp32")
    accepted = rejected = 0
    for i in range(3):
        want = plain.generate(prompt_ids(i), max_new_tokens=24)
        out = gen.generate(prompt_ids(i), max_new_tokens=24)
        assert out.token_ids == want.token_ids
        accepted += out.stats.accepted_tokens
        rejected += out.stats.drafted_tokens - out.stats.accepted_tokens
    assert accepted > 0 and rejected > 0


def test_sampling_distribution_on_native_q8_0(tmp_path):
    """Seeded samples of speculation on the native Q8_0 target follow the exact distribution
    of the reference (de-quantised) model, enumerated with its eager forward."""
    import test_distribution as td

    base = make_model("llama", vocab=td.V, seed=3, hidden=64, layers=2, init=0.1)
    ref = write_gguf(base, tmp_path / "d.gguf", Q.Q8_0)
    target = loaded(_native_module(ref, ("gguf", str(tmp_path / "d.gguf"))))
    draft = loaded(perturbed(ref, 0.3))
    from adaspec.policies import make_policy

    run = td.sample(target, draft, make_policy("fixed", {"k": "3"}), td.T1, 3, runtime="compiled")
    exact = td.exact_distribution(ref, td.PROMPT, td.T1, 3)
    for w in ((0, 2), (1, 3)):
        assert td.chi_square_p(td.marginal(run.counts, w), td.marginal(exact, w)) > td.ALPHA / 2
    assert run.c["accepted"] > 0 and run.c["rejected"] > 0


def test_unsupported_tensor_type_falls_back_or_errors(tiny, tmp_path):
    path = tmp_path / "q5.gguf"
    ref = write_gguf(tiny, path, Q.Q5_0)
    m = _native_module(ref, ("gguf", str(path)))
    rt, note = resolve_runtime("auto", m)
    assert rt == "compiled-fp32" and "Q5_0" in note and "\n" not in note
    with pytest.raises(InvalidArgumentError, match="Q5_0"):
        resolve_runtime("compiled", m)


def test_truncated_gguf_is_one_line_error_naming_the_file(tiny, tmp_path):
    from adaspec.runtime.native import GGUFSource

    path = tmp_path / "cut.gguf"
    write_gguf(tiny, path, Q.Q4_1, skip_last=100)
    with pytest.raises(ModelLoadError, match="cut.gguf") as err:
        GGUFSource(path)
    assert "\n" not in str(err.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        GGUFSource(tmp_path / "junk.gguf")


def test_cli_truncated_gguf_exit_2_and_no_cache_left(tiny, tmp_path, capsys, monkeypatch):
    from adaspec import cli

    path = tmp_path / "cut.gguf"
    write_gguf(tiny, path, Q.Q4_1, skip_last=100)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADASPEC_CACHE", str(cache))
    capsys.readouterr()
    argv = ["generate", "hi", "--target", str(path), "--draft", "none", "--runtime", "compiled"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cut.gguf" in err and "truncated" in err and "\n" not in err
    files = cache.rglob("*") if cache.exists() else []
    assert not [f for f in files if f.is_file()]


def test_eager_forward_of_a_natively_loaded_module_decodes_its_weights(tiny, tmp_path):
    """release: the module keeps no weights; an eager forward rebuilds the reference ones."""
    path = tmp_path / "e.gguf"
    ref = write_gguf(tiny, path, Q.Q4_1)
    m = _native_module(ref, ("gguf", str(path)))
    CompiledRunner(m, release=True, native=True)
    assert m.model.layers[0].mlp.down_proj.weight.numel() == 0
    x = torch.tensor([prompt_ids(0)])
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref(x).logits)


def test_runner_of_a_module_freed_by_its_q8_0_copy_runs_on_that_copy(tiny):
    """A draft's weights re-encoded to Q8_0 with ``release`` leave empty module tensors; a second
    runner for the same module (the oracle's, a tree's) runs on the Q8_0 copy instead of failing
    on the empty tensors (it failed with "weight '0.q' missing" before)."""
    from adaspec.runtime import make_runner

    model = copy.deepcopy(tiny)
    q8 = CompiledRunner(model, release=True, native=True, encoding="q8_0")
    assert any(not p.numel() for p in model.parameters())
    again = make_runner(model, "compiled")
    seq = prompt_ids(1)[:9]
    q8.prefill(seq[:-3])
    again.prefill(seq[:-3])
    assert torch.equal(q8.forward(seq, 3).logits, again.forward(seq, 3).logits)


@pytest.mark.parametrize("wide", [False, True], ids=["avx2", "avx512"])
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"])
def test_qlinear_every_row_count_equals_fp32_tiles_and_each_row_alone(kind, wide):
    """qkernels.qlinear over one matrix (odd panel count: the two-panel jobs of 1-2 rows
    meet a lone last panel) for 1-17 rows: equal to kernels.linear over the decoded fp32
    panels, and every row equal to that row computed alone (batch invariance)."""
    from adaspec.runtime import kernels, native, qkernels

    rng = np.random.default_rng(3)
    n, k = 80, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind in ("F16", "BF16"):
        bits = (w.astype(np.float16).view(np.uint16) if kind == "F16"
                else (w.view(np.uint32) >> 16).astype(np.uint16))
        enc = native.Encoded(getattr(native, kind), n, k, bits)
    else:
        enc = native.Encoded(getattr(native, kind), n, k, gguf.quants.quantize(w, Q[kind]).reshape(n, -1))
    kd, blob = native.pack(enc)
    mat = np.array([kd, 0, n // 16, k], np.int64)
    wp = kernels.pack_weight(native.decode(enc))
    for rows in range(1, 18):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        got, ref = np.empty((rows, n), np.float32), np.empty((rows, n), np.float32)
        qkernels.qlinear(x, blob, mat, got, wide)
        kernels.linear(x, wp, ref)
        assert np.array_equal(got, ref), f"{rows} rows"
        for i in (0, rows - 1):
            alone = np.empty((1, n), np.float32)
            qkernels.qlinear(x[i:i + 1].copy(), blob, mat, alone, wide)
            assert np.array_equal(alone[0], got[i]), f"row {i} of {rows}"


def _save_subset_draft(ref: torch.nn.Module, path: Path, dtype: torch.dtype, skip: int = 2) -> torch.Tensor:
    """Write ``ref`` as a reduced-vocabulary draft stored in ``dtype`` (every ``skip``-th
    token left out of its head); returns the scored ids."""
    from adaspec.checkpoints.subset_draft import build_subset_draft, save_subset_draft

    ids = torch.tensor([t for t in range(ref.config.vocab_size) if t % skip])
    model = build_subset_draft(copy.deepcopy(ref.config), ids)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(ref.lm_head.weight[ids])
    save_subset_draft(model.to(dtype), path, {"draft_vocab_size": len(ids), "target_vocab_sha256": None,
                                              "target": "tiny"})
    return ids


@pytest.mark.parametrize("hidden", [64, 48], ids=["q8_0", "k%32-fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_subset_draft_read_natively_packs_the_same_bytes(tmp_path, dtype, hidden, monkeypatch):
    """A reduced-vocabulary draft loaded for the native runtime is read from its files straight
    into the draft encoding: no fp32 module weights, and the packed bytes equal those of
    re-encoding the fp32 module the eager load builds (hidden 48: no Q8_0 block fits, fp32)."""
    from adaspec.checkpoints.loader import load_model
    from adaspec.runtime.native import NativeWeights

    monkeypatch.delenv("ADASPEC_DRAFT_ENCODING", raising=False)
    ids = _save_subset_draft(make_model("llama", seed=7, hidden=hidden, layers=3), tmp_path / "d", dtype)
    new = load_model(str(tmp_path / "d"), role="draft", runtime="compiled")
    assert all(p.numel() == 0 for p in new.model.parameters() if p.dim() >= 2)
    assert torch.equal(new.model.lm_head.token_ids, ids) and new.vocab_size == new.model.config.vocab_size
    old = load_model(str(tmp_path / "d"), dtype="fp32", role="draft", runtime="eager")
    want = NativeWeights.of(old.model, release=True, encoding="q8_0")
    got = NativeWeights.existing(new.model)
    assert got is not want and int(got.mats[0, 0]) == (3 if hidden == 64 else 0)  # Q8_0 / F32
    for name in ("blob", "mats", "ln1", "ln2", "normw", "cos", "sin"):
        assert getattr(got, name).tobytes() == getattr(want, name).tobytes(), name
    assert torch.equal(got.out_ids, want.out_ids) and got.shapes == want.shapes


def test_subset_draft_read_natively_keeps_greedy_output_and_acceptance(tiny, tmp_path):
    """Speculation with the natively read draft: the same tokens as plain decoding and the
    same acceptance, round by round, as with the draft loaded as an fp32 module (same packs)."""
    from adaspec.checkpoints.loader import load_model

    _save_subset_draft(perturbed(tiny, 0.1), tmp_path / "d", torch.bfloat16, skip=7)
    native = load_model(str(tmp_path / "d"), role="draft", runtime="compiled")
    module = load_model(str(tmp_path / "d"), dtype="fp32", role="draft", runtime="eager")
    plain = SpeculativeGenerator(loaded(tiny), None, runtime="compiled-fp32")
    gens = [SpeculativeGenerator(loaded(tiny), d, "fixed", {"k": 3}, runtime="compiled")
            for d in (native, module)]
    accepted = rejected = 0
    for i in range(3):
        want = plain.generate(prompt_ids(i), max_new_tokens=24).token_ids
        a, b = (g.generate(prompt_ids(i), max_new_tokens=24) for g in gens)
        assert a.token_ids == b.token_ids == want
        assert (a.stats.accepted_tokens, a.stats.drafted_tokens) == (b.stats.accepted_tokens,
                                                                     b.stats.drafted_tokens)
        accepted += a.stats.accepted_tokens
        rejected += a.stats.drafted_tokens - a.stats.accepted_tokens
    assert accepted > 0 and rejected > 0


def test_subset_draft_eager_forward_and_stored_encoding(tmp_path, monkeypatch):
    """``ADASPEC_DRAFT_ENCODING=stored``: the bf16 file is packed as is (values equal the fp32
    module's, exactly); an eager forward of the natively read draft rebuilds its weights."""
    from adaspec.checkpoints.loader import load_model
    from adaspec.runtime.native import BF16, NativeWeights

    monkeypatch.setenv("ADASPEC_DRAFT_ENCODING", "stored")
    _save_subset_draft(make_model("llama", seed=8, hidden=64, layers=2), tmp_path / "d", torch.bfloat16)
    new = load_model(str(tmp_path / "d"), role="draft", runtime="compiled")
    old = load_model(str(tmp_path / "d"), dtype="fp32", role="draft", runtime="eager")
    nw = NativeWeights.existing(new.model)
    assert int(nw.mats[0, 0]) == BF16
    x = torch.tensor([prompt_ids(0)[:12]])
    with torch.no_grad():
        assert torch.equal(new.model(x).logits, old.model(x).logits)


def test_truncated_subset_draft_is_one_line_error_naming_the_file(tmp_path):
    from adaspec.checkpoints.loader import load_model

    _save_subset_draft(make_model("llama", seed=7, hidden=64, layers=2), tmp_path / "d", torch.bfloat16)
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "d"), role="draft", runtime="compiled")
    msg = str(err.value)
    assert "\n" not in msg and str(weights) in msg and "cannot load draft model" in msg


def test_vocab_fingerprint_is_remembered_until_the_vocabulary_grows():
    """One fingerprint per tokenizer object (every generator checks its pair with it), equal
    to the sha256 of the id-ordered pairs, and recomputed after tokens are added."""
    import hashlib

    from conftest import make_tokenizer

    from adaspec.checkpoints.loader import vocab_fingerprint

    def reference(tok) -> str:
        h = hashlib.sha256()
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{i}\t{t}\n".encode())
        return h.hexdigest()

    tok = make_tokenizer()
    first = vocab_fingerprint(tok)
    assert first == reference(tok) == vocab_fingerprint(tok)
    tok.add_tokens(["<extra-token>"])
    assert vocab_fingerprint(tok) == reference(tok) != first
