"""Run every method on the same prompts, interleaved, appending one JSON line per result.

Protocol (docs/design.md §5): models are loaded once and shared by all methods; ``warmup``
untimed generations per method first; then for each prompt every method runs
``repeats`` times, the method order rotated by one per prompt so that machine drift
hits all methods alike. Each method keeps one generator for the whole run; its n-gram
source's cross-request suffix cache is emptied before every prompt (rows do not depend on
the order) unless ``in_order`` (``--in-order``), where it carries over from prompt to
prompt as in a server (the warm-up's answer is always dropped; a resumed run first puts
the finished rows' answers back). Each finished (prompt, method, repeat) is appended to
``results.jsonl`` and flushed; a rerun with the same ``out`` skips what is there, so
an interrupted run loses nothing. Every row carries the run settings (``cfg``); a rerun
with different settings into the same folder is refused rather than mixed.

Row fields: prompt_id, category, method, repeat, turns; the counts of
:class:`adaspec.metrics.RunMetrics` summed over the turns: prompt_tokens, new_tokens, wall_s,
tokens_per_s, prefill_s / draft_s / verify_s / policy_s, target_forwards,
draft_forwards, drafted_tokens, accepted_tokens, rounds, tree_nodes / branch_rounds /
branch_accepts (token trees: verified draft tokens incl. extra candidates, rounds with a
tree, rounds won by an extra candidate), accept_hist, pos_tested,
pos_accepted, tau, acceptance_rate, stop_reason (per turn), token_ids (per turn), extra
(per turn, policy reports), calibration (optional: ``[[p_hat, accepted], ...]`` taken
from a policy's ``report()["calibration"]``), cfg, ts.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.loader import LoadedModel, load_model
from ..drafters.registry import parse_draft
from ..drafters.suffix import DEFAULT_TOKENS
from ..errors import InvalidArgumentError, ensure_writable_dir
from ..metrics import RunMetrics
from .datasets import Prompt, load_dataset
from .methods import EngineRunner, MethodFailedError, MethodSpec, build_runner, parse_methods
from .report import (
    MARGINS_FILE,
    margin_key,
    mismatches,
    per_prompt,
    read_results,
    running_speedups,
    write_outputs,
)


class ResumeMismatchError(InvalidArgumentError):
    """``--out`` already holds results of a run with different settings."""


@dataclass
class BenchConfig:
    """Settings of one benchmark run (the CLI options, one to one)."""

    methods: str = "ar,hf,fixed:3,fixed:5"
    dataset: str = "humaneval"
    split: str = "test"
    limit: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = 0
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    runtime: str = "auto"
    warmup: int = 1
    repeats: int = 1
    memory: bool = True  # peak RSS per runtime, each in a fresh process (meta.memory)
    out: str = "runs/bench"
    target: str = "default"
    draft: str = "default"
    chat: bool | None = None  # None: by dataset (humaneval raw, others chat)
    progress: bool = True
    in_order: bool = False  # the suffix cache carries over from prompt to prompt (a server's view)
    suffix_cache_tokens: int = DEFAULT_TOKENS
    command: str = field(default_factory=lambda: " ".join(sys.argv))

    def resume_key(self) -> dict[str, Any]:
        """Settings that must match for rows to be comparable (and resumable)."""
        key = {"dataset": self.dataset, "split": self.split, "max_new_tokens": self.max_new_tokens,
               "temperature": self.temperature, "seed": self.seed, "dtype": self.dtype,
               "target": self.target, "draft": self.draft, "chat": self.chat, "runtime": self.runtime}
        if self.in_order or self.suffix_cache_tokens != DEFAULT_TOKENS:  # older rows lack them
            key.update(in_order=self.in_order, suffix_cache_tokens=self.suffix_cache_tokens)
        return key


def eos_ids(target: LoadedModel) -> frozenset[int]:
    """EOS ids exactly as adaspec's generator uses them."""
    return target.eos_ids


