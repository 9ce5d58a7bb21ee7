"""Bad input gets a typed exception in the API and a one-line error + exit code 2 on the CLI."""

from __future__ import annotations

import pytest
from conftest import loaded, make_model, make_tokenizer

from adaspec import cli
from adaspec.api import SpeculativeGenerator
from adaspec.checkpoints.loader import load_model
from adaspec.errors import (
    InvalidArgumentError,
    ModelLoadError,
    PolicyArgumentError,
    PromptTooLongError,
    VocabMismatchError,
)


@pytest.fixture(scope="module")
def target():
    return loaded(make_model("llama", max_pos=64), make_tokenizer())


def test_empty_prompt(target):
    gen = SpeculativeGenerator(target, None)
    for bad in ("", "   ", []):
        with pytest.raises(InvalidArgumentError, match="empty"):
            gen.generate(bad)


def test_max_new_tokens_not_positive(target):
    gen = SpeculativeGenerator(target, None)
    for n in (0, -3):
        with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
            gen.generate("hi", max_new_tokens=n)


def test_prompt_longer_than_context(target):
    with pytest.raises(PromptTooLongError, match="64"):
        SpeculativeGenerator(target, None).generate("x" * 70)


def test_generation_stops_at_context_end(target):
    out = SpeculativeGenerator(target, target, "fixed", {"k": 8}).generate("x" * 60, max_new_tokens=50)
    assert len(out.token_ids) == 4 and out.stats.stop_reason == "context"


def test_bad_sampling_values(target):
    gen = SpeculativeGenerator(target, None)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        gen.generate("hi", temperature=-1)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        gen.generate("hi", temperature=1, top_p=0)


def test_policy_arguments(target):
    with pytest.raises(PolicyArgumentError, match="k must be >= 1"):
        SpeculativeGenerator(target, target, "fixed", {"k": "0"})
    with pytest.raises(PolicyArgumentError, match="unknown argument 'q'"):
        SpeculativeGenerator(target, target, "fixed", {"q": "1"})
    with pytest.raises(PolicyArgumentError, match="not a valid int"):
        SpeculativeGenerator(target, target, "fixed", {"k": "five"})
    with pytest.raises(PolicyArgumentError, match="unknown policy 'nope'"):
        SpeculativeGenerator(target, target, "nope")


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path / "empty"))


def test_incompatible_vocabularies(target, tmp_path):
    other_tok = make_tokenizer()
    other_tok.add_tokens(["<extra>"])
    draft = loaded(make_model("llama", vocab=263, seed=2), other_tok, "other")
    with pytest.raises(VocabMismatchError, match="different tokenizers") as err:
        SpeculativeGenerator(target, draft)
    assert "<extra>" in str(err.value) and "263" in str(err.value)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    capsys.readouterr()  # drop save_pretrained's progress bar (shown when no load ran before)
    common = ["generate", "--target", str(model_dir), "--draft", "none", "--dtype", "fp32"]
    cases = [
        (["generate", "", "--target", str(model_dir), "--draft", "none"], "prompt is empty"),
        (common[:1] + ["hi"] + common[1:] + ["--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "hi", "--target", str(tmp_path / "nope")], "does not exist"),
        (common[:1] + ["hi"] + common[1:] + ["--policy-arg", "k"], "key=value"),
    ]
    for argv, needle in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err


def test_cli_generate_json(tmp_path, capsys):
    import json

    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    argv = ["generate", "hello", "--target", str(model_dir), "--draft", str(model_dir), "--dtype", "fp32",
            "--policy", "fixed", "--policy-arg", "k=3", "--max-new-tokens", "12", "--json"]
    assert cli.main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert len(obj["token_ids"]) == 12 and isinstance(obj["text"], str)
    assert obj["policy"] == "fixed" and obj["draft"] == str(model_dir)
    for key in ("new_tokens", "wall_s", "tokens_per_s", "tau", "acceptance_rate", "target_forwards",
                "draft_forwards"):
        assert key in obj["stats"]
    assert obj["stats"]["acceptance_rate"] == 1.0  # the target is its own draft
    assert cli.main(argv[:-1]) == 0  # streaming mode
    assert capsys.readouterr().out.strip()
