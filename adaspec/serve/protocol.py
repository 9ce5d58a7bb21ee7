"""OpenAI request parsing and response shapes (pure Python, no web framework).

``parse_request`` turns a JSON body of ``/v1/completions`` or ``/v1/chat/completions``
into a :class:`GenerationRequest` or raises :class:`ApiError` (400). The builders below
produce OpenAI's JSON objects: ``text_completion``, ``chat.completion`` and their stream
chunks, ``usage``, and ``{"error": {...}}``.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4  # OpenAI accepts up to 4 stop sequences
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# parameters that would change the output distribution; accepted only at their neutral value
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "echo": False,
            "logprobs": False, "top_logprobs": 0, "suffix": None, "logit_bias": None}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request.

    Attributes:
        kind: ``"completion"`` or ``"chat"``.
        prompt: completion prompt, text or token ids (None for chat).
        messages: chat messages ``[{"role", "content"}]`` with text content (None for completions).
        max_tokens: new-token budget; None = until EOS or the end of the target's context.
        policy / policy_args: per-request drafting policy override (None = the server's policy).
    """

    kind: str
    model: str | None
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    policy: str | None = None
    policy_args: dict[str, Any] = field(default_factory=dict)


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, key: str, default: Any, lo: float, hi: float, *, integer: bool = False,
            low_open: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise _bad(key, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < lo or value > hi or (low_open and value == lo):
        lo_s = f"> {lo}" if low_open else f">= {lo}"
        raise _bad(key, f"'{key}' must be {lo_s} and <= {hi}, got {value!r}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(key, f"'{key}' must be a boolean, got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}")
    return tuple(dict.fromkeys(stops))


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _bad("prompt", "'prompt' is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
        if min(prompt) < 0:
            raise _bad("prompt", "token ids in 'prompt' must be >= 0")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("prompt", "batched prompts are not supported: send one prompt per request")
    raise _bad("prompt", "'prompt' must be a non-empty string or a list of token ids")


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "message content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"each message needs a role in {', '.join(CHAT_ROLES)}")
        out.append({"role": m["role"], "content": _content(m.get("content") or "", i)})
    if not any(m["content"].strip() for m in out):
        raise _bad("messages", "all messages are empty")
    return out


def _extension(body: dict) -> tuple[str | None, dict[str, Any]]:
    ext = body.get("adaspec")
    if ext is None:
        return None, {}
    if not isinstance(ext, dict) or set(ext) - {"policy", "policy_args"}:
        raise _bad("adaspec", "'adaspec' must be an object with keys 'policy' and 'policy_args'")
    policy, args = ext.get("policy"), ext.get("policy_args") or {}
    if policy is not None and (not isinstance(policy, str) or not policy):
        raise _bad("adaspec.policy", "'adaspec.policy' must be a policy name")
    if not isinstance(args, dict) or not all(
            isinstance(v, str | int | float | bool) for v in args.values()):
        raise _bad("adaspec.policy_args", "'adaspec.policy_args' must be an object of scalar values")
    if args and policy is None:
        raise _bad("adaspec.policy", "'adaspec.policy_args' needs 'adaspec.policy'")
    return policy, dict(args)


def parse_request(body: Any, kind: str) -> GenerationRequest:
    """Validate an OpenAI request body; ``kind`` is ``"completion"`` or ``"chat"``.

    Raises:
        ApiError: 400 with the offending ``param``.
    """
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "'model' must be a string")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise _bad("n", f"only n = 1 is supported, got {body.get('n')!r}")
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        if value and value != neutral:  # None, 0, False and {} are the neutral values too
            raise _bad(key, f"'{key}' is not supported by this server")
    if kind == "chat":
        prompt, messages = None, _messages(body)
        max_tokens = _number(body, "max_completion_tokens", None, 1, 2**31, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens, 1, 2**31, integer=True)
    else:
        prompt, messages = _prompt(body), None
        max_tokens = _number(body, "max_tokens", 16, 1, 2**31, integer=True)  # OpenAI's default
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    top_k = _number(body, "top_k", 0, -1, 2**31, integer=True)
    policy, policy_args = _extension(body)
    return GenerationRequest(
        kind=kind, model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
        top_k=max(top_k, 0), seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=_stop(body), stream=stream, include_usage=stream and _flag(options, "include_usage"),
        policy=policy, policy_args=policy_args)


class StopTrimmer:
    """Cuts streamed text before the first stop string, holding back a possible partial match.

    ``feed(chunk)`` returns the text that can be sent now; ``flush()`` the rest at the end.
    The concatenation equals the whole text cut at the first stop occurrence (excluded),
    as OpenAI returns it.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, chunk: str) -> str:
        if self.stopped:
            return ""
        self.text += chunk
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._send(min(hits))
        return self._send(len(self.text) - self._partial())

    def flush(self) -> str:
        return "" if self.stopped else self._send(len(self.text))

    def _partial(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        tail = self.text[self.sent:]
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(tail)), 0, -1)
                    if s.startswith(tail[-n:])), default=0)

    def _send(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


def finish_reason(stop_reason: str, stopped: bool) -> str:
    """Engine stop reason -> OpenAI ``finish_reason``."""
    return "length" if stop_reason in ("max_new_tokens", "context") and not stopped else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def adaspec_stats(stats: dict, policy: str, draft: str | None = None) -> dict:
    """The per-request ``adaspec`` object: the policy and draft used, tau, acceptance and
    stage times (finite numbers only)."""
    keys = ("tau", "acceptance_rate", "tokens_per_s", "wall_s", "prefill_s", "draft_s", "verify_s",
            "policy_s", "target_forwards", "draft_forwards", "drafted_tokens", "accepted_tokens",
            "rounds", "stop_reason")
    out: dict[str, Any] = {"policy": policy, "draft": draft}
    for k in keys:
        v = stats.get(k)
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


class ResponseShape:
    """Builds one response's objects (shared id, creation time and model name)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish: str, use: dict, extra: dict) -> dict:
        """The non-streaming response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": use, "adaspec": extra}

    def chunk(self, text: str | None = None, finish: str | None = None, *, role: bool = False) -> dict:
        """A stream chunk with new ``text`` (or the opening role chunk / the finishing chunk)."""
        if self.kind == "chat":
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        """OpenAI's ``stream_options.include_usage`` chunk: no choices, only usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": use}
