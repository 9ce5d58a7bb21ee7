"""Fine-tune a reduced-vocabulary draft on a corpus of the target's greedy continuations.

``python -m adaspec.train.corpus_train --corpus /work/work-data/corpus --out runs/draft --work W``

The draft starts from an existing adaspec draft (default: the shipped one; same output
subset, so the trained predictors' inputs keep their meaning) and learns, at every
continuation position of a corpus row (:mod:`.corpus`), the target's next token:

    loss = (1 - kl) * CE(q, greedy token) + kl * KL(p_target || q)   over the draft's subset

where p_target is recomputed per batch by one teacher-forced target pass (bf16 on CPUs with
native bf16 matmuls, :func:`.corpus_speed.pick_dtype`; training data need not be exact),
so no distribution is ever stored. The draft's forward / backward run under bf16 autocast
on such CPUs too. Time-boxed runs (``--minutes``) resume from ``WORK/ckpt.pt``; every
``--eval-every`` steps the simulated fixed-K tau on two dev sets (HumanEval dev and
GPTeacher roleplay dev, the target's exact fp32 greedy continuations, made once into
``WORK/dev-*``) goes to ``WORK/history.json`` — the tau-against-training-tokens curve — and
the best draft (mean dev tau) is written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..frontend.options import add_model_args
from .corpus import CorpusRow, build, load_corpus, reference_rows
from .schedule import warmup_cosine

DEV_SETS = {"humaneval": "humaneval", "chat": "gpteacher_roleplay"}


def dev_prompts(n: int = 32) -> dict[str, list[Any]]:
    """The first ``n`` dev-split prompts of each set in :data:`DEV_SETS`."""
    from ..bench.datasets import load_dataset

    return {name: load_dataset(dataset, "dev")[:n] for name, dataset in DEV_SETS.items()}


def dev_sets(target: Any, work: Path, sets: dict[str, list[Any]], max_new_tokens: int = 128,
             ) -> dict[str, list[CorpusRow]]:
    """The target's greedy continuations of each named prompt list (built once into
    ``work/dev-NAME`` with the model as loaded: fp32, so the labels are exact)."""
    out = {}
    for name, prompts in sets.items():
        d = work / f"dev-{name}"
        build(target.model, target.tokenizer, prompts, d, minutes=60, batch_size=16,
              max_new_tokens=max_new_tokens, progress=False)
        out[name] = load_corpus(d)
    return out


def make_batch(rows: list[CorpusRow], seq_len: int, remap: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids`` [B, T] (pad 0) and ``labels`` [B, T]: at continuation positions the
    subset index of the next token (-1 when it is outside the subset), -100 elsewhere (prompt,
    padding). Prompts are cut from the left so that up to ``seq_len`` tokens remain."""
    seqs = []
    for r in rows:
        ids = r.ids.astype(np.int64)
        start = max(0, min(r.prompt_len - 1, len(ids) - seq_len))  # keep the continuation
        seqs.append((ids[start: start + seq_len], r.prompt_len - start))
    t = max(len(s) for s, _ in seqs) - 1
    x = torch.zeros(len(seqs), t, dtype=torch.long)
    y = torch.full((len(seqs), t), -100, dtype=torch.long)
    for i, (s, p) in enumerate(seqs):
        s = torch.from_numpy(s)
        x[i, : len(s) - 1] = s[:-1]
        lab = remap[s[1:]].clamp(min=-1)
        lab[: max(p - 1, 0)] = -100  # position p-1 predicts the first continuation token
        y[i, : len(s) - 1] = lab
    return x, y


