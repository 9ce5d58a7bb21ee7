"""The engine-free core of the vLLM proposers, driven by a simulated batched engine.

The simulated engine keeps vLLM's persistent-batch layout (rows, compaction when a
request leaves, a [rows, max_len] committed-token table) and verifies drafts greedily
against a deterministic "target" (each request's true continuation is known).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from adaspec.integrations.adaptive import AdaptiveNgram, RequestTracker, StepCost
from adaspec.integrations.vllm import AdaspecNgramFixedProposer, AdaspecNgramProposer, speculative_config

MAX_LEN = 512


class FakeEngine:
    """Rows of requests; ``step(drafts)`` verifies and commits like vLLM does."""

    def __init__(self, truths: list[list[int]], prompt_len: int, max_new: int, max_rows: int) -> None:
        self.truths, self.prompt_len, self.max_new = truths, prompt_len, max_new
        self.pending = list(range(len(truths)))
        self.rows: list[int] = []  # request id per row
        self.tokens = np.zeros((max_rows, MAX_LEN), dtype=np.int32)
        self.n = np.zeros(max_rows, dtype=np.int32)
        self.max_rows = max_rows
        self.outputs: dict[int, list[int]] = {}

    def _admit(self) -> list[list[int]]:
        sampled = []
        while self.pending and len(self.rows) < self.max_rows:
            r = self.pending.pop(0)
            i = len(self.rows)
            self.rows.append(r)
            t = self.truths[r]
            self.tokens[i, :self.prompt_len + 1] = t[:self.prompt_len + 1]  # prefill + 1 sampled
            self.n[i] = self.prompt_len + 1
            self.outputs[r] = [t[self.prompt_len]]
        return sampled

    def step(self, drafts: list[list[int]] | None) -> tuple[list[list[int]], int, int]:
        """Verify ``drafts`` (one per row), commit, compact, admit; returns the sampled
        lists of the next propose call, tokens verified and tokens committed."""
        sampled: list[list[int]] = []
        verified = committed = 0
        done = []
        for i, r in enumerate(self.rows):
            d = drafts[i] if drafts else []
            t, n = self.truths[r], int(self.n[i])
            a = 0
            while a < len(d) and d[a] == t[n + a]:
                a += 1
            new = t[n:n + a + 1]
            self.tokens[i, n:n + a + 1] = new
            self.n[i] = n + a + 1
            self.outputs[r].extend(new)
            sampled.append(list(new))
            verified += 1 + len(d)
            committed += len(new)
            if len(self.outputs[r]) >= self.max_new:
                done.append(i)
        for i in sorted(done, reverse=True):  # vLLM-style condense: the last row fills the hole
            last = len(self.rows) - 1
            if i != last:
                self.tokens[i] = self.tokens[last]
                self.n[i] = self.n[last]
                self.rows[i] = self.rows[last]
                sampled[i] = sampled[last]
            self.rows.pop()
            sampled.pop()
        before = len(self.rows)
        self._admit()
        sampled += [[int(self.tokens[i, self.n[i] - 1])] for i in range(before, len(self.rows))]
        return sampled, verified, committed


def periodic(period: int, length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    unit = [rng.randrange(100, 1000) for _ in range(period)]
    return [unit[j % period] for j in range(length)]


def noise(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 160) for _ in range(length)]


def run(core: AdaptiveNgram, engine: FakeEngine, cost=lambda n: 0.04 + 0.005 * n, steps: int = 10_000):
    """Drive ``core`` with ``engine``; the clock advances by ``cost(verified)`` per step."""
    engine._admit()
    sampled = [[int(engine.tokens[i, engine.n[i] - 1])] for i in range(len(engine.rows))]
    now, lengths = 0.0, []
    for _ in range(steps):
        if not engine.rows:
            break
        drafts = core.step(sampled, engine.n, engine.tokens, now)
        assert len(drafts) == len(engine.rows)
        lengths.append([len(d) for d in drafts])
        sampled, verified, _ = engine.step(drafts)
        now += cost(verified)
    return lengths


def test_outputs_and_request_lifecycle_under_compaction():
    truths = [periodic(7 + r, 400, r) for r in range(6)]
    engine = FakeEngine(truths, prompt_len=40, max_new=40 + 10 * 3, max_rows=3)
    core = AdaptiveNgram(k_max=8)
    run(core, engine)
    for r, t in enumerate(truths):  # whatever was drafted, each request got its own truth
        assert engine.outputs[r][:70] == t[40:110]
    rep = core.report()
    assert rep["requests_created"] == len(truths)  # rows moved by compaction kept their state
    assert rep["requests_dropped"] >= len(truths) - 3  # states leave with their requests
    assert rep["live_requests"] <= 3
    assert rep["accepted"] > 0


def test_row_reuse_with_same_length_is_a_new_request():
    tr = RequestTracker()
    tok = np.zeros((1, 32), dtype=np.int32)
    tok[0, :5] = [1, 2, 3, 4, 5]
    states, _ = tr.match_rows([[5]], np.array([5]), tok)
    first = states[0][0]
    tok[0, :6] = [1, 2, 3, 4, 5, 6]
    states, steady = tr.match_rows([[6]], np.array([6]), tok)
    assert states[0] == (first, True) and steady
    tok[0, :7] = [1, 2, 9, 4, 5, 6, 7]  # another request, same first / last tokens, same length
    states, steady = tr.match_rows([[7]], np.array([7]), tok)
    assert states[0][0] is not first and states[0][1] is False and not steady
    assert tr.created == 2 and tr.dropped == 1


def test_predictable_text_drafts_long_and_noise_stops_drafting():
    k = 8
    core = AdaptiveNgram(k_max=k)
    lengths = run(core, FakeEngine([periodic(5, 600, 1)], 30, 300, 1))
    assert np.mean([x[0] for x in lengths[-20:]]) == k  # all accepted: the cap
    core = AdaptiveNgram(k_max=k)
    lengths = run(core, FakeEngine([noise(480, 2)], 30, 420, 1))
    late = [x[0] for x in lengths[-100:]]
    early = [x[0] for x in lengths[:40]]
    assert np.mean(late) < 0.5 * np.mean(early)  # learned: most matches are not drafted
    assert core.report()["matches_not_drafted"] > 0


def test_step_cost_fit_and_tau_grows_with_the_batch():
    rng = random.Random(0)
    c = StepCost()
    for _ in range(300):
        n = rng.randint(1, 12)
        c.update(0.04 + 0.005 * n, n, 2)
    assert c.b == pytest.approx(0.005, rel=1e-3)
    small = c.tau
    for _ in range(300):
        n = rng.randint(8, 40)
        c.update(0.04 + 0.005 * n, n, 12)
    assert c.tau > 2 * small  # a full batch commits more per second: each draft token must earn more


def test_full_batch_drafts_less_than_batch_one():
    truths = [periodic(40, 2000, r) for r in range(8)]  # long period: ~half the early matches miss
    def mean_len(rows: int) -> float:
        core = AdaptiveNgram(k_max=8)
        lengths = run(core, FakeEngine(truths[:rows], 30, 150, rows), cost=lambda n: 0.04 + 0.006 * n)
        return float(np.mean([x for s in lengths[20:] for x in s]))
    assert mean_len(8) < mean_len(1)


def test_max_len_caps_the_draft():
    core = AdaptiveNgram(k_max=8, max_len=40, adaptive=False)
    t = periodic(3, 64, 0)
    tok = np.zeros((1, 64), dtype=np.int32)
    tok[0, :36] = t[:36]
    out = core.step([[t[35]]], np.array([36]), tok, 0.0)
    assert out == [t[36:39]]  # 40 - 36 - 1 tokens


def test_proposer_adapter_and_config():
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4),
                          model_config=SimpleNamespace(max_model_len=MAX_LEN))
    t = periodic(3, 64, 0)
    tok = np.zeros((2, MAX_LEN), dtype=np.int32)
    tok[0, :20] = t[:20]
    p = AdaspecNgramFixedProposer(cfg)
    p.load_model(object())
    out = p.propose([[t[19]], []], np.array([20, 0]), tok, slot_mappings=None)
    assert out == [t[20:24], []]
    assert AdaspecNgramProposer(cfg).report()["k"] == 4
    sc = speculative_config(6)
    assert sc["method"] == "custom_class" and sc["num_speculative_tokens"] == 6
    assert sc["model"] == "adaspec.integrations.vllm.AdaspecNgramProposer"


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, capsys):
    import sys

    from adaspec.integrations import MissingExtraError, require
    from adaspec.integrations.vllm_bench import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"adaspec\[vllm\]"):
        require("vllm", "vllm")
    assert main(["--limit", "1", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'adaspec[vllm]'" in err


def test_bench_rejects_bad_arguments(capsys):
    from adaspec.integrations.vllm_bench import main

    assert main(["--batches", "1,x"]) == 2
    assert main(["--adaspec", "hf"]) == 2
    assert "unknown hf" in capsys.readouterr().err


def test_bench_table_marks_the_best_ngram_k_and_identity():
    from adaspec.integrations.vllm_bench import build_table

    ref = [[1, 2, 3], [4, 5]]
    def res(tps1: float, tps8: float | None, ids=ref) -> dict:
        out = {"1": {"tokens": 5, "seconds": 5 / tps1, "ids": ids}}
        if tps8 is not None:
            out["8"] = {"tokens": 5, "seconds": 5 / tps8, "ids": ids}
        return out
    results = {"vllm-plain": res(20, 100), "vllm-ngram:k=2": res(25, 90), "vllm-ngram:k=4": res(30, 80),
               "vllm+adaspec:k=12": res(36, 104, [[1, 2, 3], [4, 6]]), "adaspec-engine:ngram": res(28, None)}
    rows, table = build_table(results, [1, 8], [2, 4])
    by = {(r["method"], r["batch"]): r for r in rows}
    assert by[("vllm-ngram:k=4", 1)]["best_vllm_ngram"] and by[("vllm-ngram:k=2", 8)]["best_vllm_ngram"]
    assert by[("vllm+adaspec:k=12", 1)]["vs_best_vllm_ngram"] == pytest.approx(36 / 30)
    assert by[("vllm+adaspec:k=12", 8)]["speedup_vs_plain"] == pytest.approx(1.04)
    assert by[("vllm+adaspec:k=12", 1)]["identical"] == 0.5
    assert ("adaspec-engine:ngram", 8) not in by
    assert table.count("\n") == 2 + len(rows)
