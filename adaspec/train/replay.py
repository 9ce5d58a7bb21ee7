"""``adaspec collect --replay``: greedy verification traces without running the engine.

Under greedy verification an accepted draft prefix equals the target's own greedy tokens,
so every position a fixed-K engine run *tries* (verifies after an accepted prefix) sees
exactly the draft state of a teacher-forced draft pass over the target's greedy
continuation. Replay therefore

1. generates the target's greedy continuations of the prompts (batched, KV cache);
2. runs the target once over each ``prompt + continuation`` (logits, last hidden state)
   and the draft once (logits, last hidden state, last-layer attention concentration);
3. replays fixed-K rounds over the continuation: a round starting at generated position
   t drafts indices 1..K at positions t, t+1, ...; the first position whose draft argmax
   differs from the target token ends it (accepted m), the target's own token at t+m is
   the committed extra token, and the next round starts at t+m+1.

Both passes run on the runners the engine would use with the same ``runtime``: the target's
resolved runtime, and the draft's :class:`~adaspec.drafters.model.ModelDrafter` runner (on
the native compiled runtime its weights re-encoded like the engine's, Q8_0 unless
``$ADASPEC_DRAFT_ENCODING`` says otherwise), so the recorded draft is the one users run.

:func:`adaspec.train.traces.collect` with ``replay=True`` writes these rounds in the same
trace format as engine collection (``meta.args.replay = true``) with two differences: only
tried positions are recorded (the engine also records the draft's own continuation after
a rejection, which no policy ever acts on), and ``round_draft_s`` / ``round_verify_s``
are NaN (nothing is timed). Per prompt it costs one target generation plus one forward of
each model, about 10x fewer target-seconds per tried position than engine collection on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checkpoints.loader import LoadedModel
from ..drafters.model import ModelDrafter, fit_vocab
from ..errors import InvalidArgumentError
from ..predictors.features import RecentAcceptance, scalar_features, soft_label
from ..runtime import make_runner, resolve_runtime
from ..runtime.eager import ModelRunner, RunnerBase
from ..types import DraftStep
from ..verify import greedy_from_argmax
from .recorder import RecorderPolicy


def replay_runners(target: LoadedModel, draft: LoadedModel, runtime: str = "auto",
                   ) -> tuple[RunnerBase, ModelDrafter]:
    """The target's runner and the draft's drafter exactly as the engine builds them for
    ``runtime`` (the target's weights are kept: the greedy continuations run its HF module)."""
    t_run = make_runner(target.model, resolve_runtime(runtime, target.model)[0])
    drafter = ModelDrafter(draft, target.vocab_size, resolve_runtime(runtime, draft.model)[0])
    return t_run, drafter


@torch.inference_mode()
def replay_prompt(target: LoadedModel, runners: tuple[RunnerBase, ModelDrafter], prompt: list[int],
                  response: list[int], rec: RecorderPolicy, k: int, attention: bool) -> int:
    """Append the replayed rounds of one (prompt, target greedy response) to ``rec``.

    ``runners``: :func:`replay_runners`. Returns the number of rounds. ``response`` must be
    the target's greedy continuation.
    """
    from ..runtime.attention import AttentionProbe

    n = len(response)
    if n < 2 or not prompt:
        return 0
    seq = prompt + response
    t_run, drafter = runners
    d_run = drafter.runner
    t_run.reset()
    d_run.reset()
    # the eager draft reads every row's concentration from its cache; a compiled one computes them
    probe = AttentionProbe(d_run.model) if attention and isinstance(d_run, ModelRunner) else None
    try:
        # one forward of each model over seq[:-1]; output row j (position P - 1 + j) is what
        # the model predicts for response[j]
        t_out = t_run.forward(seq[:-1], n, hidden=True)
        d_out = d_run.forward(seq[:-1], n, hidden=True, concentration=attention and probe is None)
        conc = None  # [n]
        if probe is not None:
            conc = probe.concentrations(d_run.cache, n)
        elif attention:
            conc = d_run.attention_concentrations(n)
    finally:
        if probe is not None:
            probe.remove()
    t_logits, t_hidden = t_out.logits, t_out.hidden  # [n, V], [n, d_t]
    d_logits = fit_vocab(d_out.logits, target.vocab_size, drafter.ids)  # [n, V]
    d_hidden = d_out.hidden  # [n, d]
    t_arg = t_logits.argmax(-1).tolist()  # [n]: equals response[j] up to batching numerics
    d_arg = d_logits.argmax(-1).tolist()  # [n]: the draft's greedy proposal at each position
    recent = RecentAcceptance()
    r0 = len(rec.rnd["prompt"])
    t = 0
    while t < n - 1:
        budget = min(k, n - 1 - t)  # the engine never drafts past the last committed token
        # proposals after an accepted prefix are the teacher-forced argmaxes; rows t..t+budget
        # of the target are the verify forward over [last committed, x_1..x_budget]
        m = greedy_from_argmax(d_arg[t:t + budget], t_arg[t:t + budget + 1]).accepted
        r = len(rec.rnd["prompt"])
        for i in range(1, min(m + 1, budget) + 1):
            j = t + i - 1
            logits = d_logits[j]
            probs = torch.softmax(logits, dim=-1)
            token = d_arg[j]
            step = DraftStep(i, token, logits, probs, hidden=d_hidden[j],
                             attn_concentration=None if conc is None else float(conc[j]),
                             context_len=len(prompt) + t)
            match = int(i <= m)
            rec.tok["hidden"].append(d_hidden[j].to(torch.float16))
            rec.tok["scalars"].append(scalar_features(step, recent.value))
            rec.tok["match"].append(match)
            rec.tok["tried"].append(1)
            rec.tok["soft"].append(soft_label(torch.softmax(t_logits[j], dim=-1), probs, token))
            rec.tok["qx"].append(step.token_prob)
            rec.tok["pos"].append(i)
            rec.tok["round"].append(r)
        rec.rnd["prompt"].append(rec.prompt_index)
        rec.rnd["index"].append(r - r0)
        rec.rnd["k"].append(budget)
        rec.rnd["accepted"].append(m)
        rec.rnd["draft_s"].append(float("nan"))
        rec.rnd["verify_s"].append(float("nan"))
        rec.rnd["draft_forwards"].append(min(m + 1, budget))
        rec.rnd["hidden"].append(t_hidden[t + m].to(torch.float16))
        rec.rnd["token"].append(t_arg[t + m])
        recent.update(budget, m)
        t += m + 1
    return len(rec.rnd["prompt"]) - r0


def replay_prompts(target: LoadedModel, draft: LoadedModel, prompts: list[list[int]], start: int, end: int,
                   rec: RecorderPolicy, *, k: int, max_new_tokens: int, attention: bool, batch_size: int,
                   runtime: str = "auto", tick: Callable[[int], object] = lambda n: None) -> None:
    """Record the replayed rounds of ``prompts[start:end]`` into ``rec``: the target's greedy
    continuations in batches of ``batch_size``, then :func:`replay_prompt` on each, on the
    engine's runners for ``runtime``; ``tick(1)`` after each prompt.
    (``collect(..., replay=True)`` writes them as shards.)"""
    from .draft_data import greedy_batch

    runners = replay_runners(target, draft, runtime)
    eos = sorted(target.eos_ids)
    for b in range(start, end, batch_size):
        group = prompts[b:min(b + batch_size, end)]
        room = [min(max_new_tokens, target.max_context - len(p) - 1) for p in group]
        if min(room) < 1:
            raise InvalidArgumentError(f"a prompt of {max(map(len, group))} tokens leaves no room "
                                       f"in the target's context of {target.max_context}")
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=target.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=target.device)
        responses = greedy_batch(target.model, ids, mask, min(room), eos)
        for i, (p, resp) in enumerate(zip(group, responses)):
            rec.prompt_index = b + i
            replay_prompt(target, runners, p, resp, rec, k, attention)
            tick(1)
