"""``adaspec distill-draft``: train an independent draft on the target's soft targets.

Road 1 of a better draft (DistillSpec): instead of the target's sampled or greedy text,
the draft matches the target's whole next-token distribution at every position of a
text (KL(p_target || q_draft) over the draft's output subset). The target's
distributions come for free from the feature shards of ``adaspec train-head``
(:mod:`adaspec.train.head_data`): p = softmax(W_sub f) with the target's own LM-head
rows W_sub for the draft's subset. The draft starts from an existing reduced-vocabulary
draft (warm start) and keeps its frozen input embedding.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..frontend.options import add_model_args
from ..runtime import set_threads
from .schedule import warmup_cosine


def _kl_batch(model, w_sub: torch.Tensor, toks: torch.Tensor, feats: torch.Tensor,
              ) -> tuple[torch.Tensor, float]:
    """toks [B, T] (pad -1), feats [B, T, d_t] -> (mean KL over valid positions, agreement)."""
    valid = toks >= 0
    hid = model.model(input_ids=toks.clamp(min=0).long(), attention_mask=valid.long()).last_hidden_state
    s_logp = F.log_softmax(model.lm_head.subset_logits(hid[valid]).float(), dim=-1)  # [R, Vs]
    with torch.no_grad():
        t_logp = F.log_softmax(feats[valid].float() @ w_sub.T, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    agree = (s_logp.argmax(-1) == t_logp.argmax(-1)).float().mean().item()
    return kl, agree


def distill(args: argparse.Namespace) -> int:
    """The ``distill-draft`` command."""
    from tqdm import tqdm

    from ..checkpoints.loader import load_model
    from ..checkpoints.subset_draft import save_subset_draft
    from .head_data import load_shards

    torch.manual_seed(args.seed)
    if args.threads:
        set_threads(args.threads)
    target = load_model(args.target, dtype="float32")
    draft = load_model(args.draft, dtype="float32", role="draft")
    model = draft.model
    ids = getattr(model.lm_head, "token_ids", None)
    if ids is None:
        raise InvalidArgumentError(f"draft {args.draft!r} has no reduced-vocabulary head (adaspec draft)")
    w_sub = target.model.get_output_embeddings().weight.detach().float()[ids].contiguous()
    toks, feats = load_shards(Path(args.features).expanduser())
    dtoks, dfeats = load_shards(Path(args.dev_features).expanduser())
    toks, feats = toks[:, : args.seq_len], feats[:, : args.seq_len]
    model.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        tot = n = 0.0
        for i in range(0, len(dtoks), 16):
            _, a = _kl_batch(model, w_sub, dtoks[i: i + 16], dfeats[i: i + 16])
            tot, n = tot + a * len(dtoks[i: i + 16]), n + len(dtoks[i: i + 16])
        model.train()
        return round(tot / n, 4)

    history = [{"step": 0, "agree": evaluate()}]
    print(f"distill-draft: {int((toks >= 0).sum())} tokens; start agreement {history[0]['agree']}",
          flush=True)
    t0, seen = time.monotonic(), 0
    bar = tqdm(total=args.steps, unit="step", desc="distill-draft")
    for step in range(1, args.steps + 1):
        lr = warmup_cosine(step - 1, args.steps, args.lr, args.warmup)  # steps count from 1 here
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(toks), (args.batch_size,), generator=gen)
        bt = toks[idx]
        width = int((bt >= 0).sum(1).max())
        loss, agree = _kl_batch(model, w_sub, bt[:, :width], feats[idx, :width])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += int((bt >= 0).sum())
        bar.update(1)
        bar.set_postfix(kl=f"{loss.item():.3f}", agree=f"{agree:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            history.append({"step": step, "agree": evaluate(), "tokens_seen": seen,
                            "minutes": round((time.monotonic() - t0) / 60, 1)})
            tqdm.write(f"distill-draft: {history[-1]}")
            meta = dict(getattr(model.config, "adaspec_draft", {}) or {})
            meta["distill"] = {"features": str(args.features), "steps": step, "history": history}
            model.eval()
            save_subset_draft(model, Path(args.out), meta)
            model.train()
    bar.close()
    return 0


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``adaspec distill-draft``."""
    p = sub.add_parser("distill-draft", help="train a draft on the target's soft targets (KL)",
                       description=__doc__.split("\n\n")[0])
    add_model_args(p, ("target", "draft", "threads"),
                   draft="the draft to start from (a reduced-vocabulary adaspec draft)")
    p.add_argument("--features", required=True, help="feature shards of train-head (train split texts)")
    p.add_argument("--dev-features", required=True, help="feature shards of dev-split texts")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=distill)
