"""adaspec proposers for vLLM V1 (``custom_class`` speculators; extra ``[vllm]``).

>>> from vllm import LLM
>>> llm = LLM(model=..., speculative_config={
...     "method": "custom_class", "num_speculative_tokens": 12,
...     "model": "adaspec.integrations.vllm.AdaspecNgramProposer"})

vLLM (checked against 0.32) imports the class by path, builds it with its ``VllmConfig``
(``vllm.v1.spec_decode.custom_class_proposer``), calls ``load_model(target)`` once and, after
every step, ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
slot_mappings=...)`` with, per row of its persistent batch, the tokens the step committed
(accepted drafts plus one; [] for a partial prefill), the committed length and the
committed ids ([max_num_reqs, max_model_len] int32). It returns one token list per row,
of any length up to ``num_speculative_tokens`` (K); vLLM verifies them against the
target, so greedy output equals plain decoding whatever is proposed.

The interface passes no request ids, so requests are told apart by their committed text
(:class:`~adaspec.integrations.adaptive.RequestTracker`): a state is created with a
request's first decode step and dropped at the first step the request is no longer in
the batch. All the drafting logic lives in :mod:`adaspec.integrations.adaptive`; this
module only adapts vLLM's arguments, and imports nothing from vLLM (it runs inside it).

Classes:
Both keep one cross-request :class:`~adaspec.drafters.suffix.SuffixCache` (every request's
finished text; it drafts when its match is longer than the request's own), bounded to
``suffix_cache_tokens`` tokens (a class attribute, ``DEFAULT_TOKENS``; a subclass named in
the speculative config may set another bound, 0 turns it off).

- :class:`AdaspecNgramProposer`: adaspec's n-gram index with the per-request adaptive
  length (0 = do not draft) learned online from accepted counts and measured step costs;
  K is only the cap (12 is a good default: most steps draft far less).
- :class:`AdaspecNgramFixedProposer`: the same index, always the whole continuation up
  to K (ablation of the adaptive length).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..drafters.suffix import DEFAULT_TOKENS, SuffixCache
from .adaptive import AdaptiveNgram

DEFAULT_K = 12


def speculative_config(k: int = DEFAULT_K, adaptive: bool = True) -> dict[str, Any]:
    """The ``speculative_config`` dict that plugs an adaspec proposer into vLLM."""
    cls = AdaspecNgramProposer if adaptive else AdaspecNgramFixedProposer
    return {"method": "custom_class", "num_speculative_tokens": int(k),
            "model": f"{__name__}.{cls.__name__}"}


class AdaspecNgramProposer:
    """vLLM ``custom_class`` proposer: adaspec n-gram drafts, adaptive length per request.

    Args:
        vllm_config: vLLM's ``VllmConfig``; read: ``speculative_config.num_speculative_tokens``
            (K) and ``model_config.max_model_len``.
    """

    adaptive = True
    suffix_cache_tokens = DEFAULT_TOKENS  # the shared cache's bound (a subclass may change it; 0 = off)

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        tokens = self.suffix_cache_tokens
        self.cache = SuffixCache(tokens) if tokens > 0 else None  # shared by every request
        self.core = AdaptiveNgram(k_max=self.k, max_len=self.max_model_len, adaptive=self.adaptive,
                                  cache=self.cache)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM hands the target model here; the n-gram source needs none."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        """One draft per row of the batch (``len(sampled_token_ids)`` rows).

        Args:
            sampled_token_ids: per row, the tokens committed by the step just run.
            num_tokens_no_spec: [max_num_reqs] committed tokens per row.
            token_ids_cpu: [max_num_reqs, max_model_len] committed token ids per row.
            slot_mappings: unused (no draft model KV).
        """
        return self.core.step(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, time.perf_counter())

    def report(self) -> dict:
        return {"proposer": type(self).__name__, "k": self.k, **self.core.report()}


class AdaspecNgramFixedProposer(AdaspecNgramProposer):
    """Ablation: the whole match continuation up to K (no adaptive length)."""

    adaptive = False


__all__ = ["DEFAULT_K", "AdaspecNgramFixedProposer", "AdaspecNgramProposer", "speculative_config"]
