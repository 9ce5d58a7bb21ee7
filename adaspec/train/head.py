"""``adaspec train-head``: train a feature head (EAGLE-style drafter) for one target.

Stage 1 (:mod:`adaspec.train.head_data`): one batched target pass per text stores the
target's last hidden state at every position (resumable shards). Stage 2 (here): the
head learns, at every position p, to predict f_p from (e(x_p), f_{p-1}) — a smooth-L1
regression on the feature plus a KL term that matches the target's own next-token
distribution over the head's vocabulary subset. A second pass feeds the head its own
first-pass estimates (f^_{p-1} instead of f_{p-1}), the situation of drafting two or more
tokens ahead, so later draft positions are trained too.

Checkpoints (``WORK/ckpt.pt``: head, optimiser, step) every ``--save-every`` steps;
``--resume`` continues from one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints.feature_head import FeatureHead, body_config, save_head
from ..checkpoints.loader import LoadedModel
from ..errors import InvalidArgumentError
from ..frontend.options import add_model_args
from ..runtime import set_threads
from .schedule import warmup_cosine


def subset_ids(tokens: torch.Tensor, size: int, always: list[int]) -> torch.Tensor:
    """The ``size`` most frequent ids of ``tokens`` (pad -1 ignored) plus ``always``, sorted [Vs]."""
    flat = tokens[tokens >= 0].long()
    counts = torch.bincount(flat)
    order = [i for i in torch.argsort(counts, descending=True).tolist() if counts[i] > 0]
    extra = [i for i in always if i not in set(order[:size])]
    chosen = set(order[: max(size - len(extra), 0)]) | set(always)
    return torch.tensor(sorted(chosen), dtype=torch.long)


class HeadLoss:
    """Feature regression + distribution matching for a batch of rows.

    ``w_sub``: [Vs, d] the target's output rows for the head's subset (frozen).
    """

    def __init__(self, w_sub: torch.Tensor, kl_weight: float) -> None:
        self.w_sub = w_sub
        self.kl_weight = kl_weight

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, t_logp: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """pred, target: [R, d]; t_logp: [R, Vs] target log-probs -> (loss, agreement rate)."""
        reg = F.smooth_l1_loss(pred, target)
        s_logp = F.log_softmax(pred @ self.w_sub.T, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        agree = (s_logp.argmax(-1) == t_logp.argmax(-1)).float().mean()
        return reg + self.kl_weight * kl, agree


def _rows(head: FeatureHead, emb_w: torch.Tensor, toks: torch.Tensor, feats: torch.Tensor,
          loss_fn: HeadLoss, second_pass: float) -> tuple[torch.Tensor, list[float]]:
    """Loss of one batch. toks [B, T] int (pad -1), feats [B, T, d] -> (loss, [a1, a2])."""
    valid = toks[:, 1:] >= 0  # rows p = 1..T-1
    emb = emb_w[toks[:, 1:].clamp(min=0).long()]  # e(x_p)  [B, T-1, d]
    f_prev = feats[:, :-1]  # f_{p-1}
    target = feats[:, 1:][valid]  # f_p  [R, d]
    with torch.no_grad():
        t_logp = F.log_softmax(target @ loss_fn.w_sub.T, dim=-1)
    b, t = emb.shape[:2]
    pos = torch.arange(1, t + 1)[None].expand(b, t)
    pred = head(emb, f_prev, pos)
    loss, a1 = loss_fn(pred[valid], target, t_logp)
    stats = [a1.item(), float("nan")]
    if second_pass > 0:
        # drafting two ahead: f^_{p-1} from the first pass replaces f_{p-1} (row 1 keeps f_0)
        f2 = torch.cat([f_prev[:, :1], pred[:, :-1].detach()], dim=1)
        pred2 = head(emb, f2, pos)
        loss2, a2 = loss_fn(pred2[valid], target, t_logp)
        loss = loss + second_pass * loss2
        stats[1] = a2.item()
    return loss, stats


@torch.no_grad()
def evaluate(head: FeatureHead, emb_w: torch.Tensor, toks: torch.Tensor, feats: torch.Tensor,
             loss_fn: HeadLoss, batch: int = 16) -> dict[str, float]:
    """Agreement with the target's argmax (over the subset) with true (a1) and own (a2) features."""
    head.eval()
    a1 = a2 = 0.0
    n = 0
    for i in range(0, len(toks), batch):
        _, (x1, x2) = _rows(head, emb_w, toks[i: i + batch], feats[i: i + batch].float(), loss_fn, 1.0)
        a1 += x1 * len(toks[i: i + batch])
        a2 += x2 * len(toks[i: i + batch])
        n += len(toks[i: i + batch])
    head.train()
    return {"a1": round(a1 / n, 4), "a2": round(a2 / n, 4)}


