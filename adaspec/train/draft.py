"""``adaspec train-draft``: distil a small reduced-vocabulary draft from a target.

Pipeline (each stage resumable):

1. prompts from the data sets and the Python standard library (:mod:`.draft_data`);
2. the target writes greedy continuations (self-distillation), cached as token-id shards;
3. output subset = most frequent tokens (target responses weigh 1, prompts and reference
   answers 0.2) plus EOS and common code tokens; embedding and head initialised from a PCA
   projection of the target's embedding (:mod:`.draft_model_init`); the input embedding stays
   frozen (most rows never see a gradient on small data, and decay would erode them);
4. cross-entropy on next-token prediction over the subset (targets outside it are ignored;
   response positions weight 1, prompt positions ``--prompt-weight``, default 0); part of each
   batch (``--ref-fraction``, loss weight ``--ref-weight``) is the data sets' own answers and
   stdlib source code, plain LM text that costs no target compute; AdamW with warm-up and
   cosine decay; held-out agreement / simulated tau every ``--eval-every`` steps; the best
   checkpoint is written to ``--out`` as a draft directory ``load_model(out, role="draft")`` reads.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench.datasets import Prompt
from ..checkpoints.subset_draft import save_subset_draft
from ..errors import InvalidArgumentError, ModelLoadError
from ..frontend.options import add_model_args
from ..runtime import set_threads
from .draft_data import (
    CODE_SOURCES,
    Example,
    generate_shards,
    load_prompts,
    load_shards,
    parse_sources,
    prompt_text,
    reference_examples,
    resolve_data_dir,
)
from .draft_model_init import CODE_STRINGS, agreement_stats, choose_subset, coverage, init_draft
from .schedule import warmup_cosine


class Logger:
    """Writes lines to stderr and appends them to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def add_train_draft_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train-draft`` on an argparse subparsers object (``func=run_train_draft``)."""
    p = subparsers.add_parser("train-draft", help="distil a small draft model from a target",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ("target", "device", "threads"), target="default | HF id | local path",
                   device="cpu or cuda (default cpu)", threads="torch CPU threads (default 1)")
    p.set_defaults(threads=1)
    p.add_argument("--out", required=True, help="draft directory to write (config.json + model.safetensors)")
    p.add_argument("--data", default="default",
                   help="prompt sources: default | all | comma list of gsm8k,codegen,roleplay,"
                        "self_instruct,code_alpaca,stdlib_code,stdlib_chat "
                        "(code_alpaca is CC BY-NC 4.0, not in default)")
    p.add_argument("--data-dir", default=None,
                   help="prompt data dir (default $ADASPEC_DATA or ../shared/data)")
    p.add_argument("--work-dir", default=None, help="checkpoints, logs and generated data "
                   "(default ~/.cache/adaspec/train-draft/<hash of --out>)")
    p.add_argument("--data-cache", default=None, help="generated-continuation shards (default WORK/data)")
    p.add_argument("--max-prompts", type=int, default=0, help="use at most N training prompts (0: all)")
    p.add_argument("--gen-minutes", type=float, default=60.0, help="time budget for generating data")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=160, help="skip longer prompts when generating")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of target continuations")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts per category (code, chat)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--prompt-weight", type=float, default=0.0,
                   help="loss weight of prompt positions (real text, not target output)")
    p.add_argument("--ref-fraction", type=float, default=0.5,
                   help="share of each batch drawn from the data sets' own answers and stdlib source "
                        "(plain LM text, no target compute)")
    p.add_argument("--ref-weight", type=float, default=0.5, help="loss weight of that reference text")
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--reload-every", type=int, default=0,
                   help="re-read the data cache every N steps (while another process still generates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from WORK/ckpt.pt")
    p.set_defaults(func=run_train_draft)
    return p


def _check_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InvalidArgumentError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc}") from None


Seq = tuple[list[int], int, float]


@contextmanager
def _deferred_interrupt():
    """Within the block, Ctrl-C (SIGINT) only sets ``flag["hit"]``: the training loop ends at
    a step boundary and checkpoints, instead of dying inside an optimiser update."""
    flag = {"hit": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["hit"] = True

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave SIGINT alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _sequences(examples: list[Example], seq_len: int, weight: float = 1.0) -> list[Seq]:
    """(ids, index of the first response token, loss weight of the response) per example.

    Prompts are cut from the left to fit ``seq_len``.
    """
    out = []
    for ex in examples:
        resp = ex.response[: seq_len - 1]
        room = seq_len - len(resp)
        prompt = ex.prompt[-room:] if room > 0 else []
        if resp:
            out.append((prompt + resp, len(prompt), weight))
    return out


def make_batch(seqs: list[Seq], remap: torch.Tensor, prompt_weight: float,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch.

    Returns:
        ids [B, T] int64 inputs; labels [B, T] index into the subset (-100 = ignore);
        weights [B, T] float loss weight (the sequence's weight on response targets,
        ``prompt_weight`` on prompt targets, 0 on padding and targets outside the subset).
    """
    t = max(len(s) for s, _, _ in seqs) - 1
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    weights = torch.zeros(len(seqs), t)
    for i, (s, start, resp_w) in enumerate(seqs):
        x = torch.tensor(s)
        n = len(s) - 1
        ids[i, :n] = x[:-1]
        labels[i, :n] = remap[x[1:]]
        w = torch.full((n,), prompt_weight)
        w[max(start - 1, 0):] = resp_w  # position start-1 predicts the first response token
        weights[i, :n] = w
    weights[labels < 0] = 0.0
    labels[labels < 0] = -100
    return ids, labels, weights