def _autocast(enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class Step:
    """One optimiser step of the draft on a batch: CE on hard labels + KL to the teacher.

    With a ``teacher`` the hard labels are the teacher's argmax over the subset at every
    loss position (so any text trains the draft: reference answers too, not only the
    target's own continuations); without one, the corpus's greedy tokens.
    """

    def __init__(self, draft: Any, teacher: Any | None, w_sub: torch.Tensor, kl: float, bf16: bool,
                 opt: torch.optim.Optimizer) -> None:
        self.draft, self.teacher, self.w_sub = draft, teacher, w_sub
        self.kl, self.bf16, self.opt = kl, bf16, opt

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """x, y: [B, T] from :func:`make_batch` -> {"loss", "agree"}."""
        keep = y != -100  # [B, T] loss positions
        labels = y[keep].masked_fill(y[keep] < 0, -100)  # [N]; -100: no hard label
        t_logp = None
        if self.teacher is not None:
            with torch.inference_mode():
                h = self.teacher.model(input_ids=x).last_hidden_state[keep]  # [N, d_t]
                t_logp = F.log_softmax((h @ self.w_sub.T).float(), dim=-1)  # [N, Vs]
            t_logp = t_logp.clone()
            labels = t_logp.argmax(-1)
        with _autocast(self.bf16):
            hid = self.draft.model(input_ids=x).last_hidden_state[keep]  # [N, d]
            logits = self.draft.lm_head.subset_logits(hid)
        s_logp = F.log_softmax(logits.float(), dim=-1)  # [N, Vs]
        loss = F.nll_loss(s_logp, labels)
        if t_logp is not None and self.kl > 0:
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            loss = (1 - self.kl) * loss + self.kl * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.draft.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        agree = (s_logp.argmax(-1) == labels).float().mean().item()
        return {"loss": loss.item(), "agree": agree}


def evaluate(draft: Any, dev: dict[str, list[CorpusRow]], k: int = 5) -> dict[str, Any]:
    """Simulated fixed-``k`` tau, agreement and per-position acceptance on each dev set."""
    from .draft_model_init import agreement_stats

    out = {}
    with torch.no_grad():
        for name, rows in dev.items():
            seqs = [(r.ids[: r.prompt_len].tolist(), r.ids[r.prompt_len:].tolist()) for r in rows]
            st = agreement_stats(draft, seqs, k=k)
            out[name] = {"tau": round(st["tau"], 3), "agree": round(st["agree"], 4),
                         "per_position": [round(v, 3) for v in st["per_position"]]}
    draft.train()
    return out


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any, bool]:
    """(target fp32, teacher (bf16 where native, else the fp32 target) or None, draft fp32, bf16?)."""
    from ..checkpoints.loader import check_vocab_compat, load_model
    from .corpus_speed import pick_dtype

    if args.dtype not in ("auto", "fp32", "bf16"):
        raise InvalidArgumentError(f"--dtype {args.dtype}: training takes auto, fp32 or bf16")
    target = load_model(args.target, dtype="float32")
    draft = load_model(args.draft, dtype="float32", role="draft")
    check_vocab_compat(target, draft)
    if getattr(draft.model.lm_head, "token_ids", None) is None:
        raise InvalidArgumentError(f"draft {args.draft!r} has no reduced-vocabulary head (an adaspec draft)")
    if args.init_layers:  # a new draft cut from the target's layers, over the draft's output subset
        from .draft_model_init import target_layers_draft

        meta = {k: v for k, v in (getattr(draft.model.config, "adaspec_draft", None) or {}).items()
                if k in ("draft_vocab_size", "target", "target_vocab_sha256")}
        try:
            model = target_layers_draft(target.model, args.init_layers, draft.model.lm_head.token_ids)
        except ValueError as e:
            raise InvalidArgumentError(f"--init-layers: {e}") from None
        model.config.adaspec_draft = {**meta, "init_layers": args.init_layers}
        draft.model = model
    bf16 = pick_dtype() == torch.bfloat16 if args.dtype == "auto" else args.dtype == "bf16"
    teacher = None
    if args.labels == "teacher":
        teacher = load_model(args.target, dtype="bf16").model if bf16 else target.model
    return target, teacher, draft, bf16


