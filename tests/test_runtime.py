"""The compiled CPU runtime: same numbers as eager, batch invariance, caches, trees, errors."""

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

from adaspec import cli
from adaspec.api import SpeculativeGenerator
from adaspec.errors import InvalidArgumentError
from adaspec.runtime import make_runner, resolve_runtime
from adaspec.runtime.compiled_runner import CompiledRunner
from adaspec.runtime.eager import ModelRunner


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", seed=4, layers=3)


def test_compiled_forward_matches_eager(llama):
    e, c = ModelRunner(llama), CompiledRunner(llama)
    seq = prompt_ids(2) + prompt_ids(0)
    for r in (e, c):
        r.reset()
    oe, oc = e.forward(seq, 4, hidden=True), c.forward(seq, 4, hidden=True)
    torch.testing.assert_close(oc.logits, oe.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(oc.hidden, oe.hidden, rtol=1e-4, atol=1e-4)
    # a second forward on top of the cache (one new token) agrees as well
    oe, oc = e.forward(seq + [7], 1), c.forward(seq + [7], 1)
    torch.testing.assert_close(oc.logits, oe.logits, rtol=1e-4, atol=1e-4)


def test_compiled_concentration_matches_eager_probe(llama):
    e, c = ModelRunner(llama), CompiledRunner(llama)
    seq = prompt_ids(1)
    for r in (e, c):
        r.reset()
        r.forward(seq, 1, concentration=True)
    assert c.attention_concentration() == pytest.approx(e.attention_concentration(), abs=1e-5)
    assert 0 < c.attention_concentration() <= 1


def test_batch_invariance_bitwise(llama):
    """Rows of one forward over T tokens equal T one-token forwards bit for bit: the reason
    greedy verification under this runtime cannot disagree with its own plain decoding."""
    c = CompiledRunner(llama)
    c.reset()
    ctx, extra = prompt_ids(2), [5, 99, 12, 200, 31, 7, 64, 3, 18]
    c.prefill(ctx)
    many = c.forward(ctx + extra, len(extra)).logits
    c.rollback(ctx)
    for i in range(len(extra)):
        one = c.forward(ctx + extra[: i + 1], 1).logits[0]
        assert torch.equal(one, many[i]), f"row {i}"


def test_tree_forward_and_keep_path(llama):
    """A tree verify gives each node the logits of its own path, and keep_path leaves the
    cache exactly as a fresh run over the accepted path."""
    c, e = CompiledRunner(llama), ModelRunner(llama)
    committed = prompt_ids(0)
    nodes, parents = [11, 12, 13, 40, 41], [-1, 0, 1, 0, -1]  # chain 11-12-13, 40 under 11, 41 under root
    for r in (c, e):
        r.reset()
        r.prefill(committed[:-1])
    tc = c.forward_tree(committed, nodes, parents).logits
    te = e.forward_tree(committed, nodes, parents).logits
    torch.testing.assert_close(tc, te, rtol=1e-4, atol=1e-4)
    path = [0, 3]  # root -> 11 -> 40
    c.keep_path(len(committed), nodes, path)
    want = committed + [11, 40]
    assert c.tokens == want
    fresh = CompiledRunner(llama)
    fresh.reset()
    a = c.forward(want + [9], 1).logits
    b = fresh.forward(want + [9], 1).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_identity_compiled_and_equal_to_eager(k):
    target = loaded(make_model("llama", seed=0))
    draft = loaded(perturbed(target.model, 0.6))
    gen = SpeculativeGenerator(target, draft, "fixed", {"k": k}, runtime="compiled")
    assert gen.runtime == "compiled" and "compiled" in gen.runtime_note
    plain = SpeculativeGenerator(target, None, runtime="compiled")
    eager = SpeculativeGenerator(target, None, runtime="eager")
    accepted = rejected = 0
    for i in range(4):
        ref = plain.generate(prompt_ids(i), max_new_tokens=30)
        out = gen.generate(prompt_ids(i), max_new_tokens=30)
        assert out.token_ids == ref.token_ids
        # fp32: the two runtimes round differently only in the last bits; these random
        # models have no near-ties on these prompts
        assert ref.token_ids == eager.generate(prompt_ids(i), max_new_tokens=30).token_ids
        accepted += out.stats.accepted_tokens
        rejected += out.stats.drafted_tokens - out.stats.accepted_tokens
    assert accepted > 0 and rejected > 0


def test_reduced_vocabulary_draft_on_compiled_runtime():
    """A SubsetLMHead draft: q = 0 outside its subset on both runtimes, same distribution."""
    from transformers import LlamaConfig

    from adaspec.checkpoints.subset_draft import build_subset_draft

    cfg = LlamaConfig(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    draft = build_subset_draft(cfg, torch.arange(0, 262, 3)).eval()
    e, c = ModelRunner(draft), CompiledRunner(draft)
    for r in (e, c):
        r.reset()
    le, lc = e.forward(prompt_ids(0), 2).logits, c.forward(prompt_ids(0), 2).logits
    assert torch.equal(torch.isinf(le), torch.isinf(lc))
    fin = ~torch.isinf(le)
    torch.testing.assert_close(lc[fin], le[fin], rtol=1e-4, atol=1e-4)


def test_auto_and_compiled_on_unsupported_architectures(tokenizer):
    gpt2 = make_model("gpt2")
    assert resolve_runtime("auto", gpt2)[0] == "eager"
    assert "Llama family" in resolve_runtime("auto", gpt2)[1]
    with pytest.raises(InvalidArgumentError, match="compiled does not support architecture 'gpt2'"):
        resolve_runtime("compiled", gpt2)
    with pytest.raises(InvalidArgumentError, match="unknown runtime"):
        SpeculativeGenerator(loaded(gpt2, tokenizer), None, runtime="fast")
    bf16 = make_model("llama").to(torch.bfloat16)
    assert resolve_runtime("auto", bf16)[0] == "compiled"  # native bf16 weights, fp32 arithmetic
    with pytest.raises(InvalidArgumentError, match="compiled-fp32 does not support dtype bfloat16"):
        resolve_runtime("compiled-fp32", bf16)
    assert resolve_runtime("auto", make_model("llama").to(torch.float64))[0] == "eager"
    assert isinstance(make_runner(make_model("llama"), "compiled"), CompiledRunner)


def test_cli_compiled_on_unsupported_model_is_one_line_exit_2(tmp_path, capsys):
    from conftest import make_tokenizer

    model_dir = tmp_path / "gpt2"
    make_model("gpt2").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    capsys.readouterr()
    argv = ["generate", "hi", "--target", str(model_dir), "--draft", "none", "--runtime", "compiled"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--runtime compiled does not support architecture 'gpt2'" in err and "\n" not in err


def test_kernel_cache_is_reused_and_a_corrupt_one_rebuilt(tmp_path, llama):
    """First run compiles into $NUMBA_CACHE_DIR (with a progress line), the second loads it,
    and a corrupted cache is rebuilt, never trusted: the logits stay the same."""
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from conftest import make_model\n"
        "from adaspec.runtime.compiled_runner import CompiledRunner\n"
        "r = CompiledRunner(make_model('llama', seed=4, layers=3)); r.reset()\n"
        "print(float(r.forward([1, 2, 3], 1).logits.sum()))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def run() -> tuple[str, str]:
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.strip(), p.stderr

    first, err1 = run()
    assert "compiling the CPU runtime kernels" in err1
    files = [f for f in (tmp_path / "numba").rglob("*") if f.is_file()]
    assert any(f.suffix == ".nbi" for f in files)
    second, err2 = run()
    assert second == first and "compiling" not in err2
    others = [tmp_path / "numba" / "runtime_othercheckout" / "qkernels.forward_layers-1.py311.nbi",
              files[0].parent / "batch_kernels.other-1.py311.nbi"]  # another checkout's, another module's
    for f in others:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"keep")
    for f in files:
        f.write_bytes(b"\x00garbage" * 3)
    third, err3 = run()
    assert third == first and "rebuilding" in err3
    assert all(f.read_bytes() == b"keep" for f in others)  # the shared cache is not wiped
    assert np.isfinite(float(first))


def test_a_failed_cache_load_removes_only_this_checkouts_kernel_entries(tmp_path, monkeypatch, capsys):
    """ensure_compiled after a load that raises: the kernel modules' files in their own cache
    folder go (every line-number version), nothing else (batch_kernels.*, other checkouts)."""
    from adaspec.runtime import compiled_runner as cr

    mine, other = tmp_path / "runtime_mine", tmp_path / "runtime_other"
    names = ["qkernels.forward_layers-459.py311.nbi", "qkernels.forward_layers-459.py311.1.nbc",
             "qkernels.forward_layers-401.py311.nbi", "kernels.linear-3.py311.nbi",
             "batch_kernels.attend-9.py311.nbi", "batch_kernels.attend-9.py311.1.nbc"]
    for folder in (mine, other):
        folder.mkdir()
        for n in names:
            (folder / n).write_bytes(b"x")
    calls = []

    def warm_up(kernels) -> None:
        calls.append(sorted(f.name for f in mine.iterdir()))
        if len(calls) == 1:
            raise EOFError("a truncated cache file")

    monkeypatch.setattr(cr, "_compiled", False)
    monkeypatch.setattr(cr, "_warm_up", warm_up)
    monkeypatch.setattr(cr, "cache_folders", lambda modules: {mine})
    cr.ensure_compiled()
    assert calls[1] == ["batch_kernels.attend-9.py311.1.nbc", "batch_kernels.attend-9.py311.nbi"]
    assert sorted(f.name for f in other.iterdir()) == sorted(names)
    assert "removed 4 cache files" in capsys.readouterr().err


def test_cache_folders_are_this_checkouts():
    """The folders numba caches these kernels in lie under the cache directory, one per
    source folder (this checkout's runtime package)."""
    from adaspec.runtime import compiled_runner as cr
    from adaspec.runtime import kernels

    folders = cr.cache_folders(cr.kernel_modules())
    assert len(folders) == 1
    folder = folders.pop()
    assert folder.parent == Path(kernels.CACHE_DIR) and folder.name.startswith("runtime_")


def test_owned_model_keeps_one_copy_and_rebuilds_eager_weights(tmp_path, tokenizer):
    """A model adaspec loaded itself gives its HF weights up to the packed copy (memory);
    the first eager forward rebuilds them exactly, so eager results do not change."""
    from adaspec.checkpoints.loader import load_model

    model_dir = tmp_path / "tiny"
    make_model("llama", seed=5).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ref = SpeculativeGenerator(load_model(str(model_dir), dtype="fp32"), None, runtime="eager")
    want = ref.generate(prompt_ids(1), max_new_tokens=12).token_ids
    owned = load_model(str(model_dir), dtype="fp32")
    assert owned.owned
    fast = SpeculativeGenerator(owned, None, runtime="compiled")
    q = owned.model.model.layers[0].self_attn.q_proj.weight
    assert q.numel() == 0  # released: the packed panels are the only copy
    assert fast.generate(prompt_ids(1), max_new_tokens=12).token_ids == want
    eager = SpeculativeGenerator(owned, None, runtime="eager")
    assert eager.generate(prompt_ids(1), max_new_tokens=12).token_ids == want
    assert q.numel() > 0  # rebuilt by the first eager forward
    torch.testing.assert_close(q, ref.target.model.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    assert fast.generate(prompt_ids(1), max_new_tokens=12).token_ids == want


@pytest.mark.parametrize("native", [False, True], ids=["compiled-fp32", "compiled"])
def test_kv_cache_starts_small_and_grows_without_changing_logits(llama, native):
    """A runner's cache starts at 64 slots in untouched zero pages and doubles as the context
    grows; the logits equal those of a runner whose cache had every slot from the start."""
    model = copy.deepcopy(llama)
    small, big = CompiledRunner(model, native=native), CompiledRunner(model, native=native)
    assert small.kt.shape[-1] == 64 and not small.kt.any() and not small.vc.any()
    big.kt, big.vc = big.lean.new_cache(big.capacity)  # 256 positions
    seq = [(5 * i + 3) % 250 for i in range(150)]
    for r in (small, big):
        r.reset()
        r.prefill(seq[:40])
    for end in (41, 70, 100, 150):  # grows at 64 and 128 slots
        a, b = small.forward(seq[:end], 1).logits, big.forward(seq[:end], 1).logits
        assert torch.equal(a, b), end
    assert small.kt.shape[-1] == big.kt.shape[-1] == big.capacity == 256


def test_rope_tables_are_shared_between_models_of_one_geometry(llama):
    """Target and draft with the same rotary frequencies hold one copy of HF's cos / sin."""
    from adaspec.runtime.compiled import rope_tables

    a = rope_tables(llama, 64)
    b = rope_tables(make_model("llama", seed=9, layers=1), 64)  # same geometry, other weights
    assert a[0] is b[0] and a[1] is b[1]
    cos, sin = llama.model.rotary_emb(torch.zeros(1), torch.arange(64)[None])
    assert np.array_equal(a[0], cos[0].numpy()) and np.array_equal(a[1], sin[0].numpy())
    other = make_model("llama", seed=9, hidden=64, layers=1)  # another head size: its own tables
    assert rope_tables(other, 64)[0].shape[1] != a[0].shape[1]
