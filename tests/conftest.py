"""Shared fixtures: tiny random models and a byte-level tokenizer, built in code (no network)."""

from __future__ import annotations

import copy

import pytest
import torch

from adaspec.models import LoadedModel

torch.set_num_threads(1)  # tiny models: threading only adds overhead on a shared 2-core box

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
