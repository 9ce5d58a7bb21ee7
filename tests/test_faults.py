"""Faults and bad input through the command line: each gets one line on stderr and exit
code 2 (no traceback), nothing is left half-written, and an interrupted long job (Ctrl-C:
exit 130, the shell convention for SIGINT) resumes to the same result as an unbroken run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, layered_pair, make_model, make_tokenizer

from adaspec import cli


def run(capsys, *argv: object, logs: bool = False) -> tuple[int, str]:
    """Run the CLI; return (exit code, last stderr line). Never a traceback; on failure the
    message is one ``adaspec: ...`` line (``logs``: progress lines may come before it)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code != 0:
        mine = [ln for ln in lines if ln.startswith("adaspec: ")]
        assert len(mine) == 1 and lines[-1] == mine[0], err
        if not logs:
            assert len(lines) == 1 or all(ln.startswith("collect: shard") for ln in lines[:-1]), err
    return code, lines[-1] if lines else ""


def user_error(capsys, needle: str, *argv: str) -> str:
    code, err = run(capsys, *argv)
    assert code == 2 and needle in err, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny llama with a tokenizer, 64 positions of context."""
    path = tmp_path_factory.mktemp("faults") / "tiny"
    make_model("llama", max_pos=64).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A layered pair over the byte tokenizer, saved as target / draft directories."""
    root = tmp_path_factory.mktemp("pairdirs")
    for model, name in zip(layered_pair(vocab=VOCAB), ("t", "d")):
        model.model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root / "t", root / "d"


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "hi", "--target", str(model), "--draft", "none", "--dtype", "fp32",
            "--max-new-tokens", "2", *extra]


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights(model_dir, tmp_path, capsys, damage):
    bad = _copy_dir(model_dir, tmp_path / "m")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    cut = {"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}
    weights.write_bytes(cut[damage])
    user_error(capsys, "cannot load target model", *_gen(bad))


def test_corrupt_subset_draft(model_dir, tmp_path, capsys):
    """A reduced-vocabulary draft directory whose weights were cut short."""
    from adaspec.checkpoints.subset_draft import build_subset_draft, save_subset_draft

    cfg = make_model("llama", max_pos=64).config
    save_subset_draft(build_subset_draft(cfg, torch.arange(100)), tmp_path / "d",
                      {"draft_vocab_size": 100, "target_vocab_sha256": None, "target": "tiny"})
    assert not list((tmp_path / "d").glob("*.tmp"))  # written via temporary names
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    user_error(capsys, "cannot load draft model", "generate", "hi", "--target", model_dir,
               "--draft", tmp_path / "d", "--dtype", "fp32", "--max-new-tokens", "2")


def test_prompt_longer_than_context(model_dir, capsys):
    err = user_error(capsys, "context", "generate", "x" * 80, "--target", model_dir, "--draft", "none",
                     "--dtype", "fp32")
    assert "64" in err


# ---------------------------------------------------------------------------- predictors


def _predictor(tmp_path: Path, d: int) -> Path:
    from adaspec.predictors.models import Predictor, build_head, save_predictor

    cfg = {"d": d, "n_scalar": 8, "width": 4}
    meta = {"config": cfg, "features": {"attention": False},
            "pair": {"target": "other-target", "draft": "other-draft", "draft_hidden": d, "target_hidden": d}}
    save_predictor(Predictor("context", build_head("context", cfg), meta), tmp_path / "pred")
    assert not list((tmp_path / "pred").glob("*.tmp"))
    return tmp_path / "pred"


def test_predictor_of_another_pair(model_dir, tmp_path, capsys):
    pred = _predictor(tmp_path, 16)  # the tiny models have hidden size 48
    user_error(capsys, "hidden size", "generate", "hi", "--target", model_dir, "--draft", model_dir,
               "--dtype", "fp32", "--policy", "context", "--policy-arg", f"predictor={pred}")


@pytest.mark.parametrize("damage", ["json", "weights", "mismatch"])
def test_corrupt_predictor(model_dir, tmp_path, capsys, damage):
    pred = _predictor(tmp_path, 48)
    if damage == "json":
        (pred / "predictor.json").write_text('{"format": "adaspec-pred')
    elif damage == "weights":
        w = pred / "model.safetensors"
        w.write_bytes(w.read_bytes()[:200])
    else:  # weights replaced but predictor.json not: an interrupted save
        other = _predictor(tmp_path / "o", 48)
        (pred / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes() + b" ")
    user_error(capsys, "corrupt", "generate", "hi", "--target", model_dir, "--draft", model_dir,
               "--dtype", "fp32", "--policy", "context", "--policy-arg", f"predictor={pred}")


# ---------------------------------------------------------------------------- data sets and outputs


def test_unknown_dataset(model_dir, pair_dirs, tmp_path, capsys):
    user_error(capsys, "unknown dataset 'nope'", "bench", "--dataset", "nope", "--methods", "ar",
               "--target", model_dir, "--out", tmp_path / "b")
    t, d = pair_dirs
    user_error(capsys, "unknown dataset 'nope'", "collect", "--target", t, "--draft", d, "--dataset", "nope",
               "--out", tmp_path / "c", "--dtype", "fp32")
    assert not (tmp_path / "b" / "results.jsonl").exists() and not (tmp_path / "c" / "meta.json").exists()


def test_limit_zero(model_dir, tmp_path, capsys):
    user_error(capsys, "--limit", "bench", "--dataset", "humaneval", "--methods", "ar", "--limit", "0",
               "--target", model_dir, "--out", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_non_utf8_prompt_files(model_dir, pair_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a fine line\n\xff\xfe broken \xc3\n")
    t, d = pair_dirs
    user_error(capsys, "not UTF-8", "collect", "--target", t, "--draft", d, "--prompts", bad,
               "--out", tmp_path / "c", "--dtype", "fp32")
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": ["\xff"]}\n')
    err = user_error(capsys, "not UTF-8", "bench", "--dataset", f"jsonl:{jl}", "--methods", "ar",
                     "--target", model_dir, "--out", tmp_path / "b")
    assert "bad.jsonl:2" in err


def _blocked(tmp_path: Path) -> Path:
    """A path under a regular file: it can never be created, whoever runs the test (even root)."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


def test_unwritable_out_collect_and_train(pair_dirs, tmp_path, capsys):
    t, d = pair_dirs
    prompts = tmp_path / "p.txt"
    prompts.write_text("1 2 3\n")
    user_error(capsys, "not writable", "collect", "--target", t, "--draft", d, "--prompts", prompts,
               "--out", _blocked(tmp_path), "--dtype", "fp32", "--quiet")
    traces = tmp_path / "traces"
    assert run(capsys, "collect", "--target", t, "--draft", d, "--prompts", _prompt_file(tmp_path, 8),
               "--out", traces, "--dtype", "fp32", "--quiet", "--max-new-tokens", "8", "--k", "3")[0] == 0
    user_error(capsys, "not writable", "train-predictor", "--kind", "context", "--traces", traces,
               "--out", _blocked(tmp_path), "--epochs", "1")


def test_unwritable_out_bench(model_dir, tmp_path, capsys):
    user_error(capsys, "not writable", "bench", "--dataset", "humaneval", "--methods", "ar", "--limit", "1",
               "--target", model_dir, "--out", _blocked(tmp_path))


def _prompt_file(tmp_path: Path, n: int) -> Path:
    f = tmp_path / f"prompts{n}.txt"
    f.write_text("".join(f"line {i}: {'ab' * (1 + i % 4)} {i * i}\n" for i in range(n)))
    return f


# ---------------------------------------------------------------------------- traces


def _traces(path: Path) -> dict[str, torch.Tensor]:
    from adaspec.train.traces import load_traces

    _, t = load_traces(path)
    return {k: v for k, v in t.items() if not k.endswith("_s")}  # timings differ run to run


def _same_traces(a: Path, b: Path) -> None:
    ta, tb = _traces(a), _traces(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _collect_args(t: Path, d: Path, prompts: Path, out: Path) -> list:
    return ["collect", "--target", t, "--draft", d, "--prompts", prompts, "--out", out, "--dtype", "fp32",
            "--quiet", "--max-new-tokens", "10", "--k", "3", "--shard-size", "3"]


def test_truncated_trace_shard_is_collected_again(pair_dirs, tmp_path, capsys):
    t, d = pair_dirs
    prompts = _prompt_file(tmp_path, 9)
    assert run(capsys, *_collect_args(t, d, prompts, tmp_path / "clean"))[0] == 0
    out = tmp_path / "tr"
    assert run(capsys, *_collect_args(t, d, prompts, out))[0] == 0
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])  # a disk that filled up, a copy cut short
    # training refuses it (never trains on garbage) and says how to repair
    user_error(capsys, "shard-00001.safetensors is truncated", "train-predictor", "--kind", "context",
               "--traces", out, "--out", tmp_path / "p")
    assert not (tmp_path / "p" / "predictor.json").exists()
    # the same collect command repairs it: shard 1 and every later one are collected again
    assert run(capsys, *_collect_args(t, d, prompts, out))[0] == 0
    _same_traces(out, tmp_path / "clean")
    assert json.loads((out / "meta.json").read_text())["complete"]


# ---------------------------------------------------------------------------- Ctrl-C


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _interrupt_at(monkeypatch, owner: object, attr: str, at: int) -> dict:
    """Make ``owner.attr`` raise KeyboardInterrupt on its ``at``-th call (like Ctrl-C there)."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


def test_ctrl_c_in_collect_resumes_to_the_same_traces(pair_dirs, tmp_path, capsys, monkeypatch):
    from adaspec.api import SpeculativeGenerator

    t, d = pair_dirs
    prompts = _prompt_file(tmp_path, 9)
    assert run(capsys, *_collect_args(t, d, prompts, tmp_path / "clean"))[0] == 0
    out = tmp_path / "tr"
    with monkeypatch.context() as m:
        _interrupt_at(m, SpeculativeGenerator, "generate", 5)  # inside the second shard
        code, err = run(capsys, *_collect_args(t, d, prompts, out))
    assert code == 130 and "rerun the same command" in err
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["shards"]) == 1 and not meta["complete"] and not list(out.glob("*.tmp"))
    assert run(capsys, *_collect_args(t, d, prompts, out))[0] == 0
    _same_traces(out, tmp_path / "clean")


def test_ctrl_c_in_train_predictor_writes_nothing(pair_dirs, tmp_path, capsys, monkeypatch):
    t, d = pair_dirs
    traces = tmp_path / "traces"
    assert run(capsys, *_collect_args(t, d, _prompt_file(tmp_path, 14), traces))[0] == 0
    argv = ["train-predictor", "--kind", "context", "--traces", traces, "--epochs", "3", "--batch", "16"]
    assert run(capsys, *argv, "--out", tmp_path / "clean")[0] == 0
    out = tmp_path / "p"
    with monkeypatch.context() as m:
        _interrupt_at(m, torch.optim.AdamW, "step", 4)
        assert run(capsys, *argv, "--out", out)[0] == 130
    assert not (out / "predictor.json").exists() and not (out / "model.safetensors").exists()
    assert run(capsys, *argv, "--out", out)[0] == 0  # rerun: the same predictor as an unbroken run
    _same_weights(out / "model.safetensors", tmp_path / "clean" / "model.safetensors")


def test_ctrl_c_in_train_draft_resumes_to_the_same_draft(tmp_path, capsys, monkeypatch):
    """Ctrl-C between optimiser steps: a checkpoint (with the RNG state) is written, and
    ``--resume`` ends with exactly the weights of an uninterrupted run."""
    import signal

    from test_train_draft import SMALL, _data_dir, _tiny_target

    import adaspec.train.draft as train_draft

    _tiny_target(tmp_path / "target")
    data = _data_dir(tmp_path / "data")

    def argv(name: str, *extra: str) -> list:
        return ["train-draft", "--target", tmp_path / "target", "--out", tmp_path / name, "--data-dir", data,
                "--work-dir", tmp_path / f"work-{name}", *SMALL, "--steps", "6", *extra]

    assert run(capsys, *argv("clean"), logs=True)[0] == 0
    real = train_draft.make_batch
    calls = {"n": 0}

    def ctrl_c_during_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # what the terminal does on Ctrl-C: call the SIGINT handler
            handler = signal.getsignal(signal.SIGINT)
            assert callable(handler) and handler is not signal.default_int_handler
            handler(signal.SIGINT, None)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_draft, "make_batch", ctrl_c_during_step_3)
        code, err = run(capsys, *argv("broken"), logs=True)
    assert code == 130 and "interrupted" in err
    ckpt = torch.load(tmp_path / "work-broken" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3  # the step in flight finished, then the loop stopped and saved
    assert run(capsys, *argv("broken", "--resume"), logs=True)[0] == 0
    a = torch.load(tmp_path / "work-clean" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "work-broken" / "ckpt.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_weights(tmp_path / "broken" / "model.safetensors", tmp_path / "clean" / "model.safetensors")


def test_generate_stdin_not_utf8_is_one_line(model_dir, capsys, monkeypatch):
    import io
    import sys

    class _Stdin:
        buffer = io.BytesIO(b"def f(x):\n  \xff\xfe return x\n")

    monkeypatch.setattr(sys, "stdin", _Stdin())
    user_error(capsys, "standard input is not UTF-8 text (byte 12)", "generate", "-", "--target", model_dir,
               "--draft", "none")
