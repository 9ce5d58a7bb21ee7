"""End-to-end tests of ``adaspec bench`` on tiny random models built in code (seconds)."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adaspec.bench.datasets import Prompt
from adaspec.bench.report import read_results, report_only
from adaspec.bench.runner import BenchConfig, ResumeMismatchError, run_benchmark
from adaspec.checkpoints.loader import LoadedModel, load_model

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    chars = list(string.printable)
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=specials[3:])
    fast.chat_template = CHAT
    return fast


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """A tiny Llama target and a perturbed copy as draft, saved with a char-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    target = LlamaForCausalLM(cfg)
    draft = LlamaForCausalLM(cfg)
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    paths = root / "target", root / "draft"
    for model, path in zip((target, draft), paths, strict=False):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[tuple[LoadedModel, LoadedModel]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only wait on each other
    t, d = make_tiny_pair(tmp_path_factory.mktemp("tiny"))
    yield load_model(str(t), dtype="fp32"), load_model(str(d), dtype="fp32", role="draft")
    torch.set_num_threads(threads)


PROMPTS = [
    Prompt("q1", "writing", ["Write a poem."]),
    Prompt("q2", "math", ["What is 2+2?", "And times 3?"]),
    Prompt("HumanEval/8", "code", ["def add(a, b):\n"], raw=True),
]
METHODS = "ar,hf,hf-heuristic,fixed:2,fixed:4,heuristic,confidence,entropy,oracle"


def _cfg(out: Path, **kw) -> BenchConfig:
    base = dict(methods=METHODS, dataset="tiny", split="test", max_new_tokens=24, dtype="fp32",
                warmup=1, repeats=1, out=str(out), target="tiny", draft="tiny-draft", progress=False,
                command="test")
    base.update(kw)
    return BenchConfig(**base)


def test_run_writes_all_outputs(pair, tmp_path):
    target, draft = pair
    summary = run_benchmark(_cfg(tmp_path, repeats=2, max_new_tokens=16), prompts=PROMPTS,
                            target=target, draft=draft)
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == len(PROMPTS) * len(METHODS.split(",")) * 2
    for name in ("summary.json", "report.md", "speedup.png", "accept_hist.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    methods = summary["methods"]
    assert list(methods) == METHODS.split(",")
    for m, e in methods.items():
        for k in ("tokens_per_s", "speedup_vs_ar", "tau", "acceptance_rate", "target_forwards_per_token",
                  "draft_forwards_per_token", "overhead_pct", "identical_to_ar_rate", "n"):
            assert k in e, (m, k)
        assert set(e["per_category"]) == {"writing", "math", "code"}
        assert e["n"] == 3
    assert methods["ar"]["speedup_vs_ar"] == 1.0 and methods["ar"]["tau"] == 1.0
    # fp32 greedy: every adaspec policy and HF reproduce plain decoding token for token
    for m in METHODS.split(",")[1:]:
        assert methods[m]["identical_to_ar_rate"] == 1.0, (m, summary["mismatches"])
        assert methods[m]["tau"] > 1.0
    assert methods["oracle"]["acceptance_rate"] == 1.0
    # chains only here: tree counters present, no tree rounds, nodes = drafted tokens per round
    fx = [r for r in rows if r["method"] == "fixed:2"]
    assert methods["fixed:2"]["tree_round_rate"] == 0.0
    assert methods["fixed:2"]["tree_nodes_per_round"] == pytest.approx(
        sum(r["drafted_tokens"] for r in fx) / sum(r["rounds"] for r in fx))
    assert methods["hf"]["overhead_pct"] is None and methods["fixed:2"]["overhead_pct"] is not None
    # hf statistics rebuilt from forward hooks add up: a round commits accepted + 1 tokens
    for r in rows:
        if r["method"].startswith("hf"):
            assert r["accepted_tokens"] <= r["drafted_tokens"] == r["draft_forwards"]
            assert r["new_tokens"] <= r["accepted_tokens"] + r["rounds"] <= r["new_tokens"] + r["turns"]
            assert sum(r["accept_hist"]) == r["rounds"] == r["target_forwards"]
    # the multi-turn prompt ran two turns
    q2 = [r for r in rows if r["prompt_id"] == "q2"]
    assert all(len(r["token_ids"]) == 2 for r in q2)
    report = (tmp_path / "report.md").read_text()
    assert "| `fixed:4` |" in report and "Per category" in report
    # --report-only regenerates the same summary from results.jsonl
    (tmp_path / "summary.json").unlink()
    again = report_only(tmp_path)
    assert again["methods"]["fixed:2"]["speedup_vs_ar"] == pytest.approx(methods["fixed:2"]["speedup_vs_ar"])


def test_resume_neither_repeats_nor_loses(pair, tmp_path):
    target, draft = pair
    cfg = _cfg(tmp_path, methods="ar,fixed:2,hf")
    run_benchmark(cfg, prompts=PROMPTS, target=target, draft=draft, stop_after=4)
    first = read_results(tmp_path / "results.jsonl")
    assert len(first) == 4
    # a run killed mid-write leaves half a line behind
    with (tmp_path / "results.jsonl").open("a") as fh:
        fh.write('{"prompt_id": "q3", "meth')
    seen = []
    run_benchmark(cfg, prompts=PROMPTS, target=target, draft=draft, on_row=seen.append)
    rows = read_results(tmp_path / "results.jsonl")
    keys = [(r["prompt_id"], r["method"], r["repeat"]) for r in rows]
    assert len(keys) == len(set(keys)) == 9
    assert len(seen) == 5
    assert rows[:4] == first
    # a rerun with nothing left to do runs nothing; other settings are refused
    seen.clear()
    run_benchmark(cfg, prompts=PROMPTS, target=target, draft=draft, on_row=seen.append)
    assert seen == []
    with pytest.raises(ResumeMismatchError, match="max_new_tokens"):
        run_benchmark(_cfg(tmp_path, methods="ar", max_new_tokens=8), prompts=PROMPTS,
                      target=target, draft=draft)


def test_results_rows_are_json(pair, tmp_path):
    target, draft = pair
    run_benchmark(_cfg(tmp_path, methods="ar,fixed:3", warmup=0), prompts=PROMPTS[:1], target=target,
                  draft=draft)
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["cfg"]["max_new_tokens"] == 24
        assert row["new_tokens"] == sum(len(t) for t in row["token_ids"])


def test_mismatch_margins(pair, tmp_path):
    from adaspec.bench.report import write_outputs
    from adaspec.bench.runner import explain_mismatches

    target, _ = pair
    base = {"category": "c", "repeat": 0, "new_tokens": 3, "wall_s": 1.0, "target_forwards": 3}
    rows = [{**base, "prompt_id": "q1", "method": "ar", "token_ids": [[40, 41, 42]]},
            {**base, "prompt_id": "q1", "method": "m", "token_ids": [[40, 43, 42]]}]
    explain_mismatches(tmp_path, rows, {"q1": PROMPTS[0]}, target, lambda p: True)
    summary = write_outputs(tmp_path, rows)
    (m,) = summary["mismatches"]
    assert m["first_diff"] == 1 and m["ar_token"] == 41 and m["method_token"] == 43
    assert m["top2_gap"] >= 0 and isinstance(m["logit_gap"], float)
    assert "top-2 logit gap" in (tmp_path / "report.md").read_text()


def test_sampling_run_reports_no_identity(pair, tmp_path):
    target, draft = pair
    summary = run_benchmark(_cfg(tmp_path, methods="ar,fixed:2,hf", temperature=0.8, warmup=0,
                                 max_new_tokens=12), prompts=PROMPTS[:2], target=target, draft=draft)
    for m, e in summary["methods"].items():
        assert e["identical_to_ar_rate"] is None, m
        assert e["n"] == 2 and e["tokens_per_s"] > 0
    assert summary["mismatches"] == []


def test_verify_cost_measures_every_size():
    from conftest import make_model

    from adaspec.bench.verify_cost import measure

    med = measure(make_model("llama"), [1, 3, 8], context=20, repeats=2, vocab=200,
                  runtimes=("eager", "compiled"))
    assert set(med) == {"eager", "compiled"}
    for per in med.values():
        assert set(per) == {1, 3, 8} and all(v > 0 for v in per.values())


def test_verify_cost_cli_json(tmp_path, monkeypatch):
    """``--json OUT`` writes {"runtimes": {rt: {n: ms}}, "machine": ...} measured in one process."""
    import json

    from conftest import make_model, make_tokenizer

    from adaspec.bench import verify_cost

    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "vc.json"
    assert verify_cost.main(["--target", str(model_dir), "--dtype", "fp32", "--sizes", "1,4",
                             "--repeats", "1", "--context", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["runtimes"]) == {"eager", "compiled", "compiled-fp32"}  # each under its own name
    assert set(data["runtimes"]["compiled"]) == {"1", "4"} and data["machine"]["cpu_count"] >= 1
    assert set(data["compiled_over_compiled_fp32"]) == {"1", "4"}
    assert verify_cost.main(["--target", str(model_dir), "--runtime", "fast"]) == 2


def test_a_method_can_bring_its_own_draft_model(pair, tmp_path):
    """``draft=DIR``: the method drafts with the model in DIR (here the target itself, so every
    drafted token is accepted), the other methods with the run's draft; outputs stay exact."""
    from adaspec.bench.methods import parse_method

    target, draft = pair
    own = str(Path(target.name))
    assert parse_method(f"fixed:2:draft={own}").own_draft == own
    assert not parse_method(f"fixed:2:draft={own}+ngram").needs_draft
    summary = run_benchmark(_cfg(tmp_path, methods=f"ar,fixed:2,fixed:2:draft={own}"), prompts=PROMPTS,
                            target=target, draft=draft)
    m = summary["methods"]
    assert m[f"fixed:2:draft={own}"]["acceptance_rate"] == 1.0
    assert m["fixed:2"]["acceptance_rate"] < 1.0
    assert all(e["identical_to_ar_rate"] == 1.0 for e in m.values())
