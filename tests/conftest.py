"""Shared fixtures: tiny random models and a byte-level tokenizer, built in code (no network)."""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from adaspec.checkpoints.loader import LoadedModel

# tiny models: threading only adds overhead on a shared 2-core box (and pytest -n 2 runs two
# workers): one torch thread and one thread for the compiled runtime's kernels (numba reads
# NUMBA_NUM_THREADS when first imported; every thread of the process then uses one)
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
torch.set_num_threads(1)

VOCAB = 262  # 256 bytes + a few specials
EOS_ID = 257


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer():
    """A byte-level tokenizer with no merges: ids 0..255 are bytes, 256 <pad>, 257 <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    vocab.update({"<pad>": 256, "<eos>": 257, "<a>": 258, "<b>": 259, "<c>": 260, "<d>": 261})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<a>{{ m['role'] }}\n{{ m['content'] }}<b>\n{% endfor %}"
                          "{% if add_generation_prompt %}<a>assistant\n{% endif %}")
    return fast


def make_model(arch: str = "llama", vocab: int = VOCAB, hidden: int = 48, layers: int = 2,
               seed: int = 0, max_pos: int = 256, init: float = 0.35) -> torch.nn.Module:
    """A tiny random causal LM (fp32, eval mode). Large ``init`` gives peaked distributions."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    small = vocab <= 256
    common = dict(vocab_size=vocab, initializer_range=init, eos_token_id=None if small else EOS_ID,
                  pad_token_id=None if small else 256, bos_token_id=None)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                          **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                          **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_pos, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model


def perturbed(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with Gaussian noise on every weight: a draft that agrees often, not always."""
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return other


def loaded(model: torch.nn.Module, tokenizer=None, name: str = "tiny") -> LoadedModel:
    return LoadedModel(model, tokenizer, name, model.config.vocab_size,
                       getattr(model.config, "max_position_embeddings", None)
                       or model.config.n_positions)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_pair(request, tokenizer):
    """(target, draft) LoadedModels of one architecture; the draft is a noisy copy."""
    target = make_model(request.param, seed=0)
    draft = perturbed(target, 0.6)
    return loaded(target, tokenizer, f"tiny-{request.param}"), loaded(draft, tokenizer, "tiny-draft")


PROMPTS = [b"def f(x):", b"hello world", b"The quick brown fox", b"1, 2, 3,", b"a"]


def prompt_ids(i: int) -> list[int]:
    return list(PROMPTS[i % len(PROMPTS)])


def layered_pair(vocab: int = 64, seed: int = 0, init: float = 0.3) -> tuple[LoadedModel, LoadedModel]:
    """Target: 2-layer Llama (d=32); draft: 1-layer Llama sharing the target's embeddings,
    first layer and head, so that the two agree often but not always."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=init,
                  tie_word_embeddings=False, attn_implementation="sdpa",
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common)).eval()
    with torch.no_grad():  # a weak second layer: the 1-layer draft agrees with the target often
        target.model.layers[1].self_attn.o_proj.weight.mul_(0.25)
        target.model.layers[1].mlp.down_proj.weight.mul_(0.25)
    draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **common)).eval()
    sd = {k: v for k, v in target.state_dict().items() if not k.startswith("model.layers.1.")}
    draft.load_state_dict(sd)
    with torch.no_grad():  # perturb the draft a little so that it sometimes disagrees
        for p in draft.model.layers[0].parameters():
            p.add_(0.02 * torch.randn_like(p))
    return (LoadedModel(target, None, "tiny-target", vocab, 256),
            LoadedModel(draft, None, "tiny-draft", vocab, 256))


def rand_prompts(n: int, vocab: int = 64, seed: int = 1) -> list[list[int]]:
    """``n`` random prompts of 3..8 token ids below ``vocab`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="session")
def pair() -> tuple[LoadedModel, LoadedModel]:
    """The vocabulary-64 :func:`layered_pair` (one per test process)."""
    return layered_pair()


@pytest.fixture(scope="session")
def trained_predictors(pair, tmp_path_factory) -> dict[str, Path]:
    """collect -> train-predictor for every kind on :func:`pair` (exercises that pipeline)."""
    from adaspec.train.predictor import train_predictor
    from adaspec.train.traces import collect

    root = tmp_path_factory.mktemp("pred")
    target, draft = pair
    collect(target, draft, rand_prompts(22, seed=7), root / "traces", k=6, max_new_tokens=24, shard_size=8,
            progress=False)
    out = {}
    for kind in ("specdecpp", "context", "ldlp"):
        train_predictor(root / "traces", kind, root / kind, epochs=8, batch=64)
        out[kind] = root / kind
    return out


class VirtualClock:
    """A deterministic ``time.perf_counter``: model forwards advance it by a cost model."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1e-7  # every read moves a little, so intervals are never zero
        return self.now

    def charge(self, model: torch.nn.Module, base: float, per_token: float) -> object:
        def pre_hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.now += base + per_token * (ids.shape[-1] if ids is not None else 1)

        return model.register_forward_pre_hook(pre_hook, with_kwargs=True)


@pytest.fixture
def virtual_clock(monkeypatch):
    """Patch perf_counter wherever adaspec reads it; yields a function that charges a pair."""
    clock = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("adaspec") and hasattr(mod, "perf_counter"):
            monkeypatch.setattr(mod, "perf_counter", clock)
    handles = []

    def charge(target: LoadedModel, draft: LoadedModel | None) -> None:
        handles.append(clock.charge(target.model, 0.010, 0.002))
        if draft is not None:
            handles.append(clock.charge(draft.model, 0.001, 0.0001))

    yield charge
    for h in handles:
        h.remove()
