"""adaspec proposers inside a real vLLM engine on the CPU (``make test-vllm``).

One engine per configuration (the default target, SmolLM2-135M, fp32, greedy), each in
its own process through the benchmark's worker, on prompts that repeat themselves (so the
n-gram source has matches): outputs must equal plain vLLM's token for token, the proposer
must have drafted and had drafts accepted, and its per-request states must follow the
requests (one created per request, dropped when the request leaves the batch).
"""

from __future__ import annotations

import pytest

from adaspec.checkpoints.loader import default_target_dir
from adaspec.integrations.vllm import speculative_config
from adaspec.integrations.vllm_bench import _in_subprocess

PROMPTS = [
    "Repeat this list exactly three times: apple, banana, cherry, date, elderberry, fig, grape.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Copy the sentence: The quick brown fox jumps over the lazy dog. The quick brown fox",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Write the word hello ten times.",
]


@pytest.fixture(scope="module")
def base() -> dict:
    from transformers import AutoTokenizer

    model = str(default_target_dir())
    tok = AutoTokenizer.from_pretrained(model)
    return {"model": model, "max_new_tokens": 48, "batches": [1, 4], "kv_cache_gib": 1,
            "max_model_len": 512, "eager": True, "kind": "vllm",
            "prompts": [list(tok(p)["input_ids"]) for p in PROMPTS]}


@pytest.fixture(scope="module")
def plain(base: dict) -> dict:
    return _in_subprocess({**base, "name": "plain", "spec": None})


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_proposer_is_lossless_and_tracks_requests(base: dict, plain: dict, adaptive: bool) -> None:
    res = _in_subprocess({**base, "name": "adaspec", "spec": speculative_config(6, adaptive=adaptive)})
    for b in ("1", "4"):
        assert all(plain[b]["ids"]) and len(plain[b]["ids"]) == len(PROMPTS)
        assert res[b]["ids"] == plain[b]["ids"]  # greedy: token for token
    rep = res["proposer"]
    n_requests = 1 + 2 * len(PROMPTS)  # warm-up + every prompt at batch 1 and at batch 4
    assert rep["requests_created"] == n_requests
    assert rep["requests_dropped"] == n_requests - rep["live_requests"]  # the last batch's rows stay
    assert rep["live_requests"] <= 4
    assert rep["drafted"] > 0 and rep["accepted"] > 0
    if not adaptive:
        assert rep["matches_not_drafted"] == 0
