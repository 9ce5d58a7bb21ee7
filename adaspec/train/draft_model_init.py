"""Building and initialising a reduced-vocabulary draft from a target, and measuring it.

* :func:`choose_subset` picks the draft's output tokens by frequency.
* :func:`init_draft` builds a small Llama with a PCA projection of the target's
  (tied) embedding as its input embedding and output head.
* :func:`agreement_stats` measures greedy agreement with the target's continuations by
  teacher forcing and simulates greedy speculative decoding with fixed K exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..checkpoints.subset_draft import build_subset_draft
from ..metrics import RunMetrics
from ..verify import greedy_from_argmax

# Tokens a code draft should always be able to propose (whitespace runs, brackets, keywords).
CODE_STRINGS = ["\n", "\n\n", "    ", "        ", "            ", "(", ")", "):", "[", "]", "{", "}", ":",
                ",", ".", "=", " =", " ==", " +", " -", " *", " /", "def", " def", "return", " return",
                " if", " else", " elif", " for", " in", " while", " import", "from", " not", " and",
                " or", " None", " True", " False", "self", " self", '"""', "'", '"', " #", "#"]


def choose_subset(weighted_seqs: Iterable[tuple[list[int], float]], size: int, vocab_size: int,
                  always: Iterable[int] = ()) -> torch.Tensor:
    """Top-``size`` token ids by weighted frequency, plus ``always`` ids.

    Args:
        weighted_seqs: (token ids, weight) pairs, e.g. target responses weight 1, prompts 0.2.
        size: Vs, number of output tokens.
        vocab_size: V, ids must be < V.
        always: ids forced into the subset (EOS, code tokens).
    Returns:
        [Vs] int64 sorted ids.
    """
    counts: Counter[int] = Counter()
    for ids, w in weighted_seqs:
        for t in ids:
            counts[t] += w
    forced = [t for t in dict.fromkeys(always) if 0 <= t < vocab_size]
    chosen = list(dict.fromkeys(forced))[:size]
    have = set(chosen)
    for t, _ in counts.most_common():
        if len(chosen) >= size:
            break
        if t not in have and 0 <= t < vocab_size:
            chosen.append(t)
            have.add(t)
    t = 0
    while len(chosen) < min(size, vocab_size):  # tiny data: pad with low ids
        if t not in have:
            chosen.append(t)
            have.add(t)
        t += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def coverage(seqs: Iterable[list[int]], subset: torch.Tensor) -> float:
    """Share of the tokens in ``seqs`` that the subset can propose."""
    keep = set(subset.tolist())
    total = hit = 0
    for ids in seqs:
        total += len(ids)
        hit += sum(1 for t in ids if t in keep)
    return hit / max(total, 1)


def draft_config(target_config: Any, hidden: int, layers: int, vocab_size: int) -> Any:
    """A small :class:`LlamaConfig` sharing the target's vocabulary, RoPE base and special ids."""
    from transformers import LlamaConfig

    head_dim = 64 if hidden % 64 == 0 else 32 if hidden % 32 == 0 else hidden
    rope = getattr(target_config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)) or 10000.0)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
        num_key_value_heads=hidden // head_dim, head_dim=head_dim,
        max_position_embeddings=int(getattr(target_config, "max_position_embeddings", 2048) or 2048),
        rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=getattr(target_config, "bos_token_id", None),
        eos_token_id=getattr(target_config, "eos_token_id", None),
        pad_token_id=getattr(target_config, "pad_token_id", None))