def _heldout(target: Any, tok: Any, prompts: list[Prompt], cache: Path, n: int, args: Any, log: Logger,
             ) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Target continuations of ``n`` held-out (``dev`` split) code and ``n`` chat prompts."""
    code = [p for p in prompts if p.source in CODE_SOURCES][:n]
    chat = [p for p in prompts if p.source not in CODE_SOURCES and not p.raw][:n]
    generate_shards(target, tok, code + chat, cache, batch_size=args.gen_batch,
                    max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, log=log)
    exs = {e.key: e for e in load_shards(cache)}
    return {"code": [(exs[p.id].prompt, exs[p.id].response) for p in code if p.id in exs],
            "chat": [(exs[p.id].prompt, exs[p.id].response) for p in chat if p.id in exs]}


def run_train_draft(args: argparse.Namespace) -> int:
    """Entry point of ``adaspec train-draft``; returns the exit code."""
    from ..checkpoints.loader import load_model, vocab_fingerprint

    _check_args(args)
    sources = parse_sources(args.data)
    out = Path(args.out).expanduser()
    _check_writable(out, "--out directory")
    work = Path(args.work_dir).expanduser() if args.work_dir else (
        Path(os.environ.get("ADASPEC_CACHE") or Path.home() / ".cache" / "adaspec") / "train-draft"
        / hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10])
    _check_writable(work, "--work-dir")
    log = Logger(work / "train.log")
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    log(f"train-draft: target={args.target} out={out} work={work} sources={','.join(sources)}")

    gen_dtype = "bf16" if args.device == "cuda" else "fp32"  # fp32 batched generate is faster on CPU
    target = load_model(args.target, dtype=gen_dtype, device=args.device, role="target")
    tok = target.tokenizer
    if tok is None:
        raise ModelLoadError(f"target {args.target!r} has no tokenizer; the draft needs one to train on")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = _TrainingData.prepare(args, target.model, tok, sources, work, log)
    state = _read_checkpoint(args, work / "ckpt.pt", log)
    vocab = target.model.get_input_embeddings().weight.shape[0]
    subset = state["subset"] if state else _output_subset(args, tok, data, vocab)
    cov_train = coverage([e.response for e in data.examples], subset)
    cov_eval = {k: coverage([r for _, r in v], subset) for k, v in data.heldout.items()}
    log(f"subset: {len(subset)} tokens; coverage of target responses: train {cov_train:.3f}, "
        + ", ".join(f"held-out {k} {v:.3f}" for k, v in cov_eval.items()))
    draft = init_draft(target.model.float(), args.hidden, args.layers, subset).to(args.device)
    del target  # only the draft trains from here on
    meta = {"draft_vocab_size": len(subset), "target_vocab_sha256": vocab_fingerprint(tok),
            "target": target_name(args.target)}
    return _DraftTrainer(args, draft, subset, vocab, state, data, tok, sources, meta, work, log).run(out)


def _check_args(args: argparse.Namespace) -> None:
    """Raise InvalidArgumentError (one line) for a bad count, rate or device."""
    for name in ("steps", "batch_size", "seq_len", "hidden", "layers", "draft_vocab", "threads"):
        if getattr(args, name) <= 0:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0:
        raise InvalidArgumentError("--lr must be positive")
    if args.device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"--device {args.device!r}: train-draft runs on cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: no CUDA device is available")


@dataclass
class _TrainingData:
    """The training prompts, the shard cache of the target's continuations of them, the
    examples read back from it, and the held-out (dev) continuations."""

    prompts: list[Prompt]
    data_dir: Path
    cache: Path
    examples: list[Example]
    heldout: dict[str, list[tuple[list[int], list[int]]]]

    @classmethod
    def prepare(cls, args: argparse.Namespace, target: Any, tok: Any, sources: list[str], work: Path,
                log: Logger) -> _TrainingData:
        """Generate what ``--gen-minutes`` allows, then read the shards back.

        Raises:
            InvalidArgumentError: no generated continuation of a training prompt yet.
        """
        data_dir = resolve_data_dir(args.data_dir)
        prompts = load_prompts(sources, data_dir, "train")
        if args.max_prompts:
            prompts = prompts[: args.max_prompts]
        cache = Path(args.data_cache).expanduser() if args.data_cache else work / "data"
        if args.gen_minutes > 0:
            log(f"generating target continuations for up to {args.gen_minutes} min ({len(prompts)} prompts)")
            generate_shards(target, tok, prompts, cache, batch_size=args.gen_batch,
                            max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                            deadline=time.time() + 60 * args.gen_minutes, log=log)
        data = cls(prompts, data_dir, cache, [], {})
        data.reload()
        if not data.examples:
            raise InvalidArgumentError(f"no training data: no generated continuations in {cache} "
                                       "(raise --gen-minutes or check --data)")
        dev_prompts = load_prompts(sources, data_dir, "dev") if args.eval_prompts > 0 else []
        data.heldout = _heldout(target, tok, dev_prompts, work / "heldout", args.eval_prompts, args, log)
        return data

    def reload(self) -> None:
        """Read the cache again (a generation running beside the training adds shards)."""
        allowed = {p.id for p in self.prompts}
        self.examples = [e for e in load_shards(self.cache) if e.key in allowed]


def _read_checkpoint(args: argparse.Namespace, path: Path, log: Logger) -> dict[str, Any] | None:
    """The ``--resume`` checkpoint, or None (no ``--resume``, or none written yet).

    Raises:
        InvalidArgumentError: a truncated or corrupt checkpoint.
    """
    state = None
    if args.resume and path.is_file():
        try:
            state = torch.load(path, weights_only=False)
        except Exception as exc:  # truncated / corrupt pickle: several exception types
            raise InvalidArgumentError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it "
                                       "to start over") from None
    if args.resume and state is None:
        log(f"--resume: no checkpoint at {path}; starting fresh")
    return state


def _output_subset(args: argparse.Namespace, tok: Any, data: _TrainingData, vocab: int) -> list[int]:
    """The draft's output ids: target responses weigh 1, prompt text 0.2, plus EOS / BOS and
    common code tokens."""
    code_ids = [i for s in CODE_STRINGS for i in tok.encode(s, add_special_tokens=False)]
    special = [t for t in (tok.eos_token_id, tok.bos_token_id) if t is not None]
    prompt_ids = [tok.encode(prompt_text(p, tok), add_special_tokens=False) for p in data.prompts[:20000]]
    return choose_subset([(e.response, 1.0) for e in data.examples] + [(ids, 0.2) for ids in prompt_ids],
                         min(args.draft_vocab, vocab), vocab, special + code_ids)


class _DraftTrainer:
    """The training loop's state: the draft, its optimiser, the step / best score / history,
    the tokens seen; checkpoints it so that a resumed run goes on exactly (RNG states too)."""

    def __init__(self, args: argparse.Namespace, draft: Any, subset: list[int], vocab: int,
                 state: dict[str, Any] | None, data: _TrainingData, tok: Any, sources: list[str],
                 meta: dict[str, Any], work: Path, log: Logger) -> None:
        self.args, self.draft, self.subset, self.data, self.sources = args, draft, subset, data, sources
        self.meta, self.work, self.log, self.state = meta, work, log, state
        draft.get_input_embeddings().weight.requires_grad_(False)
        self.params = [p for p in draft.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
        self.step, self.best, self.history = 0, -1.0, []
        if state:
            draft.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.best, self.history = state["step"], state["best"], state["history"]
            log(f"resumed at step {self.step} (best score {self.best:.4f})")
        self.remap = torch.full((vocab,), -100, dtype=torch.long)
        self.remap[subset] = torch.arange(len(subset))
        self.seqs = _sequences(data.examples, args.seq_len)
        self.refs = _sequences(reference_examples(sources, data.data_dir, tok, "train"),
                               args.seq_len, args.ref_weight) if args.ref_fraction > 0 else []
        self.n_ref = round(args.batch_size * args.ref_fraction) if self.refs else 0
        log(f"reference text: {len(self.refs)} sequences, {sum(len(s) for s, _, _ in self.refs)} tokens, "
            f"{self.n_ref} per batch")
        n_resp = sum(len(e.response) for e in data.examples)
        n_all, n_train = (sum(p.numel() for p in ps) / 1e6
                          for ps in (list(draft.parameters()), self.params))
        log(f"data: {len(data.examples)} examples, {n_resp} response tokens; "
            f"draft {args.layers}x{args.hidden}, {n_all:.1f}M params ({n_train:.1f}M trainable)")
        self.tokens_seen = state["tokens_seen"] if state else 0

    def evaluate(self) -> dict[str, Any]:
        """Agreement / simulated tau of the draft on each held-out set."""
        res = {k: agreement_stats(self.draft, v) for k, v in self.data.heldout.items() if v}
        return {k: {m: (round(x, 4) if isinstance(x, float) else x) for m, x in r.items()
                    if m != "per_position"} | {"per_position": [round(x, 3) for x in r["per_position"]]}
                for k, r in res.items()}

    def save(self, path: Path, metrics: dict[str, Any]) -> None:
        """Write the draft (bf16) to ``path`` as a draft directory."""
        m = dict(self.meta)
        m["training"] = {"steps": self.step, "tokens_seen": self.tokens_seen, "metrics": metrics,
                         "hidden": self.args.hidden, "layers": self.args.layers, "sources": self.sources}
        save_subset_draft(copy.deepcopy(self.draft).to(torch.bfloat16), path, m)

    def checkpoint(self) -> None:
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        torch.save({"model": self.draft.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "best": self.best, "history": self.history, "subset": self.subset,
                    "tokens_seen": self.tokens_seen, "rng": rng}, self.work / "ckpt.tmp")
        (self.work / "ckpt.tmp").replace(self.work / "ckpt.pt")

    def train_step(self) -> torch.Tensor:
        """One optimiser step on a batch (training sequences plus reference text); the loss."""
        args = self.args
        for g in self.opt.param_groups:
            g["lr"] = warmup_cosine(self.step, args.steps, args.lr)
        batch = (random.sample(self.seqs, min(args.batch_size - self.n_ref, len(self.seqs)))
                 + random.sample(self.refs, self.n_ref))
        ids, labels, weights = (t.to(args.device) for t in make_batch(batch, self.remap, args.prompt_weight))
        hidden = self.draft.model(ids).last_hidden_state  # [B, T, d]
        keep = weights > 0  # score only positions that carry loss (the head dominates the cost)
        logits = self.draft.lm_head.subset_logits(hidden[keep]).float()  # [N, Vs]
        ce = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="none")  # [N]
        loss = (ce * weights[keep]).sum() / weights[keep].sum().clamp_min(1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        self.tokens_seen += int((labels >= 0).sum())
        return loss

    def run(self, out: Path) -> int:
        """Train to ``--steps`` (Ctrl-C checkpoints first); the best draft goes to ``out``."""
        from tqdm import tqdm

        args, log = self.args, self.log
        self.draft.train()
        tokens_start = self.tokens_seen  # for this process's tokens/s after a resume
        t_start, t_ckpt = time.time(), time.time()
        bar = tqdm(total=args.steps, initial=self.step, file=sys.stderr, dynamic_ncols=True,
                   desc="train-draft")
        if self.state and "rng" in self.state:  # the batches after a resume: those an unbroken run draws
            random.setstate(self.state["rng"]["python"])
            torch.set_rng_state(self.state["rng"]["torch"])
        with _deferred_interrupt() as stop:
            while self.step < args.steps:
                if args.reload_every and self.step and self.step % args.reload_every == 0:
                    self.data.reload()
                    self.seqs = _sequences(self.data.examples, args.seq_len)
                    log(f"reloaded data: {len(self.data.examples)} examples")
                loss = self.train_step()
                el = time.time() - t_start
                bar.update(1)
                rate = (self.tokens_seen - tokens_start) / max(el, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
                self.report(loss.item(), el, out)
                if time.time() - t_ckpt > 180 or self.step == args.steps or stop["hit"]:
                    self.checkpoint()
                    t_ckpt = time.time()
                if stop["hit"]:
                    bar.close()
                    log(f"interrupted at step {self.step}; checkpoint saved: rerun with --resume to continue")
                    raise KeyboardInterrupt
        bar.close()
        (self.work / "history.json").write_text(json.dumps(self.history, indent=1))
        log(f"done: {self.step} steps, {self.tokens_seen} tokens, {(time.time() - t_start) / 60:.1f} min; "
            f"best {self.best:.3f}; draft in {out}, history in {self.work / 'history.json'}")
        return 0

    def report(self, loss: float, elapsed: float, out: Path) -> None:
        """The log line every 50 steps; every ``--eval-every`` steps (and at the end) the
        held-out evaluation, saving the draft to ``out`` when it is the best so far."""
        args, step = self.args, self.step
        if step % 50 == 0:
            eta = elapsed / max(step - (self.state["step"] if self.state else 0), 1) * (args.steps - step)
            self.log(f"step {step}/{args.steps} loss {loss:.4f} lr {self.opt.param_groups[0]['lr']:.2e} "
                     f"tokens {self.tokens_seen} eta {eta / 60:.1f} min")
        if step % args.eval_every == 0 or step == args.steps:
            metrics = self.evaluate()
            score = sum(r["tau"] for r in metrics.values()) / max(len(metrics), 1)
            self.history.append({"step": step, "tokens": self.tokens_seen, "minutes": round(elapsed / 60, 2),
                                 "loss": round(loss, 4), **metrics})
            self.log(f"eval step {step}: " + json.dumps(metrics))
            if score > self.best:
                self.best = score
                self.save(out, metrics)
                self.log(f"new best (mean simulated tau {score:.3f}) saved to {out}")


def target_name(spec: str) -> str:
    """Human name of a target spec (``default`` -> SmolLM2-135M-Instruct)."""
    from ..checkpoints.loader import DEFAULT_TARGET_NAME

    return DEFAULT_TARGET_NAME if spec == "default" else spec