def encode_turn(tokenizer: Any, prompt: Prompt, turn: int, answers: list[str], chat: bool) -> list[int]:
    """Token ids for turn ``turn`` of ``prompt`` given the model's own earlier ``answers``."""
    if tokenizer is None:
        raise InvalidArgumentError("the target has no tokenizer; the benchmark needs one")
    if not chat:
        text = "".join(t + a for t, a in zip(prompt.turns[:turn], answers, strict=False)) + prompt.turns[turn]
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError("the target has no chat template; use --no-chat")
    messages: list[dict[str, str]] = []
    for t, a in zip(prompt.turns[:turn], answers, strict=False):
        messages += [{"role": "user", "content": t}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": prompt.turns[turn]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def run_one(runner: Any, prompt: Prompt, tokenizer: Any, cfg: BenchConfig, chat: bool) -> dict[str, Any]:
    """All turns of ``prompt`` with one method -> the summed statistics of one results row."""
    pooled = RunMetrics()
    row: dict[str, Any] = {"stop_reason": [], "token_ids": [], "extra": []}
    answers: list[str] = []
    calibration: list[Any] = []
    for turn in range(len(prompt.turns)):
        ids = encode_turn(tokenizer, prompt, turn, answers, chat)
        res = runner.generate(ids, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        s = res.stats
        pooled = pooled + s
        row["stop_reason"].append(s.stop_reason)
        row["token_ids"].append(res.token_ids)
        extra = dict(s.extra)
        calibration += list(extra.pop("calibration", []) or [])
        row["extra"].append(extra)
        answers.append(tokenizer.decode(res.token_ids, skip_special_tokens=True))
    row.update(pooled.counts(), tokens_per_s=pooled.tokens_per_s, tau=pooled.tau,
               acceptance_rate=pooled.acceptance_rate)
    # transformers exposes no draft / verify / policy split: say so instead of reporting 0 %
    row["stage_times"] = isinstance(runner, EngineRunner)
    if not any(row["extra"]):
        del row["extra"]
    if calibration:
        row["calibration"] = calibration
    return row


def run_metadata(cfg: BenchConfig, target: LoadedModel, draft: LoadedModel | None) -> dict[str, Any]:
    """Models, dtype, threads, versions, CPU and command line of this run."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"target": target.name, "draft": draft.name if draft else None,
            "draft_vocab": getattr(getattr(draft.model, "config", None), "adaspec_draft", None)
            if draft else None,
            "dtype": str(target.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "device": str(target.device),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "command": cfg.command, "config": asdict(cfg)}


def _prepare_file(path: Path) -> None:
    """Drop a partial last line (a run killed mid-write) so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as fh:
        fh.truncate(cut)


def run_benchmark(
    cfg: BenchConfig,
    *,
    prompts: list[Prompt] | None = None,
    target: LoadedModel | None = None,
    draft: LoadedModel | None = None,
    stop_after: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a benchmark and write results.jsonl, summary.json, report.md, plots.

    Args:
        cfg: run settings.
        prompts: use these instead of ``cfg.dataset`` / ``cfg.split`` / ``cfg.limit``.
        target, draft: already loaded models (else loaded from ``cfg``).
        stop_after: stop after this many new rows (simulates an interruption; tests).
        on_row: called with every new row.

    Returns:
        the summary dict (also written to ``summary.json``).
    """
    specs = parse_methods(cfg.methods)
    prompts = _checked_prompts(cfg, prompts)
    if cfg.threads:
        from ..runtime import set_threads

        set_threads(cfg.threads)
    out = Path(cfg.out)
    rows, todo = _resume(cfg, out, prompts, specs)
    # models given in code: no spec to reload; the probe measures host memory (CPU runs)
    measure_memory = cfg.memory and target is None and cfg.device == "cpu"
    target, draft = _load_models(cfg, specs, target, draft)
    run = _Run(cfg, specs, prompts, target, draft)
    run.warm_up(todo, rows)
    finished = False
    try:
        new_rows = run.rows(todo, rows, out / "results.jsonl", stop_after, on_row)
        finished = True
        if measure_memory and new_rows:
            rts = set(run.meta["runtimes"].values()) & {"eager", "compiled", "compiled-fp32"}
            run.meta["memory"] = peak_memory(cfg, sorted(rts), draft is not None,
                                             str(target.dtype).removeprefix("torch."))
    finally:
        if rows:
            if finished and not cfg.temperature:  # extra target forwards: not on Ctrl-C
                explain_mismatches(out, rows, {p.id: p for p in prompts}, target, run.chat_for)
            write_outputs(out, rows, run.meta)
    return json.loads((out / "summary.json").read_text())


def _checked_prompts(cfg: BenchConfig, prompts: list[Prompt] | None) -> list[Prompt]:
    """The run's prompts (``prompts`` or the dataset split, cut to ``--limit``), once the
    settings are checked.

    Raises:
        InvalidArgumentError: bad counts, ``--in-order`` with repeats, no prompts.
    """
    if cfg.in_order and cfg.repeats > 1:
        raise InvalidArgumentError("--in-order runs each prompt once per method (--repeats 1): a "
                                   "repeat would find its own earlier answer in the suffix cache")
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.max_new_tokens < 1 or (cfg.limit is not None
                                                                          and cfg.limit < 1):
        raise InvalidArgumentError("--repeats, --max-new-tokens and --limit must be >= 1, --warmup >= 0")
    if prompts is None:
        prompts = load_dataset(cfg.dataset, cfg.split)
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise InvalidArgumentError(f"no prompts in {cfg.dataset!r} split {cfg.split!r}")
    return prompts


def _resume(cfg: BenchConfig, out: Path, prompts: list[Prompt], specs: list[MethodSpec],
            ) -> tuple[list[dict[str, Any]], list[tuple[Prompt, MethodSpec, int]]]:
    """(rows already in ``out/results.jsonl``, the (prompt, method, repeat) runs still to do,
    methods rotated per prompt).

    Raises:
        ResumeMismatchError: the file holds rows of a run with other settings.
    """
    ensure_writable_dir(out, "--out")
    results = out / "results.jsonl"
    _prepare_file(results)
    rows = read_results(results) if results.is_file() else []
    key = cfg.resume_key()
    for r in rows:
        if r.get("cfg") != key:
            diff = {k: (r.get("cfg", {}).get(k), v) for k, v in key.items() if r.get("cfg", {}).get(k) != v}
            raise ResumeMismatchError(
                f"{results} holds results of a run with other settings (was, now: {diff}); "
                "use another --out")
    done = {(r["prompt_id"], r["method"], r["repeat"]) for r in rows}
    todo = [(p, s, rep) for i, p in enumerate(prompts)
            for rep in range(cfg.repeats)
            for s in specs[i % len(specs):] + specs[: i % len(specs)]
            if (p.id, s.key, rep) not in done]
    return rows, todo


def _load_models(cfg: BenchConfig, specs: list[MethodSpec], target: LoadedModel | None,
                 draft: LoadedModel | None) -> tuple[LoadedModel, LoadedModel | None]:
    """The target and the run's draft model (loaded once for every method that needs it)."""
    rt = _load_runtime(cfg, specs)
    if target is None:
        target = load_model(cfg.target, dtype=cfg.dtype, device=cfg.device, role="target", runtime=rt)
    if draft is None and any(s.needs_draft for s in specs):
        spec = parse_draft(cfg.draft)
        if spec.sources or spec.model is None:
            raise InvalidArgumentError(f"--draft {cfg.draft!r}: name one draft model (or head:DIR); pick "
                                       "sources per method with draft=, e.g. context:draft=model+ngram")
        draft = spec.load(target, dtype=cfg.dtype, device=cfg.device, runtime=rt)[0].model
    return target, draft


def _load_runtime(cfg: BenchConfig, specs: list[MethodSpec]) -> str:
    """The runtime models are loaded for: one dtype for every method, fp32 on a CPU unless
    every method runs eager."""
    return "eager" if cfg.runtime == "eager" and all(s.runtime in (None, "eager") for s in specs) else "auto"


def _own_drafts(cfg: BenchConfig, specs: list[MethodSpec], target: LoadedModel) -> dict[str, LoadedModel]:
    """Each draft model a method names itself (``draft=DIR``), loaded once."""
    rt = _load_runtime(cfg, specs)
    return {name: parse_draft(name).load(target, dtype=cfg.dtype, device=cfg.device, runtime=rt)[0].model
            for name in dict.fromkeys(s.own_draft for s in specs if s.own_draft)}


class _Run:
    """One benchmark run's methods (a runner each, sharing the loaded models), its metadata
    and the methods that failed (a peer engine's crash ends that method, not the run)."""

    def __init__(self, cfg: BenchConfig, specs: list[MethodSpec], prompts: list[Prompt],
                 target: LoadedModel, draft: LoadedModel | None) -> None:
        self.cfg, self.specs, self.prompts, self.target = cfg, specs, prompts, target
        eos = eos_ids(target)
        own = _own_drafts(cfg, specs, target)
        self.runners = {s.key: build_runner(s, target, own.get(s.own_draft or "", draft), eos, cfg.runtime,
                                            cfg.threads, cfg.suffix_cache_tokens) for s in specs}
        meta = run_metadata(cfg, target, draft)
        meta["runtimes"] = {k: getattr(r, "runtime", "hf") for k, r in self.runners.items()}
        meta["policies"] = {k: f"{r.gen.policy_name} over {r.gen.draft_name}" for k, r in self.runners.items()
                            if hasattr(getattr(r, "gen", None), "draft_name")}
        meta["methods"] = [s.key for s in specs]
        meta["n_prompts"] = len(prompts)
        self.meta = meta
        self.failed: dict[str, str] = meta.setdefault("failed", {})  # method -> one-line reason

    def chat_for(self, p: Prompt) -> bool:  # --chat / --no-chat win; by default raw rows stay raw
        return (not p.raw) if self.cfg.chat is None else self.cfg.chat

    def attempt(self, spec: MethodSpec, prompt: Prompt, run_cfg: BenchConfig) -> dict[str, Any] | None:
        """run_one, or None once the method has failed (recorded in meta, said on stderr)."""
        if spec.key in self.failed:
            return None
        try:
            return run_one(self.runners[spec.key], prompt, self.target.tokenizer, run_cfg,
                           self.chat_for(prompt))
        except MethodFailedError as exc:
            self.failed[spec.key] = str(exc)
            print(f"\nbench: method {spec.key} failed, the others go on: {exc}", file=sys.stderr)
            return None

    def warm_up(self, todo: list, rows: list[dict[str, Any]]) -> None:
        """Warm every method up on a short first turn, then empty the suffix caches (an
        ``--in-order`` resume refills them with the finished rows)."""
        cfg, prompts = self.cfg, self.prompts
        if todo and cfg.warmup:
            warm = Prompt(prompts[0].id, prompts[0].category, prompts[0].turns[:1], prompts[0].raw)
            wcfg = BenchConfig(**{**asdict(cfg), "max_new_tokens": min(cfg.max_new_tokens, 32)})
            for _ in range(cfg.warmup):
                for s in self.specs:
                    self.attempt(s, warm, wcfg)
        _clear_caches(self.runners)  # the warm-up's answer must not be drafted from
        if cfg.in_order:  # a resumed run: the caches hold what the finished rows put there
            rewarm_caches(self.runners, rows, {p.id: p for p in prompts}, self.target.tokenizer,
                          self.chat_for)

    def rows(self, todo: list, rows: list[dict[str, Any]], results: Path, stop_after: int | None,
             on_row: Callable[[dict[str, Any]], None] | None) -> int:
        """Run ``todo`` in order, appending each row to ``results`` (and ``rows``) as it
        finishes; returns the number of new rows."""
        key, bar, new_rows = self.cfg.resume_key(), _progress(len(todo), self.cfg.progress), 0
        try:
            with results.open("a", encoding="utf-8") as fh:
                for prompt, spec, rep in todo:
                    row = {"prompt_id": prompt.id, "category": prompt.category, "method": spec.key,
                           "repeat": rep, "turns": len(prompt.turns)}
                    if not self.cfg.in_order:  # every prompt starts cold: rows independent of the order
                        _clear_caches({spec.key: self.runners[spec.key]})
                    result = self.attempt(spec, prompt, self.cfg)
                    if bar is not None:
                        bar.update(1)
                    if result is None:
                        continue
                    row.update(result, cfg=key, ts=time.time())
                    fh.write(json.dumps(row, default=_jsonable) + "\n")
                    fh.flush()
                    rows.append(row)
                    new_rows += 1
                    if on_row:
                        on_row(row)
                    if bar is not None:
                        bar.set_postfix_str(_postfix(rows, self.specs))
                    if stop_after is not None and new_rows >= stop_after:
                        break
        finally:
            if bar is not None:
                bar.close()
        return new_rows


def _clear_caches(runners: dict[str, Any]) -> None:
    for runner in runners.values():
        if hasattr(runner, "clear_cache"):
            runner.clear_cache()


def rewarm_caches(runners: dict[str, Any], rows: list[dict[str, Any]], prompts: dict[str, Prompt],
                  tokenizer: Any, chat_for: Callable[[Prompt], bool]) -> None:
    """Put the finished rows' generations (in file order, i.e. the prompts' order) back into
    their method's suffix cache, so that a resumed ``--in-order`` run drafts as an
    uninterrupted one would."""
    for r in rows:
        cache = getattr(runners.get(r["method"]), "suffix_cache", None)
        prompt = prompts.get(r["prompt_id"])
        if cache is None or prompt is None:
            continue
        answers: list[str] = []
        for turn, out in enumerate(r["token_ids"]):
            ids = encode_turn(tokenizer, prompt, turn, answers, chat_for(prompt))
            cache.add_generation(ids, out)
            answers.append(tokenizer.decode(out, skip_special_tokens=True))


def peak_memory(cfg: BenchConfig, runtimes: list[str], with_draft: bool, dtype: str) -> dict[str, Any]:
    """Peak RSS of one generation per runtime (models in ``dtype``, the run's resolved one),
    each in a fresh process, and their ratio."""
    from .memory import measure_in_subprocess

    out: dict[str, Any] = {}
    for rt in runtimes:
        out[rt] = measure_in_subprocess(rt, cfg.target, cfg.draft if with_draft else None, dtype,
                                        cfg.threads)
    for other in ("eager", "compiled-fp32"):
        if all("peak_rss_mb" in out.get(rt, {}) for rt in (other, "compiled")):
            ratio = out["compiled"]["peak_rss_mb"] / out[other]["peak_rss_mb"]
            out[f"compiled_over_{other.replace('-', '_')}"] = round(ratio, 3)
    return out


def explain_mismatches(out: Path, rows: list[dict[str, Any]], prompts: dict[str, Prompt],
                       target: LoadedModel, chat_for: Callable[[Prompt], bool], cap: int = 20) -> None:
    """Tie margins of greedy outputs that differ from ``ar`` -> ``out/mismatch_margins.json``.

    For each mismatch, one target forward over the shared prefix gives the gap between
    the target's two best logits at the first differing position and the logit gap
    between ar's token and the method's token. A small gap is a near-tie that bf16
    rounding can flip (docs/design.md §4); a large one would point at a bug. At most ``cap`` new
    mismatches per call (each costs a full forward without cache); a rerun adds more.
    """
    path = out / MARGINS_FILE
    known: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    pp = per_prompt(rows)
    tok = target.tokenizer
    todo = [m for m in mismatches(pp) if margin_key(m) not in known and m["prompt_id"] in prompts]
    for m in todo[:cap]:
        ar_ids = pp["ar"][m["prompt_id"]]["token_ids"]
        other = pp[m["method"]][m["prompt_id"]]["token_ids"]
        turn, i = m["turn"], m["first_diff"]
        prompt = prompts[m["prompt_id"]]
        answers = [tok.decode(t, skip_special_tokens=True) for t in ar_ids[:turn]]
        ids = encode_turn(tok, prompt, turn, answers, chat_for(prompt)) + ar_ids[turn][:i]
        with torch.inference_mode():
            logits = target.model(torch.tensor([ids], device=target.device)).logits[0, -1].float()
        top = logits.topk(2).values
        a = ar_ids[turn][i] if i < len(ar_ids[turn]) else None
        b = other[turn][i] if i < len(other[turn]) else None
        known[margin_key(m)] = {
            "top2_gap": float(top[0] - top[1]), "ar_token": a, "method_token": b,
            "logit_gap": float(logits[a] - logits[b]) if a is not None and b is not None else None}
    if todo:
        path.write_text(json.dumps(known, indent=1) + "\n")


def _postfix(rows: list[dict[str, Any]], specs: list[MethodSpec]) -> str:
    sp = running_speedups(rows)
    return " ".join(f"{s.key}={sp[s.key]:.2f}x" for s in specs if s.key != "ar" and s.key in sp)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="gen", dynamic_ncols=True, desc="bench")


__all__ = ["BenchConfig", "ResumeMismatchError", "encode_turn", "eos_ids", "run_benchmark", "run_one"]