@torch.no_grad()
def pca_projection(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """[V, D] embedding -> [D, dim] orthonormal projection onto its top principal directions."""
    e = emb.float()
    cov = e.T @ e / e.shape[0]
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[:, -dim:].flip(-1).contiguous()


def init_draft(target: nn.Module, hidden: int, layers: int, subset: torch.Tensor) -> nn.Module:
    """Build the draft; input embedding = E·P and head = E[subset]·P with P from :func:`pca_projection`.

    E is the target's input embedding [V, D]; when the target's head is untied its
    output embedding is used for the head instead.
    """
    cfg = draft_config(target.config, hidden, layers, target.get_input_embeddings().weight.shape[0])
    draft = build_subset_draft(cfg, subset)
    e_in = target.get_input_embeddings().weight.detach().float()
    out = target.get_output_embeddings()
    e_out = out.weight.detach().float() if out is not None else e_in
    d = min(hidden, e_in.shape[1])
    with torch.no_grad():
        p = pca_projection(e_in, d)
        emb = torch.zeros(e_in.shape[0], hidden)
        emb[:, :d] = e_in @ p
        draft.get_input_embeddings().weight.copy_(emb)
        head = torch.zeros(len(subset), hidden)
        head[:, :d] = e_out[subset] @ pca_projection(e_out, d)
        # RMS-normed hidden states have per-coordinate scale ~1, so logits ~ N(0, |w|^2):
        # scale rows to a mean norm of 2 (a soft but informative initial distribution).
        head *= 2.0 / head.norm(dim=-1).mean().clamp_min(1e-6)
        draft.lm_head.weight.copy_(head)
    return draft


def target_layers_draft(target: nn.Module, layers: list[int], subset: torch.Tensor) -> nn.Module:
    """A draft cut from the target itself: its input embedding, the decoder layers ``layers``
    (indices into the target's, in that order), its final norm and its output rows ``subset``.

    The draft has the target's width, heads and MLP (so the native runtime runs it with the
    same kernels); training then adapts the kept layers to stand in for the dropped ones.
    """
    import copy

    n = len(target.model.layers)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers {layers}: indices must lie in 0..{n - 1}")
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    draft = build_subset_draft(cfg, subset)
    out = target.get_output_embeddings()
    with torch.no_grad():
        draft.get_input_embeddings().weight.copy_(target.get_input_embeddings().weight)
        for j, i in enumerate(layers):
            draft.model.layers[j].load_state_dict(target.model.layers[i].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
        draft.lm_head.weight.copy_((out if out is not None else target.get_input_embeddings()).weight[subset])
    return draft


@torch.no_grad()
def agreement_stats(draft: nn.Module, seqs: list[tuple[list[int], list[int]]], k: int = 5,
                    max_len: int = 1024) -> dict[str, Any]:
    """Teacher-forced greedy agreement of ``draft`` with target continuations.

    Args:
        seqs: (prompt ids [P], target greedy response ids [R]) pairs.
        k: draft length for the fixed-K simulation.
    Returns:
        ``agree``: share of response positions where draft argmax == target token;
        ``tau``: tokens committed per target forward when greedy speculative decoding with
        fixed K is replayed on these sequences (exact for greedy: an accepted prefix equals
        the target's tokens, so the draft's proposals are its teacher-forced argmaxes);
        ``tau_iid``: (1 - a^(K+1)) / (1 - a), the independence estimate;
        ``per_position``: P(draft token i accepted | tokens < i accepted), i = 1..K.
    """
    draft.eval()
    dev = next(draft.parameters()).device
    hits = total = 0
    run = RunMetrics()  # one replayed round = one target forward
    for prompt, resp in seqs:
        ids = (prompt + resp)[-max_len:]
        r = min(len(resp), len(ids) - 1)
        if r <= 0:
            continue
        x = torch.tensor([ids], device=dev)
        logits = draft.lm_head.subset_logits(draft.model(x).last_hidden_state[0, -r - 1:-1])
        pred = draft.lm_head.token_ids[logits.argmax(-1)].tolist()  # [r] guess for resp[-r:]
        match = [int(a == b) for a, b in zip(pred, resp[-r:], strict=True)]
        hits += sum(match)
        total += r
        target = resp[-r:] + [-1]  # the target's greedy ids; no bonus row past the end
        t = 0
        while t < r:
            kk = min(k, r - t)  # the last round's draft stops at the end of the response
            n = greedy_from_argmax(pred[t:t + kk], target[t:t + kk + 1]).accepted
            run.record_round(kk, n)
            run.target_forwards += 1
            run.new_tokens += min(n + 1, r - t)
            t += n + 1
    a = hits / max(total, 1)
    tau_iid = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1.0
    draft.train()
    return {"agree": a, "tau": run.tau, "tau_iid": tau_iid, "tokens": total,
            "per_position": (run.per_position_acceptance + [0.0] * k)[:k]}
