"""Fast tests of ``adaspec bench`` pieces that need no model: datasets, splits, method
parsing, the speed-up formula, report regeneration and error messages."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from adaspec.bench.cli import add_bench_parser
from adaspec.bench.datasets import DatasetError, data_root, humaneval_bucket, load_dataset, load_jsonl
from adaspec.bench.methods import MethodError, parse_method, parse_methods
from adaspec.bench.report import markdown_table, read_results, report_only, summarize
from adaspec.errors import InvalidArgumentError

# The instruction sets are read in place from ../shared/data (or $ADASPEC_DATA) and are not
# part of the repository: a fresh clone without them skips these tests, with the reason.
needs_shared_data = pytest.mark.skipif(
    not data_root().is_dir(),
    reason=f"prompt sets not found at {data_root()} (set ADASPEC_DATA to the data folder)")


def test_humaneval_split_is_fixed_and_disjoint():
    train, dev, test = (load_dataset("humaneval", s) for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (100, 32, 32)
    ids = [p.id for p in train + dev + test]
    assert len(set(ids)) == 164
    assert all(humaneval_bucket(p.id) >= 8 for p in test)
    assert test[0].id == "HumanEval/8" and test[0].raw and test[0].category == "code"


@needs_shared_data
@pytest.mark.parametrize("name,category", [("gsm8k", "math"), ("code_alpaca", "code"),
                                           ("gpteacher_codegen", "code"), ("gpteacher_roleplay", "roleplay"),
                                           ("self_instruct_seed", "general")])
def test_shared_sets_split_disjoint(name, category):
    splits = {s: load_dataset(name, s) for s in ("train", "dev", "test")}
    ids = [p.id for ps in splits.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(load_dataset(name, "all"))
    assert all(p.category == category and not p.raw and p.turns[0] for p in splits["test"])
    assert 0.15 < len(splits["test"]) / len(ids) < 0.25


@needs_shared_data
def test_mix_round_robins_categories():
    cats = [p.category for p in load_dataset("mix", "test")[:5]]
    assert set(cats) == {"math", "code", "roleplay", "general"}


def test_jsonl_spec_bench_format(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question_id": 81, "category": "writing", "turns": ["Hi", "More"]}\n\n'
                 '{"question_id": 82, "category": "math", "turns": ["1+1?"]}\n')
    ps = load_dataset(f"jsonl:{f}", "test")
    assert [(p.id, p.category, len(p.turns)) for p in ps] == [("81", "writing", 2), ("82", "math", 1)]


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"question_id": 2, "turns": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: malformed JSON"):
        load_jsonl(f)
    f.write_text('{"question_id": 1, "category": "x", "turns": []}\n')
    with pytest.raises(DatasetError, match=r":1: 'turns' must be"):
        load_jsonl(f)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*humaneval"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("humaneval", "validation")
    assert issubclass(DatasetError, InvalidArgumentError)


def test_method_parsing():
    assert parse_method("fixed:5").args == {"k": "5"}
    assert parse_method("fixed:k=3").args == {"k": "3"}
    assert parse_method("ar").kind == "ar"
    hf = parse_method("hf-heuristic")
    assert hf.kind == "hf" and hf.args == {"num_assistant_tokens_schedule": "heuristic"}
    assert parse_method("hf:num_assistant_tokens=5").args == {"num_assistant_tokens": "5"}
    assert [m.key for m in parse_methods("ar, hf,fixed:3")] == ["ar", "hf", "fixed:3"]


@pytest.mark.parametrize("text,msg", [
    ("nope", "unknown method 'nope'"), ("fixed:0", "k must be >= 1"), ("fixed:q=1", "unknown argument"),
    ("ar:x=1", "no arguments"), ("hf:k=2", "unknown argument 'k'"), ("ar,ar", "listed twice"),
    ("fixed:3:5", "key=value"), ("", "empty method")])
def test_bad_methods(text, msg):
    with pytest.raises(MethodError, match=msg):
        parse_methods(text)


def _row(pid, method, tps, cat="c", ids=(1, 2), **kw):
    new = 10
    return {"prompt_id": pid, "category": cat, "method": method, "repeat": kw.pop("repeat", 0),
            "new_tokens": new, "wall_s": new / tps, "tokens_per_s": tps, "target_forwards": kw.pop("tf", 10),
            "draft_forwards": 0, "drafted_tokens": 0, "accepted_tokens": 0, "policy_s": 0.0,
            "token_ids": [list(ids)], **kw}


def test_policy_efficiency_against_the_oracle_with_the_same_draft():
    rows = [_row("a", "ar", 10.0), _row("b", "ar", 10.0),
            _row("a", "oracle", 20.0), _row("b", "oracle", 40.0),
            _row("a", "fixed:3", 10.0), _row("b", "fixed:3", 30.0),
            _row("a", "fixed:3:draft=ngram", 10.0), _row("b", "fixed:3:draft=ngram", 30.0)]
    m = summarize(rows)["methods"]
    assert m["fixed:3"]["efficiency_vs_oracle"] == pytest.approx((10 / 20 + 30 / 40) / 2)
    assert m["oracle"]["efficiency_vs_oracle"] == pytest.approx(1.0)
    # no oracle ran with the n-gram source, and plain decoding is no policy
    assert "efficiency_vs_oracle" not in m["fixed:3:draft=ngram"] and "efficiency_vs_oracle" not in m["ar"]


def test_speedup_is_mean_of_per_prompt_ratios(tmp_path):
    rows = [_row("a", "ar", 10.0), _row("b", "ar", 40.0, cat="d"),
            _row("a", "m", 20.0, tf=5), _row("b", "m", 40.0, cat="d", ids=(1, 3), tf=5),
            # repeats: the median tokens/s of a prompt counts
            _row("a", "r", 10.0), _row("a", "r", 30.0, repeat=1), _row("a", "r", 100.0, repeat=2)]
    s = summarize(rows)
    m = s["methods"]["m"]
    # Spec-Bench: mean(20/10, 40/40) = 1.5, not (total tokens / total time) ratio (1.6)
    assert m["speedup_vs_ar"] == pytest.approx(1.5)
    assert m["tokens_per_s"] == pytest.approx(30.0)
    assert m["tau"] == pytest.approx(2.0) and m["target_forwards_per_token"] == pytest.approx(0.5)
    assert m["identical_to_ar_rate"] == pytest.approx(0.5)
    assert m["per_category"]["c"]["speedup_vs_ar"] == pytest.approx(2.0)
    assert m["per_category"]["d"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert s["methods"]["r"]["speedup_vs_ar"] == pytest.approx(3.0)
    # mean ± spread over repeats: stdev of the per-repeat means (one prompt: 10, 30, 100)
    assert s["methods"]["r"]["tokens_per_s_spread"] == pytest.approx(statistics.stdev([10.0, 30.0, 100.0]))
    assert s["methods"]["m"]["tokens_per_s_spread"] is None  # one repeat: no spread
    assert f"{statistics.median([10.0, 30.0, 100.0]):.1f} ± " in markdown_table(s)
    assert s["methods"]["ar"]["speedup_vs_ar"] == 1.0
    assert s["mismatches"] == [{"method": "m", "prompt_id": "b", "turn": 0, "first_diff": 1, "len": 2,
                                "ar_len": 2}]
    # the same file through --report-only
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = report_only(tmp_path)
    assert again["methods"]["m"]["speedup_vs_ar"] == pytest.approx(1.5)
    assert "| `m` | 1.50× |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "speedup.png").is_file()


def test_calibration_pairs_make_the_calibration_plot(tmp_path):
    """Rows carrying a predictor's [p_hat, accepted] pairs (specdecpp reports them) give
    calibration.png, linked from the report; rows without give no such plot."""
    rows = [_row("a", "ar", 10.0), _row("a", "specdecpp", 20.0, calibration=[[0.9, 1], [0.2, 0], [0.6, 1]])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_only(tmp_path)
    assert (tmp_path / "calibration.png").stat().st_size > 0
    assert "calibration.png" in (tmp_path / "report.md").read_text()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    report_only(bare)
    assert not (bare / "calibration.png").exists()


def test_run_one_moves_policy_calibration_pairs_into_the_row():
    from adaspec.bench.datasets import Prompt
    from adaspec.bench.methods import TurnResult
    from adaspec.bench.runner import BenchConfig, run_one
    from adaspec.types import GenerationStats

    class Runner:  # two turns, each reporting calibration pairs like specdecpp
        def generate(self, ids, max_new_tokens, temperature, seed):
            stats = GenerationStats(new_tokens=2, target_forwards=1, wall_s=0.5)
            stats.record_round(2, 1)
            stats.extra.update(calibration=[[0.7, 1], [0.4, 0]], note="x")
            return TurnResult([5, 6], stats)

    class Tok:
        def __call__(self, text):
            return {"input_ids": [1, 2, 3]}

        def decode(self, ids, skip_special_tokens=True):
            return "ab"

    row = run_one(Runner(), Prompt("p", "c", ["t1", "t2"]), Tok(), BenchConfig(), chat=False)
    assert row["calibration"] == [[0.7, 1], [0.4, 0]] * 2
    assert row["extra"] == [{"note": "x"}, {"note": "x"}]
    assert (row["new_tokens"], row["target_forwards"], row["tau"]) == (4, 2, 2.0)
    assert row["accept_hist"] == [0, 2] and row["pos_tested"] == [2, 2] and row["pos_accepted"] == [2]


def test_bench_device_reaches_the_run(tmp_path, monkeypatch):
    import adaspec.bench.cli as bench_cli

    seen = []
    monkeypatch.setattr(bench_cli, "run_benchmark", lambda cfg: seen.append(cfg) or {"methods": {}})
    monkeypatch.setattr(bench_cli, "_print_tables", lambda summary, out: None)
    for extra in ([], ["--quick"]):
        args = _parse("--device", "cuda:1", "--out", str(tmp_path), *extra)
        assert args.func(args) == 0
    assert [c.device for c in seen] == ["cuda:1", "cuda:1"]


def test_results_errors(tmp_path):
    f = tmp_path / "results.jsonl"
    with pytest.raises(DatasetError, match="does not exist"):
        read_results(f)
    f.write_text(json.dumps(_row("a", "ar", 1.0)) + "\n{oops\n")
    with pytest.raises(DatasetError, match=r"results.jsonl:2: malformed"):
        read_results(f)
    f.write_text('{"prompt_id": "a"}\n')
    with pytest.raises(DatasetError, match=r":1: results line lacks category"):
        read_results(f)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["bench", *argv])


def test_cli_parser_and_user_errors(tmp_path):
    args = _parse("--methods", "ar,fixed:5", "--limit", "3", "--no-chat", "--out", str(tmp_path))
    assert args.methods == "ar,fixed:5" and args.limit == 3 and args.chat is False
    assert args.max_new_tokens == 128 and args.dtype == "auto" and _parse().chat is None
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        args.func(_parse("--report-only", "--out", str(tmp_path / "none")))
    with pytest.raises(MethodError, match="unknown method"):
        args.func(_parse("--methods", "ar,warp", "--out", str(tmp_path)))
    with pytest.raises(DatasetError, match="unknown dataset"):
        args.func(_parse("--dataset", "mmlu", "--out", str(tmp_path)))
    assert not (tmp_path / "results.jsonl").exists()
