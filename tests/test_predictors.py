"""Predictors: checkpoint round trip and errors, online tau, calibration metrics,
attention probe, trace collection (resume) and collect -> train -> generate end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import layered_pair as tiny_pair
from conftest import rand_prompts as prompts

from adaspec.api import SpeculativeGenerator
from adaspec.errors import InvalidArgumentError, PolicyArgumentError
from adaspec.predictors.costs import OnlineTau
from adaspec.predictors.models import Predictor, build_head, load_predictor, save_predictor
from adaspec.train.calibration import auc, brier, ece, fit_platt
from adaspec.train.predictor import train_predictor
from adaspec.train.traces import collect, load_traces


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def traces(pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tr") / "traces"
    collect(*pair, prompts(15, seed=11), out, k=5, max_new_tokens=20, shard_size=6, attention=True,
            progress=False)
    return out


@pytest.mark.parametrize("kind", ["specdecpp", "context", "ldlp"])
def test_save_load_round_trip(tmp_path, kind):
    cfg = {"specdecpp": {"d": 16}, "context": {"d": 16, "n_scalar": 8},
           "ldlp": {"d_t": 16, "d_e": 16, "k_max": 6}}[kind]
    head = build_head(kind, cfg)
    if kind == "ldlp":
        head.fold_embeddings(torch.randn(10, 16))
    meta = {"config": cfg, "pair": {"draft_hidden": 16, "target_hidden": 16}}
    save_predictor(Predictor(kind, head, meta, None, (1.3, -0.2)), tmp_path)
    back = load_predictor(tmp_path, kind)
    assert back.calib == (1.3, -0.2)
    h = torch.randn(3, 16)
    with torch.no_grad():
        if kind == "specdecpp":
            assert torch.equal(head(h), back.head(h))
        elif kind == "context":
            s = torch.randn(3, 8)
            assert torch.equal(head(h, s), back.head(h, s))
        else:
            assert torch.allclose(head.forward_token(h[0], 3), back.head.forward_token(h[0], 3))
    # another kind, a corrupt weights file, a corrupt json: clear errors
    other = "context" if kind != "context" else "specdecpp"
    with pytest.raises(PolicyArgumentError, match="not"):
        load_predictor(tmp_path, other)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PolicyArgumentError, match="corrupt"):
        load_predictor(tmp_path, kind)
    (tmp_path / "predictor.json").write_text("{")
    with pytest.raises(PolicyArgumentError, match="corrupt"):
        load_predictor(tmp_path, kind)


def test_predictor_for_another_pair_is_refused(traces, tmp_path):
    train_predictor(traces, "specdecpp", tmp_path / "p", epochs=2)
    pred = load_predictor(tmp_path / "p", "specdecpp")
    with pytest.raises(PolicyArgumentError, match="hidden size"):
        pred.check_dim("draft", 48)
    t, d = tiny_pair()
    pred.check_pair(t, d)  # same pair: fine
    big_t, big_d = _wide_pair()
    with pytest.raises(PolicyArgumentError, match="train"):
        pred.check_pair(big_t, big_d)
    # the generator refuses it when it is built, before any model runs
    with pytest.raises(PolicyArgumentError, match="hidden size"):
        SpeculativeGenerator(big_t, big_d, "specdecpp", {"predictor": str(tmp_path / "p")})
    SpeculativeGenerator(t, d, "specdecpp", {"predictor": str(tmp_path / "p")})  # the right pair


def _wide_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaspec.checkpoints.loader import LoadedModel

    cfg = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None)
    t = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **cfg)).eval()
    d = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **cfg)).eval()
    return LoadedModel(t, None, "wide-t", 64, 128), LoadedModel(d, None, "wide-d", 64, 128)


def test_online_tau_bounds_and_direction():
    def run(c_d: float, a: float, b: float, acc: int, rounds: int = 60) -> OnlineTau:
        tau = OnlineTau(tau0=0.5, tau_min=0.05, tau_max=0.95)
        for r in range(rounds):
            k = 2 + r % 6  # vary K so the verify slope is identifiable
            m = min(acc, k)
            tau.update(c_d * k, k, a + b * (k + 1), k + 1, m + 1)
        return tau

    cheap = run(c_d=0.001, a=0.03, b=0.001, acc=4)
    dear = run(c_d=0.010, a=0.03, b=0.001, acc=4)
    assert cheap.tau < dear.tau  # costlier draft steps -> higher bar for drafting on
    assert abs(cheap.slope - 0.001) < 1e-4  # the verify slope is recovered
    good = run(c_d=0.004, a=0.03, b=0.001, acc=6)
    bad = run(c_d=0.004, a=0.03, b=0.001, acc=0)
    # a token is worth T = seconds per committed token: when speculation already goes well
    # (T small), one more token must be likelier to pay for its cost (P * T > c_d + b)
    assert good.tau > bad.tau
    steep = run(c_d=0.004, a=0.03, b=0.004, acc=4)
    flat = run(c_d=0.004, a=0.03, b=0.0, acc=4)
    assert steep.tau > flat.tau  # dearer verification per token -> higher bar
    for t in (cheap, dear, good, bad, run(1.0, 0.0, 0.0, 0), run(0.0, 1.0, 0.0, 8)):
        assert all(0.05 <= x <= 0.95 for x in t.trace)
        assert t.tau_keep <= t.tau
    # converges: the last dozen rounds barely move
    assert max(dear.trace[-12:]) - min(dear.trace[-12:]) < 0.05
    fresh = OnlineTau(tau0=0.4)
    assert fresh.tau == 0.4
    # once identified, the slope survives a stretch of constant draft lengths
    for _ in range(40):
        dear.update(0.010 * 2, 2, 0.03 + 0.001 * 3, 3, 2)
    assert abs(dear.slope - 0.001) < 2e-4


def test_calibration_metrics():
    y = torch.tensor([0, 0, 1, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    assert brier(torch.tensor([0.0, 0.0, 1.0, 1.0]), y) == 0.0
    assert ece(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, generator=g)
    lab = (torch.rand(4000, generator=g) < torch.sigmoid(0.5 * z + 0.3)).float()
    a, b = fit_platt(z, lab)
    assert a == pytest.approx(0.5, abs=0.1) and b == pytest.approx(0.3, abs=0.1)


def test_attention_probe_matches_eager(pair):
    from adaspec.runtime.attention import AttentionProbe
    from adaspec.runtime.eager import ModelRunner

    target, _ = tiny_pair()
    model = target.model
    model.set_attn_implementation("eager")
    probe = AttentionProbe(model)
    runner = ModelRunner(model)
    runner.reset()
    seq = prompts(1)[0] * 3
    out = runner.forward(seq, 1, attentions=True)
    want = float(out.attentions[:, -1].max(dim=-1).values.mean())
    assert probe.concentration(runner.cache) == pytest.approx(want, abs=1e-5)
    probe.remove()


def test_collect_format_and_resume(pair, traces, tmp_path):
    meta, t = load_traces(traces)
    assert meta["complete"] and meta["features"]["attention"]
    n, r = t["tok_match"].numel(), t["round_k"].numel()
    assert t["tok_hidden"].shape == (n, 32) and t["round_hidden"].shape == (r, 32)
    assert int(t["tok_tried"].sum()) >= int(t["round_accepted"].sum())
    assert ((t["tok_soft"] >= 0) & (t["tok_soft"] <= 1)).all()
    assert (t["tok_scalars"][:, 5] > 0).all()  # attention concentration recorded
    # resume: a directory with finished shards continues where it stopped
    out = tmp_path / "tr"
    ps = prompts(10, seed=5)
    collect(*pair, ps[:10], out, k=4, max_new_tokens=8, shard_size=4, progress=False)
    first = json.loads((out / "meta.json").read_text())
    meta2 = collect(*pair, ps, out, k=4, max_new_tokens=8, shard_size=4, progress=False)
    assert meta2["shards"] == first["shards"]
    with pytest.raises(InvalidArgumentError, match="another"):
        collect(*pair, ps, out, k=5, max_new_tokens=8, shard_size=4, progress=False)


def test_collect_train_generate_end_to_end(pair, traces, tmp_path):
    target, draft = pair
    plain = SpeculativeGenerator(target, None)
    for kind in ("specdecpp", "context", "ldlp"):
        pred = train_predictor(traces, kind, tmp_path / kind, epochs=5)
        assert (tmp_path / kind / "predictor.json").is_file()
        if kind != "ldlp":
            assert (tmp_path / kind / "reliability.png").is_file()
            assert "auc" in json.loads((tmp_path / kind / "calibration.json").read_text())["raw"]
        assert pred.meta["pair"]["draft"] == "tiny-draft"
        gen = SpeculativeGenerator(target, draft, kind, {"predictor": str(tmp_path / kind)})
        for p in prompts(2, seed=3):
            res = gen.generate(p, max_new_tokens=24)
            assert res.token_ids == plain.generate(p, max_new_tokens=24).token_ids
        if kind == "context":  # trained with attention -> the policy asks the drafter for it
            assert gen.engine.policy.needs.attention
            assert "tau_trace" in res.stats.extra


def test_cli_parsers(tmp_path, pair):
    from adaspec.train.predictor_cli import add_collect_parser, add_train_predictor_parser

    target, draft = pair
    target.model.save_pretrained(tmp_path / "t")
    draft.model.save_pretrained(tmp_path / "d")
    (tmp_path / "prompts.txt").write_text("\n".join(" ".join(map(str, p)) for p in prompts(8)))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_collect_parser(sub)
    add_train_predictor_parser(sub)
    args = parser.parse_args(["collect", "--target", str(tmp_path / "t"), "--draft", str(tmp_path / "d"),
                              "--dataset", "humaneval:test", "--out", str(tmp_path / "x")])
    with pytest.raises(InvalidArgumentError, match="test split"):
        args.func(args)
    args = parser.parse_args(["train-predictor", "--kind", "ldlp", "--traces", str(tmp_path / "none"),
                              "--out", str(tmp_path / "o")])
    with pytest.raises(InvalidArgumentError, match="trace"):
        args.func(args)


def test_replay_traces_equal_engine_traces_on_tried_positions(pair, tmp_path):
    """collect --replay records exactly what the engine records at every tried position."""
    ps = prompts(6, seed=21)
    collect(*pair, ps, tmp_path / "eng", k=4, max_new_tokens=16, shard_size=3, attention=True,
            progress=False)
    collect(*pair, ps, tmp_path / "rep", k=4, max_new_tokens=16, shard_size=3, attention=True,
            progress=False, replay=True, batch_size=4)
    _, e = load_traces(tmp_path / "eng")
    meta, r = load_traces(tmp_path / "rep")
    assert meta["args"]["replay"] and bool(r["tok_tried"].all())
    keep_r = e["round_k"] > 0
    for key in ("round_prompt", "round_accepted", "round_token"):
        assert torch.equal(e[key][keep_r], r[key]), key
    assert torch.allclose(e["round_hidden"][keep_r].float(), r["round_hidden"].float(), atol=1e-2)
    tried = e["tok_tried"].bool()
    assert int(tried.sum()) == r["tok_match"].numel() and r["tok_match"].numel() > 20
    for key in ("tok_match", "tok_pos"):
        assert torch.equal(e[key][tried], r[key]), key
    assert 0 < int(r["tok_match"].sum()) < r["tok_match"].numel()  # both labels occur
    assert torch.allclose(e["tok_scalars"][tried], r["tok_scalars"], atol=1e-4)
    assert torch.allclose(e["tok_hidden"][tried].float(), r["tok_hidden"].float(), atol=1e-2)
    assert torch.allclose(e["tok_soft"][tried], r["tok_soft"], atol=1e-4)


@pytest.mark.parametrize("k", [2, 4])
def test_entropy_and_top_fast_path_equals_direct(k):
    """The 64-block path (V % 64 == 0 and V >= 256 k, as for the real 49,152 vocabulary) gives
    the entropy and top-k of the direct formulas, with -inf padding (reduced-vocabulary draft)
    and with every top-k token inside one block."""
    from adaspec.predictors.features import entropy_and_top

    g = torch.Generator().manual_seed(0)
    v = 64 * 64
    assert v % 64 == 0 and v >= 64 * 4 * k  # the fast path's condition
    for case in ("dense", "padded", "one-block"):
        logits = torch.randn(v, generator=g) * 3
        if case == "padded":
            logits[torch.randperm(v, generator=g)[: v // 2]] = float("-inf")
        if case == "one-block":
            logits[70:70 + k] = 12.0 + torch.arange(k)
        ent, top = entropy_and_top(logits, k)
        p = torch.softmax(logits.double(), -1)
        nz = p[p > 0]
        assert ent == pytest.approx(float(-(nz * nz.log()).sum()), rel=1e-5)
        assert torch.allclose(top.double(), p.topk(k).values, rtol=1e-5, atol=1e-7)


def test_one_warm_started_average_and_one_slope_rule():
    """WarmEma is the mean of the first 1/alpha values, then an EMA; every cost model uses
    it, so a quantity seen for the first time late (a draft cost after rounds that drafted
    nothing) starts at its first value instead of half-way from zero (the old OnlineTau)."""
    from adaspec.predictors.costs import DecayedLine, WarmEma

    e = WarmEma()
    for x in (1.0, 2.0, 3.0, 4.0):
        e.add(x, 0.25)
    assert e.value == pytest.approx(2.5)
    e.add(10.0, 0.25)
    assert e.value == pytest.approx(0.75 * 2.5 + 0.25 * 10.0)
    tau = OnlineTau()
    tau.update(0.0, 0, 0.02, 1, 1)  # a round that drafted nothing
    tau.update(0.004, 2, 0.02, 3, 2)
    assert tau.c_d == pytest.approx(0.002)
    line = DecayedLine()
    for _ in range(5):
        line.add(4.0, 0.01, 0.9)
    assert line.slope() is None  # n never varied: not identified
    for n in (1.0, 8.0, 1.0, 8.0):
        line.add(n, 0.01 + 0.001 * n, 0.9)
    b = line.slope()
    assert b is not None and b > 0
    while line.moments()[2] >= 0.25:
        line.add(4.0, 0.3, 0.9)  # n stops varying ...
    b = line.slope()
    line.add(4.0, 0.9, 0.9)
    assert b is not None and line.slope() == b  # ... the last identified slope is kept


def test_collect_writes_the_target_embedding_after_a_compiled_release(tmp_path):
    """A compiled runtime frees the module's big weights; the trace directory's target
    embedding (read by ldlp training) must still hold the real matrix, not an empty one."""
    pytest.importorskip("numba")
    from safetensors.torch import load_file

    from adaspec.runtime.native import NativeWeights

    target, draft = tiny_pair()
    want = target.model.get_input_embeddings().weight.detach().to(torch.float16).clone()
    NativeWeights.of(target.model, release=True)
    assert target.model.get_input_embeddings().weight.numel() == 0  # released, as under load_model
    collect(target, draft, prompts(3, seed=2), tmp_path / "t", k=3, max_new_tokens=6, shard_size=3,
            runtime="compiled", progress=False)
    got = load_file(str(tmp_path / "t" / "target_embed.safetensors"))["embed"]
    assert torch.equal(got, want)