def train(args: argparse.Namespace, dev: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """Time-boxed, resumable training run (see the module docstring); returns the last history row.

    ``dev``: named dev prompt lists (default :func:`dev_prompts`)."""
    import copy

    from ..checkpoints.subset_draft import save_subset_draft
    from ..runtime import set_threads

    set_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    target, teacher, draft, bf16 = _load(args)
    dev = dev_sets(target, work, dev if dev is not None else dev_prompts(args.dev_prompts))
    model = draft.model
    ids = model.lm_head.token_ids
    w_sub = target.model.get_output_embeddings().weight.detach()[ids].to(
        next(teacher.parameters()).dtype if teacher is not None else torch.float32).contiguous()
    remap = torch.full((target.model.config.vocab_size,), -100, dtype=torch.long)
    remap[ids] = torch.arange(len(ids))
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    ckpt = work / "ckpt.pt"
    st = torch.load(ckpt, weights_only=False) if ckpt.is_file() else None
    if st:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        random.setstate(st["rng"])
    else:
        st = {"step": 0, "tokens": 0, "best": -1.0, "history": [], "train_seconds": 0.0}
        st["history"].append({"step": 0, "tokens": 0, **evaluate(model, dev)})
        _log(work, st["history"][-1])
    rows = [r for r in load_corpus(Path(args.corpus)) if len(r.ids) > r.prompt_len]
    data_dir = Path(args.data_dir) if args.data_dir else None
    refs = reference_rows(target.tokenizer, data_dir) if args.ref_fraction > 0 and teacher is not None else []
    n_ref = args.batch_size if not rows else round(args.batch_size * args.ref_fraction) if refs else 0
    if not rows and not refs:
        raise InvalidArgumentError(f"no training data: no corpus rows in {args.corpus} and no reference text")
    _log(work, f"corpus: {len(rows)} rows, {sum(len(r.ids) - r.prompt_len for r in rows)} continuation "
               f"tokens; reference text: {len(refs)} rows, {sum(len(r.ids) for r in refs)} tokens, "
               f"{n_ref} of {args.batch_size} per batch")
    step_fn = Step(model, teacher, w_sub, args.kl, bf16, opt)
    model.train()
    deadline, t0 = time.monotonic() + 60 * args.minutes, time.monotonic()
    losses: list[float] = []
    while st["step"] < args.steps and time.monotonic() < deadline:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(st["step"], args.steps, args.lr, args.warmup)
        batch = random.sample(rows, args.batch_size - n_ref) + random.sample(refs, n_ref)
        x, y = make_batch(batch, args.seq_len, remap)
        m = step_fn(x, y)
        losses.append(m["loss"])
        st["step"] += 1
        st["tokens"] += int((y >= 0).sum())
        if st["step"] % 10 == 0:
            _log(work, f"step {st['step']} loss {m['loss']:.3f} agree {m['agree']:.3f} tokens {st['tokens']}")
        if st["step"] % args.eval_every == 0 or st["step"] == args.steps:
            ev = evaluate(model, dev)
            st["history"].append({"step": st["step"], "tokens": st["tokens"],
                                  "train_loss": round(sum(losses) / max(len(losses), 1), 4), **ev})
            losses = []
            _log(work, st["history"][-1])
            score = sum(v["tau"] for v in ev.values()) / len(ev)
            if score > st["best"]:
                st["best"] = score
                meta = dict(getattr(model.config, "adaspec_draft", {}) or {})
                meta["corpus_training"] = {"steps": st["step"], "tokens_seen": st["tokens"], "dev": ev,
                                           "kl": args.kl, "corpus": str(args.corpus)}
                save_subset_draft(copy.deepcopy(model).to(torch.bfloat16).eval(), out, meta)
            t0 = _save(st, t0, ckpt, model, opt)
    _save(st, t0, ckpt, model, opt)  # a time-boxed chunk keeps its steps since the last evaluation
    return st["history"][-1]


def _save(st: dict[str, Any], t0: float, ckpt: Path, model: Any, opt: torch.optim.Optimizer) -> float:
    """Checkpoint the run (state, weights, optimiser, rng) and its history; returns the new clock start."""
    st["train_seconds"] += time.monotonic() - t0
    torch.save({**st, "model": model.state_dict(), "opt": opt.state_dict(), "rng": random.getstate()},
               str(ckpt) + ".tmp")
    Path(str(ckpt) + ".tmp").replace(ckpt)
    (ckpt.parent / "history.json").write_text(json.dumps(st["history"], indent=1))
    return time.monotonic()


def _log(work: Path, msg: Any) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg if isinstance(msg, str) else json.dumps(msg)}"
    print(line, flush=True)
    with (work / "log.txt").open("a") as f:
        f.write(line + "\n")


def _layer_list(text: str) -> list[int]:
    """``"0,1,29"`` -> [0, 1, 29] (an argparse type: a bad list is a one-line error)."""
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated layer indices") from None
    if not out:
        raise argparse.ArgumentTypeError("no layer index given")
    return out


def parser() -> argparse.ArgumentParser:
    """Options of ``python -m adaspec.train.corpus_train``."""
    p = argparse.ArgumentParser(prog="python -m adaspec.train.corpus_train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="corpus shard directory (python -m adaspec.train.corpus)")
    p.add_argument("--out", required=True, help="draft directory for the best checkpoint (by mean dev tau)")
    p.add_argument("--work", required=True, help="checkpoint, dev sets, log and history.json")
    add_model_args(p, ("target", "draft", "dtype", "threads"), draft="adaspec draft to start from",
                   dtype="teacher pass and autocast dtype: auto (default: bf16 with native bf16 "
                         "matmuls) | fp32 | bf16",
                   threads="torch CPU threads (default 2)")
    p.set_defaults(threads=2)
    p.add_argument("--data-dir", default=None,
                   help="reference-text data (default $ADASPEC_DATA or ../shared/data)")
    p.add_argument("--minutes", type=float, default=9.0, help="stop (resumably) after this long")
    p.add_argument("--steps", type=int, default=3000, help="length of the lr schedule")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--labels", choices=("teacher", "greedy"), default="teacher",
                   help="teacher: hard labels = the teacher's argmax, recomputed per batch (any text "
                        "trains); greedy: the corpus's own tokens, no teacher pass (reference text unused)")
    p.add_argument("--kl", type=float, default=0.5,
                   help="weight of KL to the teacher (needs --labels teacher)")
    p.add_argument("--ref-fraction", type=float, default=0.5,
                   help="share of each batch from reference text (train-split answers and stdlib source)")
    p.add_argument("--init-layers", type=_layer_list, default=None,
                   help="start from a new draft cut from the target: these decoder layers "
                        "(comma-separated indices, e.g. 0,1), the target's embedding, norm and the "
                        "--draft's output subset of its head (default: start from --draft)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--dev-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    print(json.dumps(train(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
