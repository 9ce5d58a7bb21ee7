"""adaspec.metrics: run statistics pool exactly (sums of counts), with known τ on small examples."""

from __future__ import annotations

import random

import pytest

from adaspec.bench.report import summarize
from adaspec.metrics import RunMetrics
from adaspec.types import GenerationStats


def _run(rounds: list[tuple[int, int, int]], wall_s: float = 0.0, m: RunMetrics | None = None) -> RunMetrics:
    """Statistics of (drafted, accepted, committed) rounds, one target forward each
    (added to ``m`` when given)."""
    m = RunMetrics() if m is None else m
    m.wall_s += wall_s
    for drafted, accepted, committed in rounds:
        m.record_round(drafted, accepted)
        m.target_forwards += 1
        m.draft_forwards += drafted
        m.new_tokens += committed
    return m


def test_known_small_examples():
    # K=4: all accepted (4 + bonus), then 1 accepted (1 + correction): 7 tokens in 2 verifies
    m = _run([(4, 4, 5), (4, 1, 2)])
    assert m.tau == 3.5
    assert m.acceptance_rate == 5 / 8
    assert m.accept_hist == [0, 1, 0, 0, 1]
    # position 1 and 2 tested twice (round 2 rejected token 2), 3 and 4 once and accepted
    assert m.pos_tested == [2, 2, 1, 1] and m.pos_accepted == [2, 1, 1, 1]
    assert m.per_position_acceptance == [1.0, 0.5, 1.0, 1.0]
    # plain decoding: one token per target forward, no draft
    plain = _run([(0, 0, 1)] * 5)
    assert plain.tau == 1.0 and plain.acceptance_rate == 0.0 and plain.accept_hist == [5]
    assert plain.per_position_acceptance == []
    # nothing ran: ratios are 0 (or the caller's empty value), never a division by zero
    assert RunMetrics().tau == 0.0 and RunMetrics().rates(empty=None)["tau"] is None


def test_merge_equals_the_concatenated_rounds():
    rng = random.Random(0)
    for _ in range(50):
        rounds = []
        for _ in range(rng.randint(0, 30)):
            k = rng.randint(0, 8)
            a = rng.randint(0, k)
            rounds.append((k, a, a + 1))
        cut = rng.randint(0, len(rounds))
        a, b = _run(rounds[:cut], 1.5), _run(rounds[cut:], 2.25)
        whole = _run(rounds, 3.75)
        assert a + b == whole
        assert RunMetrics.pool([a, b]) == whole
        assert (a + b).tau == whole.tau and (a + b).per_position_acceptance == whole.per_position_acceptance


def test_merge_is_not_a_mean_of_ratios():
    a = _run([(4, 4, 5)])  # τ 5
    b = _run([(4, 0, 1)] * 4)  # τ 1
    assert (a + b).tau == 9 / 5 != (a.tau + b.tau) / 2


def test_generation_stats_pool_as_run_metrics():
    s1 = _run([(3, 3, 4), (3, 0, 1)], m=GenerationStats(stop_reason="eos"))
    s2 = _run([(2, 1, 2)], m=GenerationStats(stop_reason="max_new_tokens"))
    total = s1 + s2
    assert type(total) is RunMetrics and total == _run([(3, 3, 4), (3, 0, 1), (2, 1, 2)])
    assert total.tau == 7 / 3 and s1.to_dict()["tau"] == 5 / 2


def test_counts_round_trip_through_a_results_row():
    m = _run([(4, 2, 3), (2, 2, 3)], wall_s=0.5)
    assert RunMetrics.from_counts(m.counts()) == m
    # rows written before a counter existed count it as 0
    assert RunMetrics.from_counts({"new_tokens": 3, "tree_nodes": None}) == RunMetrics(new_tokens=3)


def test_bench_summary_pools_counts_over_prompts_and_repeats():
    def row(pid: str, repeat: int, m: RunMetrics) -> dict:
        return {"prompt_id": pid, "category": "c", "method": "fixed:4", "repeat": repeat, **m.counts()}

    runs = {("a", 0): _run([(4, 4, 5)], 1.0), ("a", 1): _run([(4, 3, 4)], 1.0),
            ("b", 0): _run([(4, 0, 1)] * 3, 1.0), ("b", 1): _run([(4, 1, 2)], 1.0)}
    e = summarize([row(p, r, m) for (p, r), m in runs.items()])["methods"]["fixed:4"]
    whole = RunMetrics.pool(runs.values())
    assert e["tau"] == pytest.approx(whole.tau) == pytest.approx(14 / 6)
    assert e["acceptance_rate"] == pytest.approx(8 / 24)
    assert e["accept_hist"] == whole.accept_hist == [3, 1, 0, 1, 1]
    assert e["per_position_acceptance"] == whole.per_position_acceptance
