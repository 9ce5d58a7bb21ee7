"""Benchmark methods: parse ``--methods`` and run one generation per method.

A method is ``NAME`` or ``NAME:key=value:key=value``; the whole string is its key in
every output. Names:

- ``ar``: plain greedy / sampled decoding of the target through the adaspec engine
  (``draft=None``), the baseline of every speed-up.
- ``hf``: ``target.generate(input_ids, assistant_model=draft)`` from transformers with its
  default assisted-generation settings (``num_assistant_tokens=20``, schedule
  ``constant``, ``assistant_confidence_threshold=0.4``; the threshold only adapts
  online when scikit-learn is installed). ``hf-heuristic`` switches the schedule to
  ``"heuristic"`` (K += 2 when all drafted tokens are accepted, else K -= 1). Keys
  ``num_assistant_tokens``, ``num_assistant_tokens_schedule`` and
  ``assistant_confidence_threshold`` may be given as arguments. transformers writes
  the heuristic K back into the assistant's ``generation_config`` after each call; the
  benchmark restores the assistant's settings after every call, so each prompt starts
  from the same state (as adaspec's policies do) and ``hf`` never inherits
  ``hf-heuristic``'s state. A reduced-vocabulary adaspec draft returns full-size
  logits (``-inf`` outside its subset), so transformers treats it as an ordinary
  same-vocabulary assistant.
- ``llamacpp``: plain greedy decoding of the shipped Q4_1 GGUF as is in llama.cpp, the
  CPU engine a user would pick; ``llamacpp-f32``: the same of its F32 export (the fp32
  weights adaspec computes with). Optional extra ``[llamacpp]``; llama.cpp runs in a child
  process, so a crash fails that row with a one-line reason and the run goes on (see
  :mod:`adaspec.bench.llamacpp`).
- any adaspec policy: ``fixed:5`` (short for ``fixed:k=5``), ``heuristic``,
  ``context:branch=on``, ``oracle``, ... Arguments go to
  :func:`adaspec.policies.make_policy` unchanged, so new policies need no change here.
  One more key, ``draft=``, picks the method's draft sources instead: ``draft=ngram``
  (model-free, no draft model loaded for it), ``draft=model+ngram`` (the run's ``--draft``
  plus the n-gram source, chosen per round), ``draft=model`` (the default), e.g.
  ``fixed:k=8:draft=ngram`` or ``context:draft=model+ngram``; a directory names a draft
  model of the method's own (``fixed:5:draft=DIR``, ``context:draft=DIR+ngram``).
  ``cache=off`` turns the n-gram source's cross-request suffix cache off
  (``context:draft=model+ngram:cache=off``); it only
  carries over between prompts with ``adaspec bench --in-order``.

- ``default``: what a user gets with no ``--policy`` / ``--draft`` (:mod:`adaspec.policies.auto`):
  ``context`` over the run's draft plus the n-gram source when the shipped predictor fits
  the pair, else the fallback the generator names. ``default:draft=model`` keeps the
  default policy with the model draft alone.

Any ``ar`` or policy method may end in ``@RUNTIME``, a name of
:data:`adaspec.runtime.RUNTIMES` (``@eager``, ``@compiled``, ``@compiled-fp32``, ``@auto``), to run on that
runtime instead of the run's ``--runtime`` (``ar@eager,ar`` compares the runtimes in one
run). ``hf`` always runs transformers' own modules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoints.loader import LoadedModel
from ..errors import InvalidArgumentError
from ..types import GenerationStats
from . import llamacpp
from .turn import MethodFailedError, TurnResult

HF_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
_HF_PRESETS = {"hf": {}, "hf-heuristic": {"num_assistant_tokens_schedule": "heuristic"}}


class MethodError(InvalidArgumentError):
    """Unknown method, bad method argument, or a method that needs a draft without one."""


@dataclass(frozen=True)
class MethodSpec:
    """A parsed ``--methods`` entry.

    Attributes:
        key: the method string as given (its key in outputs).
        kind: ``"ar"``, ``"hf"`` or ``"policy"``.
        name: ``ar``, ``hf`` / ``hf-heuristic``, or the policy name.
        args: ``key -> value`` strings (policy arguments or assistant settings).
        runtime: a name of :data:`adaspec.runtime.RUNTIMES` from an ``@runtime`` suffix, else
            None (the run's ``--runtime``).
        draft: a policy method's ``draft=`` value (``ngram``, ``model+ngram``, or a draft model
            of its own: ``DIR``, ``DIR+ngram``), else None (the run's draft model).
    """

    key: str
    kind: str
    name: str
    args: dict[str, str] = field(default_factory=dict)
    runtime: str | None = None
    draft: str | None = None
    cache: bool = True  # the n-gram source's cross-request suffix cache (``cache=off``)

    @property
    def own_draft(self) -> str | None:
        """The draft model this method names itself (``draft=DIR`` or ``draft=DIR+ngram``), else
        None (``draft=model`` means the run's ``--draft``)."""
        if self.draft is None:
            return None
        from ..drafters.registry import parse_draft

        return _own_model(parse_draft(self.draft))

    @property
    def needs_draft(self) -> bool:
        """Whether the method needs the run's draft model loaded."""
        if self.draft is not None:
            from ..drafters.registry import parse_draft

            return parse_draft(self.draft).kind == "model" and self.own_draft is None
        return self.kind not in ("ar", "llamacpp")

    def draft_arg(self, model: LoadedModel | None) -> Any:
        """The ``draft`` argument of :class:`adaspec.api.SpeculativeGenerator` for this method,
        given its loaded draft model (the run's, or its :attr:`own_draft` loaded)."""
        if self.draft is None:
            return model
        from ..drafters.registry import parse_draft

        spec = parse_draft(self.draft)
        return spec.with_model(model).arg if spec.kind == "model" else spec.arg


def _own_model(spec: Any) -> Any:
    """The draft model a method's ``draft=`` names itself (not ``model`` / ``default``, which
    mean the run's ``--draft``), else None. ``spec``: a parsed :class:`DraftSpec`."""
    return spec.model if spec.kind == "model" and spec.model != "default" else None


def parse_method(text: str) -> MethodSpec:
    """``"fixed:5"`` -> MethodSpec(kind="policy", name="fixed", args={"k": "5"}).

    Raises:
        MethodError: empty entry, malformed argument, unknown policy or argument.
    """
    key = text.strip()
    if not key:
        raise MethodError("empty method name in --methods")
    body, at, runtime = key.partition("@")
    if at:
        from ..runtime import RUNTIMES

        if runtime not in RUNTIMES:
            raise MethodError(f"method {key!r}: unknown runtime {runtime!r}; choose {', '.join(RUNTIMES)}")
    name, *parts = body.split(":")
    args: dict[str, str] = {}
    for i, part in enumerate(parts):
        k, sep, v = part.partition("=")
        if not sep and i == 0 and name == "fixed":
            k, v = "k", part  # fixed:5 == fixed:k=5
        elif not sep or not k.strip():
            raise MethodError(f"method {key!r}: argument {part!r} must look like key=value")
        if k.strip() in args:
            raise MethodError(f"method {key!r}: argument {k.strip()!r} given twice")
        args[k.strip()] = v.strip()
    if name == "ar":
        if args:
            raise MethodError(f"method {key!r}: ar takes no arguments")
        return MethodSpec(key, "ar", name, runtime=runtime or None)
    if name in llamacpp.PEERS:
        if at or any(k not in llamacpp.KEYS for k in args):
            raise MethodError(f"method {key!r}: {name} takes gguf=PATH and n_ctx=N only")
        if not llamacpp.llama_cpp_available():
            raise MethodError(f'method {name} needs llama-cpp-python: pip install "adaspec[llamacpp]" '
                              "(README: its build flags on each CPU kind), or $ADASPEC_LLAMACPP_PYTHON "
                              "naming a python that has it")
        return MethodSpec(key, "llamacpp", name, args)
    if name == "default":
        bad = [k for k in args if k != "draft"]
        if bad:
            raise MethodError(f"method {key!r}: default takes draft=SOURCES only")
        return MethodSpec(key, "policy", "auto", {}, runtime or None, args.get("draft", "model+ngram"))
    if name in _HF_PRESETS:
        if at:
            raise MethodError(f"method {key!r}: {name} always runs transformers' own modules (no @runtime)")
        bad = [k for k in args if k not in HF_KEYS]
        if bad:
            raise MethodError(f"method {key!r}: unknown argument {bad[0]!r}; valid: {', '.join(HF_KEYS)}")
        return MethodSpec(key, "hf", name, {**_HF_PRESETS[name], **args})
    from ..drafters.registry import check_policy, parse_draft
    from ..policies import POLICIES, make_policy

    draft = args.pop("draft", None)
    cache = args.pop("cache", "on")
    if cache not in ("on", "off") or (cache == "off" and "ngram" not in (draft or "")):
        raise MethodError(f"method {key!r}: cache= takes on or off, with an n-gram draft source "
                          "(e.g. context:draft=model+ngram:cache=off)")
    try:
        policy = make_policy(name, args)  # validates the name and every argument now, not mid-run
        if draft is not None:
            spec = parse_draft(draft)
            own = _own_model(spec)
            if spec.empty or (own is not None and not Path(str(own)).is_dir()):
                raise MethodError(f"draft={draft!r}: use ngram, model, model+ngram (model = --draft), "
                                  "head or head+ngram (the shipped feature head), or a draft directory "
                                  "of the method's own: DIR, DIR+ngram")
            check_policy(policy, spec)
    except InvalidArgumentError as exc:
        if name not in POLICIES:
            raise MethodError(f"unknown method {name!r}; choose ar, hf, hf-heuristic, "
                              f"{', '.join(llamacpp.PEERS)} or a policy: "
                              f"{', '.join(sorted(POLICIES))}") from None
        raise MethodError(f"method {key!r}: {exc}") from None
    return MethodSpec(key, "policy", name, args, runtime or None, draft, cache == "on")


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma-separated list -> specs, in order, without duplicates."""
    specs = [parse_method(part) for part in text.split(",")]
    keys = [s.key for s in specs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise MethodError(f"method {dup!r} listed twice")
    return specs


class MethodRunner(Protocol):
    def generate(self, ids: list[int], max_new_tokens: int, temperature: float,
                 seed: int | None) -> TurnResult: ...


class EngineRunner:
    """``ar`` or an adaspec policy, through :class:`adaspec.api.SpeculativeGenerator`."""

    def __init__(self, spec: MethodSpec, target: LoadedModel, draft: LoadedModel | None,
                 runtime: str = "auto", suffix_cache: int = 1) -> None:
        from ..api import SpeculativeGenerator

        runtime = spec.runtime or runtime
        if spec.kind == "ar":
            self.gen = SpeculativeGenerator(target, None, "fixed", runtime=runtime)
        else:  # suffix_cache: the run's cache size in tokens (1 = the default size, 0 = off)
            size = (suffix_cache if suffix_cache != 1 else True) if spec.cache else False
            self.gen = SpeculativeGenerator(target, spec.draft_arg(draft), spec.name, spec.args,
                                            runtime=runtime, suffix_cache=size)
        self.runtime = self.gen.runtime

    def clear_cache(self) -> None:
        """Forget the cross-request suffix cache (each prompt starts cold unless --in-order)."""
        drafter = self.gen.engine.drafter
        ngram = getattr(drafter, "ngram", drafter)
        if hasattr(ngram, "flush"):
            ngram.flush()  # drop the pending text too, then empty the cache
        if self.gen.suffix_cache is not None:
            self.gen.suffix_cache.clear()

    @property
    def suffix_cache(self) -> Any:
        return self.gen.suffix_cache

    def generate(self, ids: list[int], max_new_tokens: int, temperature: float,
                 seed: int | None) -> TurnResult:
        res = self.gen.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return TurnResult(list(res.token_ids), res.stats)


class HFRunner:
    """transformers assisted generation with the same draft, stop rules and budget.

    Statistics come from forward pre-hooks: every target forward is one round (the
    first one also prefills the prompt, as in the engine's first verify); the draft
    forwards are counted; drafted / accepted tokens per round are reconstructed from
    the target cache length at each call (a round verifies 1 + K tokens and commits
    accepted + 1), so tau, acceptance and the accepted-length histogram are exact up to
    the last round, which may be cut by EOS or max_new_tokens.
    """

    def __init__(self, spec: MethodSpec, target: LoadedModel, draft: LoadedModel,
                 eos_ids: frozenset[int]) -> None:
        self.target, self.draft, self.settings = target, draft, dict(spec.args)
        self.eos_ids = sorted(eos_ids)
        for key in ("num_assistant_tokens",):
            if key in self.settings:
                self.settings[key] = int(self.settings[key])
        if "assistant_confidence_threshold" in self.settings:
            self.settings["assistant_confidence_threshold"] = float(
                self.settings["assistant_confidence_threshold"])

    def generate(self, ids: list[int], max_new_tokens: int, temperature: float,
                 seed: int | None) -> TurnResult:
        cfg = self.draft.model.generation_config
        saved = {k: getattr(cfg, k, None) for k in HF_KEYS}
        calls: list[tuple[int, int]] = []  # (cached positions, input tokens) per target forward
        n_draft = [0]

        def on_target(_mod: Any, args: tuple, kwargs: dict) -> None:
            inp = kwargs.get("input_ids", args[0] if args else None)
            cache = kwargs.get("past_key_values")
            if cache is None:  # transformers >= 5.24 names it ``cache``
                cache = kwargs.get("cache")
            start = int(cache.get_seq_length()) if cache is not None else 0
            calls.append((start, int(inp.shape[1]) if inp is not None else 0))

        def on_draft(_mod: Any, _args: tuple, _kwargs: dict) -> None:
            n_draft[0] += 1

        hooks = [self.target.model.register_forward_pre_hook(on_target, with_kwargs=True),
                 self.draft.model.register_forward_pre_hook(on_draft, with_kwargs=True)]
        sample = temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        try:
            for k, v in self.settings.items():
                setattr(cfg, k, v)
            device = self.target.device
            inp = torch.tensor([ids], dtype=torch.long, device=device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.target.model.generate(
                    inp, attention_mask=torch.ones_like(inp), assistant_model=self.draft.model,
                    max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids or None,
                    pad_token_id=self.eos_ids[0] if self.eos_ids else None, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
            for k, v in saved.items():
                setattr(cfg, k, v)
        new = out[0, len(ids):].tolist()
        stats = GenerationStats(prompt_tokens=len(ids), new_tokens=len(new), wall_s=wall,
                                target_forwards=len(calls), draft_forwards=n_draft[0])
        committed = len(ids)
        final = len(ids) + len(new)
        for i, (start, n_in) in enumerate(calls):
            drafted = max(start + n_in - committed, 0) if i == 0 else max(n_in - 1, 0)
            after = calls[i + 1][0] + 1 if i + 1 < len(calls) else final
            accepted = min(max(after - committed - 1, 0), drafted)
            stats.record_round(drafted, accepted)
            committed = after
        stats.stop_reason = "eos" if new and new[-1] in self.eos_ids else "max_new_tokens"
        stats.extra["stats_source"] = "forward hooks; no stage times"
        return TurnResult(new, stats)


def build_runner(spec: MethodSpec, target: LoadedModel, draft: LoadedModel | None,
                 eos_ids: frozenset[int], runtime: str = "auto", threads: int | None = None,
                 suffix_cache: int = 1) -> MethodRunner:
    """A runner for ``spec`` sharing the already loaded models (``runtime``: the run's default;
    ``suffix_cache``: the n-gram source's cache size in tokens, 1 = default, 0 = off)."""
    if spec.kind == "llamacpp":
        return llamacpp.LlamaCppRunner(spec.name, spec.args, target.name, eos_ids, threads)
    if spec.needs_draft and draft is None:
        raise MethodError(f"method {spec.key!r} needs a draft model (--draft)")
    if spec.kind == "hf":
        assert draft is not None
        return HFRunner(spec, target, draft, eos_ids)
    return EngineRunner(spec, target, draft, runtime, suffix_cache)


__all__ = ["HF_KEYS", "EngineRunner", "HFRunner", "MethodError", "MethodFailedError", "MethodSpec",
           "TurnResult", "build_runner", "parse_method", "parse_methods"]
