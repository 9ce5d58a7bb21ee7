"""Public Python API: :class:`SpeculativeGenerator`.

>>> gen = SpeculativeGenerator(target="default", draft="default", policy="fixed",
...                            policy_args={"k": 5})
>>> result = gen.generate("def fib(n):", max_new_tokens=64)
>>> result.text, result.stats.tau
>>> for chunk in gen.stream("Tell me a joke.", chat=True):
...     print(chunk, end="")
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoints.loader import LoadedModel, load_model
from .drafters.registry import DraftSpec, check_policy, parse_draft
from .drafters.suffix import SuffixCache, make_cache
from .engine import Engine, StopRules
from .errors import InvalidArgumentError, PolicyArgumentError
from .policies import Policy, make_policy
from .policies.auto import AUTO, AUTO_DRAFT, auto_policy
from .runtime import set_threads
from .runtime.plan import RuntimePlan, plan_runtime
from .sampling import SamplingConfig
from .types import GenerationStats


@dataclass
class GenerationResult:
    """text: decoded new text (special tokens skipped); token_ids: new ids (EOS included)."""

    text: str
    token_ids: list[int]
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


class TextStream:
    """Iterator of text chunks as they are committed; ``.result`` is set once exhausted."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._chunks


class IncrementalText:
    """Incremental detokenisation of committed ids (offsets as in TGI / vLLM): ``feed(ids)``
    returns the new text that is safe to send (no partial UTF-8 character); ``rest(final)``
    the rest of the final text once generation ends."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def feed(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def rest(self, final: str) -> str:
        emitted = self.decode(self.ids[:self.read])
        return final[len(emitted):] if len(final) > len(emitted) else ""


class SpeculativeGenerator:
    """Lossless speculative generation with a target, an optional draft and a policy.

    Args:
        target: ``"default"``, a local directory, an HF id, or a :class:`LoadedModel`.
        draft: same, or ``None`` / ``"none"`` for plain autoregressive decoding of the
            target through the same code path (the baseline); ``"ngram"`` for model-free
            drafts (the continuation of the longest earlier match of the text's suffix), or
            a model plus ``ngram`` (``"model+ngram"``, ``"default+ngram"``, or a list such as
            ``["default", "ngram"]`` or ``[loaded_model, "ngram"]``): each round then drafts
            from one source (the policy's ``choose_source`` if it has one, else n-gram when
            its match is >= 3 tokens long).
        policy: a policy name (see ``adaspec.policies.POLICIES``) or a :class:`Policy`.
        policy_args: ``key -> value`` arguments for a policy given by name.
        dtype: ``"auto"`` | ``"fp32"`` | ``"bf16"`` for models given by name.
        device: torch device for models given by name.
        threads: torch intra-op threads (None leaves torch's default).
        runtime: ``"auto"`` (default: the compiled CPU runtime where it supports the model,
            eager elsewhere), ``"eager"`` or ``"compiled"`` (an error for a model it cannot
            run). ``runtime_note`` says what was chosen for each model and why.
        suffix_cache: with an n-gram source, a cross-request cache of finished texts
            (:class:`~adaspec.drafters.suffix.SuffixCache`, kept across ``generate`` calls):
            True (default: 262144 tokens), a token count, False / 0 (none), or a cache to
            share with other generators. ``self.suffix_cache`` holds it (None without one).
    """

    def __init__(
        self,
        target: str | LoadedModel = "default",
        draft: str | LoadedModel | Sequence[str | LoadedModel] | None = "auto",
        policy: str | Policy = "auto",
        policy_args: Mapping[str, Any] | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        threads: int | None = None,
        runtime: str = "auto",
        suffix_cache: bool | int | SuffixCache | None = True,
    ) -> None:
        if threads:
            set_threads(threads)
        self.plan: RuntimePlan = plan_runtime(runtime, dtype, device)  # before any model loads
        auto_draft = isinstance(draft, str) and draft == AUTO
        spec = parse_draft(AUTO_DRAFT if auto_draft else draft)
        auto = isinstance(policy, str) and policy == AUTO
        if auto and policy_args:
            raise PolicyArgumentError("policy 'auto' takes no arguments; name a policy to pass some")
        self.policy = None if auto else (
            policy if isinstance(policy, Policy) else make_policy(policy, policy_args))
        if self.policy is not None:
            check_policy(self.policy, spec)  # e.g. specdecpp reads a hidden state an n-gram draft lacks
        self.target = target if isinstance(target, LoadedModel) else load_model(
            target, dtype=self.plan.dtype, device=device, role="target", runtime=runtime)
        self.draft_spec: DraftSpec  # loaded; default_note: one line when a default had to fall back
        self.draft_spec, self.default_note = spec.load(self.target, dtype=self.plan.dtype, device=device,
                                                       runtime=runtime, fallback=auto_draft)
        if self.policy is None:
            self.policy, self.default_note = auto_policy(self.target, self.draft, self.draft_spec.sources)
            check_policy(self.policy, self.draft_spec)
        if self.default_note:
            warnings.warn(self.default_note, stacklevel=2)
        self.policy.check_pair(self.target, self.draft)  # a predictor trained for another pair
        self.plan = self.plan.resolve(self.target.model, self.draft.model if self.draft else None,
                                      head=self.head is not None, sources=self.draft_spec.sources)
        # cross-request drafts for the n-gram source, kept across generate calls (and shared by
        # every engine of this generator, e.g. the server's batched sequences)
        self.suffix_cache = make_cache(suffix_cache) if "ngram" in self.draft_spec.sources else None
        self.engine = self.new_engine(self.policy)

    def new_engine(self, policy: Policy) -> Engine:
        """A fresh engine of this generator's target and draft under ``policy``: its own KV
        caches and drafter state, the models' weights shared (one per batched sequence)."""
        drafter = self.draft_spec.drafter(self.target, self.plan, policy, self.suffix_cache)
        return Engine(self.target.model, self.target.vocab_size, self.target.max_context,
                      drafter, policy, self.plan.target, release=self.target.owned)

    @property
    def draft(self) -> LoadedModel | None:
        """The loaded draft model (a feature head comes wrapped), or None."""
        return self.draft_spec.model

    @property
    def head(self) -> Any:
        """The draft's :class:`~adaspec.checkpoints.feature_head.FeatureHead`, or None."""
        return self.draft.model if self.draft_spec.kind == "head" else None

    @property
    def draft_name(self) -> str:
        """``"<draft model>+ngram"``, ``"ngram"``, ``"none"``."""
        return self.draft_spec.name

    @property
    def runtime(self) -> str:
        """The target's resolved runtime (``eager``, ``compiled``, ``compiled-fp32``)."""
        return self.plan.target

    @property
    def runtime_note(self) -> str:
        """What runs where, and why, in one line."""
        return self.plan.note

    @property
    def policy_name(self) -> str:
        """The name of the policy actually used (``context``, ``fixed``, ...)."""
        return getattr(self.policy, "name", type(self.policy).__name__)

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Prompt text (or ids) -> ids; ``chat`` wraps it in the target's chat template."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if not ids:
                raise InvalidArgumentError("prompt is empty")
            return ids
        if not prompt.strip():
            raise InvalidArgumentError("prompt is empty")
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return list(self._need_tokenizer()(prompt)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat messages (``[{"role": ..., "content": ...}]``) -> ids through the target's
        chat template, ending with the assistant's turn (the one chat encoding: the API's
        ``chat=True`` and the server's /v1/chat/completions).

        Raises:
            InvalidArgumentError: no tokenizer / no chat template, or the template rejects
                the messages (e.g. their sequence of roles).
        """
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise InvalidArgumentError(f"model {self.target.name!r} has no chat template; send plain text")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # e.g. a template that rejects this sequence of roles
            raise InvalidArgumentError(f"the chat template rejected the messages: {exc}") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _need_tokenizer(self) -> Any:
        if self.target.tokenizer is None:
            raise InvalidArgumentError(f"target {self.target.name!r} has no tokenizer; pass token ids")
        return self.target.tokenizer

    def _decode(self, ids: list[int]) -> str:
        if self.target.tokenizer is None:
            return ""
        return self.target.tokenizer.decode(ids, skip_special_tokens=True)

    def _start(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat):
        ids = self.encode(prompt, chat=chat)
        stops = tuple([stop] if isinstance(stop, str) else (stop or ()))
        rules = StopRules(max_new_tokens, self.target.eos_ids, stops,
                          self._decode if stops else None)
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        stats = GenerationStats()
        return self.engine.run(ids, sampling, rules, stats), stats, stops

    def _finish(self, new: list[int], stats: GenerationStats, stops: tuple[str, ...],
                engine: Engine | None = None) -> GenerationResult:
        drafter_report = getattr((engine or self.engine).drafter, "report", None)
        if drafter_report is not None:  # e.g. rounds per draft source, n-gram lookup seconds
            stats.extra.update(drafter_report())
        text = self._decode(new)
        if stats.stop_reason == "stop_string":
            cut = min((text.find(s) + len(s) for s in stops if s in text), default=len(text))
            text = text[:cut]
        return GenerationResult(text, new, stats)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt``; greedy unless ``temperature > 0``.

        Raises:
            InvalidArgumentError: empty prompt, max_new_tokens <= 0, bad sampling values.
            PromptTooLongError: the prompt does not fit the target's context.
        """
        rounds, stats, stops = self._start(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                           stop, chat)
        new: list[int] = []
        for chunk in rounds:
            new.extend(chunk)
        return self._finish(new, stats, stops)

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> TextStream:
        """Like :meth:`generate`, but yields text chunks as rounds commit them."""
        options = inspect.signature(SpeculativeGenerator.generate).parameters  # the one set of defaults
        unknown = [k for k in kwargs if k not in options or k in ("self", "prompt")]
        if unknown:
            raise InvalidArgumentError(f"unknown arguments: {', '.join(unknown)}")
        args = {k: kwargs.get(k, p.default) for k, p in options.items() if k not in ("self", "prompt")}
        rounds, stats, stops = self._start(prompt, **args)
        stream = TextStream(iter(()))

        def chunks() -> Iterator[str]:
            text = IncrementalText(self._decode)
            for chunk in rounds:
                piece = text.feed(chunk)
                if piece:
                    yield piece
            result = self._finish(text.ids, stats, stops)
            rest = text.rest(result.text)
            if rest:
                yield rest
            stream.result = result

        stream._chunks = chunks()
        return stream
