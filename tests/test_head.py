"""The feature-head drafter (``--draft head:DIR``): lossless on both runtimes, its two
cores agree, the engine hands it the target's features, wrong pairs are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded, make_model, prompt_ids

from adaspec.api import SpeculativeGenerator
from adaspec.checkpoints.feature_head import FeatureHead, body_config, load_head, save_head
from adaspec.errors import ModelLoadError


def make_head(target: torch.nn.Module, path, token_ids: list[int] | None = None, seed: int = 0,
              scale: float = 0.3) -> FeatureHead:
    """A random head for ``target`` (large init: peaked, varied drafts), saved to ``path``."""
    torch.manual_seed(seed)
    vocab = target.config.vocab_size
    ids = torch.tensor(token_ids if token_ids is not None else list(range(vocab)))
    head = FeatureHead(body_config(target.config), ids, {"target": "tiny", "target_vocab_sha256": None})
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, scale / p.shape[1] ** 0.5)
    save_head(head, path)
    return head


@pytest.fixture(scope="module")
def target():
    return loaded(make_model("llama", seed=0))


@pytest.mark.parametrize("runtime", ["compiled", "eager"])
@pytest.mark.parametrize("policy,args", [("fixed", {"k": 4}), ("heuristic", {"k": 2}),
                                          ("entropy", {"h": 2.0, "k_max": 6})])
def test_greedy_identical_to_plain(target, tmp_path, runtime, policy, args):
    make_head(target.model, tmp_path / "head", token_ids=list(range(0, 262, 2)))
    spec = SpeculativeGenerator(target, f"head:{tmp_path / 'head'}", policy, args, runtime=runtime)
    plain = SpeculativeGenerator(target, None, "fixed", runtime=runtime)
    drafted = 0
    for i in range(4):
        a = spec.generate(prompt_ids(i), max_new_tokens=40)
        b = plain.generate(prompt_ids(i), max_new_tokens=40)
        assert a.token_ids == b.token_ids, f"prompt {i}"
        drafted += a.stats.drafted_tokens
        assert a.stats.target_forwards <= b.stats.target_forwards
    assert drafted > 0


@pytest.mark.parametrize("runtime", ["compiled", "eager"])
@pytest.mark.parametrize("policy,args", [("fixed", {"k": 3}), ("tree", {})])
def test_engine_hands_the_targets_features_by_position(target, tmp_path, runtime, policy, args):
    """After a generation the drafter holds f_p for every committed position but the last,
    equal to a teacher-forced target pass over the final text (chains and trees)."""
    from test_distribution import BranchEvery

    make_head(target.model, tmp_path / "h", token_ids=list(range(0, 262, 3)))
    pol = BranchEvery(3, 1) if policy == "tree" else policy
    gen = SpeculativeGenerator(target, f"head:{tmp_path / 'h'}", pol, args, runtime=runtime)
    out = gen.generate(prompt_ids(1), max_new_tokens=25)
    ids = prompt_ids(1) + out.token_ids
    drafter = gen.engine.drafter
    assert drafter.known == len(ids) - 1
    with torch.no_grad():
        want = target.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1]
    torch.testing.assert_close(drafter.feats[: drafter.known], want, rtol=1e-4, atol=1e-4)
    if policy == "tree":
        assert out.stats.branch_rounds > 0


def test_compiled_core_matches_eager_core(target, tmp_path):
    from adaspec.drafters.head import HeadDrafter

    head = make_head(target.model, tmp_path / "h", token_ids=list(range(100)))
    feats = torch.randn(12, head.hidden_size)
    toks = prompt_ids(2)[:12]
    outs = []
    for rt in ("eager", "compiled"):
        dr = HeadDrafter(load_head(tmp_path / "h"), target.model, 262, rt)
        dr.reset()
        sub, f, _ = dr.core.step(toks[1:9], feats[:8], 1)  # rows 1..8 in one forward
        sub2, f2, _ = dr.core.step([toks[9]], f[None], 9)  # then one row on its own estimate
        outs.append((sub, f, sub2, f2))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_wrong_pair_is_refused(target, tmp_path):
    other = make_model("llama", hidden=32, seed=1)
    make_head(other, tmp_path / "h")
    with pytest.raises(ModelLoadError, match="hidden size 32"):
        SpeculativeGenerator(target, f"head:{tmp_path / 'h'}", "fixed")
    save = load_head(tmp_path / "h")
    save.meta["target_vocab_sha256"] = "abc"
    save_head(save, tmp_path / "h2")
    with pytest.raises(ModelLoadError, match="trained for"):
        load_head(tmp_path / "h2", target_vocab_sha="def")
    with pytest.raises(ModelLoadError, match="holds no adaspec feature head"):
        SpeculativeGenerator(target, f"head:{tmp_path / 'nothing'}", "fixed")


def test_cli_refuses_a_missing_head_in_one_line(tmp_path, capsys):
    from adaspec.cli import main

    code = main(["generate", "hi", "--draft", f"head:{tmp_path / 'none'}", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "feature head" in err[0]


def test_training_step_learns(target):
    """A few optimiser steps of train-head's loss on one batch reduce it (features of the
    tiny target itself)."""
    from adaspec.train.head import HeadLoss, _rows

    model = target.model
    torch.manual_seed(0)
    toks = torch.randint(0, 256, (4, 24), dtype=torch.int32)
    toks[1, 20:] = -1  # padding
    with torch.no_grad():
        feats = model.model(input_ids=toks.clamp(min=0).long()).last_hidden_state
    head = FeatureHead(body_config(model.config), torch.arange(262))
    w = model.get_output_embeddings().weight.detach()
    loss_fn = HeadLoss(w, kl_weight=0.5)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    emb = model.get_input_embeddings().weight.detach()
    first = None
    for _ in range(30):
        loss, _ = _rows(head, emb, toks, feats, loss_fn, 0.5)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_draft_cost_reports_one_step_of_each(target, tmp_path):
    from adaspec.bench.draft_cost import measure

    make_head(target.model, tmp_path / "h")
    row = measure(f"head:{tmp_path / 'h'}", target=target, context=40, repeats=3)
    assert row["runtime"] == "compiled" and row["target_ms"] > 0 and row["draft_ms"] > 0
    assert row["ratio"] == pytest.approx(row["draft_ms"] / row["target_ms"], rel=0.05, abs=1e-3)


def test_bench_runs_every_method_on_a_head_given_as_the_runs_draft(tmp_path):
    """``bench --draft head:DIR``: the head is loaded once and every policy method drafts with it
    (with and without the n-gram source), token-identical to ``ar``."""
    from test_bench import make_tiny_pair

    from adaspec.bench.datasets import Prompt
    from adaspec.bench.runner import BenchConfig, run_benchmark
    from adaspec.checkpoints.loader import load_model

    target = load_model(str(make_tiny_pair(tmp_path / "tiny")[0]), dtype="fp32")  # with a tokenizer
    make_head(target.model, tmp_path / "head", token_ids=list(range(0, target.vocab_size, 2)))
    cfg = BenchConfig(methods="ar,fixed:4,fixed:4:draft=model+ngram", dataset="tiny", split="test",
                      max_new_tokens=20, dtype="fp32", warmup=0, repeats=1, out=str(tmp_path / "b"),
                      target="tiny", draft=f"head:{tmp_path / 'head'}", progress=False, memory=False,
                      command="test")
    prompts = [Prompt("HumanEval/8", "code", ["def add(a, b):\n"], raw=True)]
    summary = run_benchmark(cfg, prompts=prompts, target=target)
    for m in ("fixed:4", "fixed:4:draft=model+ngram"):
        assert summary["methods"][m]["identical_to_ar_rate"] == 1.0
        assert summary["methods"][m]["draft_forwards_per_token"] > 0
    assert summary["meta"]["draft"].startswith("head:")


def test_feature_shards_resume_and_hold_the_targets_features(tmp_path):
    """Both ways of making head data (``extract``: teacher-forced texts; ``greedy_extract``:
    the target's own continuations) resume by text count and store, row by row, the
    target's last hidden states over exactly the text."""
    from test_bench import make_tiny_pair

    from adaspec.bench.datasets import Prompt
    from adaspec.checkpoints.loader import load_model
    from adaspec.train import head_data as hd
    from adaspec.train.draft_data import greedy_batch

    target = load_model(str(make_tiny_pair(tmp_path / "tiny")[0]), dtype="fp32")
    model, tok = target.model, target.tokenizer

    def check(dir_, texts):  # rows in any order (extract sorts a window's texts by length)
        toks, feats = hd.load_shards(dir_)
        rows = [t[t >= 0].tolist() for t in toks]
        assert sorted(rows) == sorted(texts)
        for f, text in zip(feats, rows, strict=True):
            with torch.no_grad():
                want = model.model(input_ids=torch.tensor([text])).last_hidden_state[0]
            torch.testing.assert_close(f[: len(text)].float(), want, atol=2e-2, rtol=2e-2)

    texts = [[5, 9, 3, 70, 12], [17, 2, 8], [40, 41, 42, 43, 44, 45, 46], [99, 3]]
    assert hd.extract(model, texts[:2], tmp_path / "tf", minutes=60, progress=False) == 8
    total = hd.extract(model, texts, tmp_path / "tf", minutes=60, shard_tokens=1, progress=False)
    assert total == sum(map(len, texts))
    check(tmp_path / "tf", texts)

    prompts = [Prompt(f"p{i}", "code", [f"def f{i}(x, y):\n    return"], raw=True) for i in range(5)]
    hd.greedy_extract(model, tok, prompts[:3], tmp_path / "gr", minutes=60, batch_size=2,
                      max_new_tokens=6, shard_tokens=1, progress=False)
    hd.greedy_extract(model, tok, prompts, tmp_path / "gr", minutes=60, batch_size=2,
                      max_new_tokens=6, progress=False)
    want = []
    for p in prompts:  # one prompt at a time: the continuation does not depend on the batch
        ids = tok.encode(p.turns[0], add_special_tokens=False)
        resp = greedy_batch(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 6,
                            tok.eos_token_id)[0]
        want.append(ids + resp[:-1])
    check(tmp_path / "gr", want)
    assert (tmp_path / "gr" / "progress.txt").read_text().split()[0] == "5"
