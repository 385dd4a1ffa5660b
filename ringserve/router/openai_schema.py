"""The OpenAI API's JSON, read and written: request bodies to ``GenerateRequest``, replies to OpenAI's shapes.

Request bodies are checked field by field: a known field of the wrong type is a 400 naming it; a known
field ringserve cannot honour (``n`` > 1, ``logprobs``, penalties, tools, ...) is a 400 saying so rather
than being silently dropped. Fields this module does not know are ignored, as vLLM does: clients and
frameworks send vendor fields of their own. ringserve's own fields ride along as extra body fields:
``top_k``, ``ignore_eos``, ``stop_token_ids``, ``ttft_slo_seconds`` and ``timeout_seconds`` (the
request's deadline, as a gRPC client sets one).

Unset sampling fields take ringserve's defaults, the same as over gRPC: greedy (temperature 0) and
128 tokens at most.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import grpc

from ringserve.rpc import FINISH_REASONS
from ringserve.v1 import common_pb2, router_pb2

FINISH_NAMES = {code: name for name, code in FINISH_REASONS.items() if name}

# Fields whose only supported values are their "off" ones (None is always off): anything else is refused.
_UNSUPPORTED = {
    "n": ((1,), "n > 1 is not supported: send one request per completion"),
    "best_of": ((1,), "best_of > 1 is not supported: send one request per completion"),
    "logprobs": ((False, 0), "logprobs are not available: ringserve's decode tier does not return them"),
    "top_logprobs": ((0,), "top_logprobs are not available: ringserve's decode tier does not return them"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix (text insertion) is not supported"),
    "presence_penalty": ((0,), "presence_penalty is not supported; leave it 0 or unset"),
    "frequency_penalty": ((0,), "frequency_penalty is not supported; leave it 0 or unset"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "tools": (([],), "tool calling is not supported"),
    "functions": (([],), "function calling is not supported"),
    "response_format": (({"type": "text"},), "response_format other than text (structured output) is not supported"),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, "invalid_request")


# gRPC status -> (HTTP status, OpenAI error type). Anything not listed is a server error (500).
_HTTP_FOR_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),  # nginx's "client closed request": nobody reads it
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def error_from_grpc(code: grpc.StatusCode, details: str | None) -> ApiError:
    """The HTTP error for a gRPC status from the router: the one mapping, as rpc.py's is for gRPC."""
    status, kind = _HTTP_FOR_GRPC.get(code, (500, "server_error"))
    return ApiError(status, details or code.name, kind, None, code.name.lower())


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed reads of a body's fields: None when absent or null, else the value or a 400 naming the field."""

    def __init__(self, body: dict):
        self.body = body

    def _check(self, name: str, ok, what: str):
        value = self.body.get(name)
        if value is not None and not ok(value):
            raise bad_request(f"{name} must be {what}, got {_shown(value)}", name)
        return value

    def uint(self, name: str, bits: int = 32) -> int | None:
        return self._check(name, lambda v: _is_int(v) and 0 <= v < 2**bits, f"an integer in [0, 2**{bits})")

    def number(self, name: str) -> float | None:
        return self._check(name, lambda v: _is_real(v) and math.isfinite(v), "a finite number")

    def bool(self, name: str) -> bool | None:
        return self._check(name, lambda v: isinstance(v, bool), "true or false")

    def string(self, name: str) -> str | None:
        return self._check(name, lambda v: isinstance(v, str), "a string")

    def strings(self, name: str) -> list[str]:
        value = self._check(name, lambda v: isinstance(v, str) or _list_of(v, str), "a string or a list of strings")
        return [value] if isinstance(value, str) else value or []

    def uints(self, name: str) -> list[int]:
        value = self._check(name, lambda v: _list_of(v, int) and all(0 <= x < 2**32 for x in v), "a list of token ids")
        return value or []

    def object(self, name: str) -> dict:
        return self._check(name, lambda v: isinstance(v, dict), "an object") or {}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(v, kind: type) -> bool:
    check = _is_int if kind is int else (lambda x: isinstance(x, kind))
    return isinstance(v, list) and all(check(x) for x in v)


@dataclass
class ParsedRequest:
    """What an HTTP request asks for: the gRPC request, and how to run and answer it."""

    generate: router_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    timeout: float | None  # seconds: the gRPC call's deadline


def parse_request(body: dict, served_model: str, chat: bool) -> ParsedRequest:
    """A /v1/completions (``chat`` False) or /v1/chat/completions body as a GenerateRequest."""
    f = _Fields(body)
    model = f.string("model")
    if model is None:
        raise bad_request(f"model is required: this server serves {served_model!r}", "model")
    if model != served_model:
        raise ApiError(404, f"model {model!r} is not served here; use {served_model!r}", "not_found_error", "model",
                       "model_not_found")  # fmt: skip
    for name, (off, why) in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in off:
            raise bad_request(why, name)
    req = router_pb2.GenerateRequest(sampling=_sampling(f, chat))
    if chat:
        req.messages.messages.extend(_messages(body.get("messages")))
    else:
        _set_prompt(req, body.get("prompt"))
    ttft = f.number("ttft_slo_seconds")
    if ttft is not None:
        req.ttft_slo_seconds = ttft
    timeout = f.number("timeout_seconds")
    if timeout is not None and timeout <= 0:
        raise bad_request(f"timeout_seconds must be > 0, got {timeout}", "timeout_seconds")
    stream = bool(f.bool("stream"))
    options = f.object("stream_options")
    if options and not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad_request(f"stream_options.include_usage must be true or false, got {_shown(include_usage)}",
                          "stream_options")  # fmt: skip
    return ParsedRequest(req, stream, bool(include_usage), timeout)


def _sampling(f: _Fields, chat: bool) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams()
    # Chat's max_completion_tokens replaced max_tokens in OpenAI's API; either is accepted, the newer wins.
    for name in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        if (value := f.uint(name)) is not None:
            s.max_tokens = value
    for name in ("temperature", "top_p"):
        if (value := f.number(name)) is not None:
            setattr(s, name, value)
    if (value := f.uint("top_k")) is not None:
        s.top_k = value
    if (value := f.uint("seed", bits=64)) is not None:
        s.seed = value
    s.stop.extend(f.strings("stop"))
    s.stop_token_ids.extend(f.uints("stop_token_ids"))
    s.ignore_eos = bool(f.bool("ignore_eos"))
    return s


def _set_prompt(req: router_pb2.GenerateRequest, prompt) -> None:
    """prompt: a string or a list of token ids, or a list holding one of those (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    elif _list_of(prompt, int) and all(0 <= t < 2**32 for t in prompt):
        req.token_ids.ids.extend(prompt)
    elif prompt is None:
        raise bad_request("prompt is required: a string or a list of token ids", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("several prompts in one request are not supported: send one request per prompt", "prompt")
    else:
        raise bad_request(f"prompt must be a string or a list of token ids, got {_shown(prompt)}", "prompt")


def _messages(messages) -> list[router_pb2.ChatMessage]:
    """Chat messages; content is a string or a list of text parts (the only kind a text model reads)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string role, got {_shown(m)}", "messages")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts, got "
                              f"{_shown(content)}", "messages")  # fmt: skip
        out.append(router_pb2.ChatMessage(role=m["role"], content=content))
    return out


def usage_body(usage: common_pb2.Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def choice(chat: bool, text: str, finish: str | None, delta: bool, first: bool = False) -> dict:
    """One entry of ``choices``: a whole answer, or (``delta``) a streamed piece of one."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if not delta:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    piece = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}