def _features(args: argparse.Namespace, target: LoadedModel, work: Path,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's features of the training and dev texts (extracted first as far as
    ``--extract-minutes`` allows): tokens [N, T] (-1 = padding) and features [N, T, d], twice."""
    from . import head_data as hd

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else work / "features"
    dev_dir = work / "dev-features"
    if args.texts == "greedy":
        from .draft_data import load_prompts, parse_sources, resolve_data_dir

        sources, root = parse_sources(args.sources), resolve_data_dir(args.shared_data)
        if args.extract_minutes > 0:
            hd.greedy_extract(target.model, target.tokenizer, load_prompts(sources, root, "train"), data_dir,
                              minutes=args.extract_minutes, max_new_tokens=args.max_new_tokens)
        if not (dev_dir / "progress.txt").is_file():
            dev_prompts = load_prompts(sources, root, "dev")[: args.eval_texts]
            hd.greedy_extract(target.model, target.tokenizer, dev_prompts, dev_dir, minutes=60,
                              max_new_tokens=args.max_new_tokens, progress=False)
    else:
        if args.extract_minutes > 0:
            texts = hd.mix_texts(hd.training_texts(target.tokenizer))
            hd.extract(target.model, [ids for _, ids in texts], data_dir, minutes=args.extract_minutes)
        if not (dev_dir / "progress.txt").is_file():
            dev_texts = hd.training_texts(target.tokenizer, split="dev", max_tokens=args.seq_len)
            dev = hd.mix_texts(dev_texts, seed=1)
            hd.extract(target.model, [ids for _, ids in dev[: args.eval_texts]], dev_dir, minutes=60,
                       progress=False)
    toks, feats = hd.load_shards(data_dir)
    dtoks, dfeats = hd.load_shards(dev_dir)
    toks, feats = toks[:, : args.seq_len], feats[:, : args.seq_len]
    print(f"train-head: {int((toks >= 0).sum())} training tokens in {len(toks)} texts; "
          f"{int((dtoks >= 0).sum())} dev tokens", flush=True)
    return toks, feats, dtoks, dfeats


def train(args: argparse.Namespace) -> None:
    """The ``train-head`` command (see :func:`add_arguments`)."""
    from tqdm import tqdm

    from ..checkpoints.loader import load_model, vocab_fingerprint

    torch.manual_seed(args.seed)
    if args.threads:
        set_threads(args.threads)
    target = load_model(args.target, dtype="float32")
    if target.tokenizer is None:
        raise InvalidArgumentError(f"target {args.target!r} has no tokenizer (needed for the training texts)")
    work = Path(args.work_dir or Path(args.out) / "work").expanduser()
    toks, feats, dtoks, dfeats = _features(args, target, work)

    w_full = target.model.get_output_embeddings().weight.detach().float()
    emb_w = target.model.get_input_embeddings().weight.detach().float()
    eos = target.tokenizer.eos_token_id
    ckpt = work / "ckpt.pt"
    state = torch.load(ckpt) if args.resume and ckpt.is_file() else None
    if state is not None:
        token_ids = state["token_ids"]
    else:
        always = [i for i in (eos, target.tokenizer.bos_token_id) if i is not None]
        token_ids = subset_ids(toks, args.vocab, always)
    meta = {"target": target.name, "target_vocab_sha256": vocab_fingerprint(target.tokenizer),
            "target_hidden_size": int(target.model.config.hidden_size)}
    head = FeatureHead(body_config(target.model.config, args.intermediate), token_ids, meta)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    loss_fn = HeadLoss(w_full[token_ids].contiguous(), args.kl_weight)
    gen = torch.Generator().manual_seed(args.seed + step)
    history = state.get("history", []) if state else []
    bar = tqdm(total=args.steps, initial=step, unit="step", desc="train-head")
    t0 = time.monotonic()
    seen = state.get("tokens_seen", 0) if state else 0
    while step < args.steps:
        lr = warmup_cosine(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(toks), (args.batch_size,), generator=gen)
        bt = toks[idx]
        width = int((bt >= 0).sum(1).max())
        loss, (a1, a2) = _rows(head, emb_w, bt[:, :width], feats[idx, :width].float(), loss_fn,
                               args.second_pass)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        seen += int((bt >= 0).sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", a1=f"{a1:.3f}", a2=f"{a2:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(head, emb_w, dtoks, dfeats, loss_fn)
            ev.update(step=step, tokens_seen=seen, minutes=round((time.monotonic() - t0) / 60, 1))
            history.append(ev)
            tqdm.write(f"train-head: {ev}")
        if step % args.save_every == 0 or step == args.steps:
            work.mkdir(parents=True, exist_ok=True)
            head.meta.update(steps=step, tokens_seen=seen, history=history)
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                        "token_ids": token_ids,
                        "history": history, "tokens_seen": seen}, str(ckpt) + ".tmp")
            Path(str(ckpt) + ".tmp").rename(ckpt)
            save_head(head, Path(args.out))
    bar.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``adaspec train-head``."""
    add_model_args(p, ("target", "threads"), target="target model (default: the embedded SmolLM2-135M)")
    p.add_argument("--out", required=True, help="directory for the trained head")
    p.add_argument("--work-dir", help="features, dev features and checkpoints (default: OUT/work)")
    p.add_argument("--data-dir", help="existing feature shards to train on (default: WORK/features)")
    p.add_argument("--extract-minutes", type=float, default=30.0,
                   help="minutes of target passes to extract features (0: use what is there)")
    p.add_argument("--texts", choices=("greedy", "answers"), default="greedy",
                   help="greedy: the target's own greedy continuations of the train prompts, features "
                        "from the generating forwards (on-policy); answers: prompt + the sets' reference "
                        "answers and standard-library source, one teacher-forced pass each")
    p.add_argument("--sources", default="default",
                   help="prompt sources for --texts greedy (as train-draft's --sources)")
    p.add_argument("--shared-data", help="prompt data directory (default: $ADASPEC_DATA or ../shared/data)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="continuation length for --texts greedy")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16, help="texts per step")
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=0.5)
    p.add_argument("--second-pass", type=float, default=0.5,
                   help="weight of the self-fed second pass (0: off)")
    p.add_argument("--vocab", type=int, default=8192, help="size of the head's output vocabulary subset")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: the target's)")
    p.add_argument("--eval-texts", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from WORK/ckpt.pt")


def add_train_head_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``adaspec train-head``."""
    p = sub.add_parser("train-head", help="train a feature head (EAGLE-style draft on the target's features)",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=train)
