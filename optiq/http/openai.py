"""OpenAI's API shapes: validate request bodies into plain records, build
responses and stream chunks, and the error object every 4xx carries.

Validation is strict and total: any bytes at all either parse into a
request the engine can serve or raise an ApiError with a 4xx that names the
field (`param`) that is wrong, never a 500 from deep inside generation.
Non-finite numbers (NaN, Infinity: not JSON), integers past Python's parsing
limit, nesting past the recursion limit, and strings holding lone UTF-16
surrogates (which no tokenizer can encode) are refused here.
"""

import json
import time
import uuid

import attrs

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param=None, code=None, type="invalid_request_error", headers=()):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = tuple(headers)  # extra response headers (a 401's WWW-Authenticate)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@attrs.frozen
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@attrs.frozen
class GenerationRequest:
    """What the engine needs, from either endpoint."""

    kind: str  # "chat" or "completion"
    model: str
    messages: tuple | None
    prompt: str | tuple | None  # text or token ids
    max_tokens: int
    sampling: Sampling
    stop: tuple
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


MAX_SEED = 1 << 64  # mx.random.seed takes an unsigned 64-bit integer


def _not_json_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def decode_body(data: bytes):
    """The request body as Python values, or a 400 invalid_json for anything
    that is not strict JSON (or is too deep or too large to parse)."""
    try:
        return json.loads(data or b"null", parse_constant=_not_json_constant)
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json")


def text(value: str, name: str) -> str:
    """`value`, once known to encode as UTF-8 (a lone surrogate such as "\ud800" does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'{name}' is not valid Unicode text ({exc.reason} at {exc.start})", param=name, code="invalid_value")
    return value


def _field(body, name, types, default=None, check=None, why=""):
    if name not in body or body[name] is None:
        return default
    value = body[name]
    # bool is an int in Python; JSON's true is never a number here.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = "/".join("number" if t is float else {int: "integer", str: "string", bool: "boolean", list: "array", dict: "object"}[t] for t in types)
        raise ApiError(400, f"'{name}' must be a {names}, got {type(value).__name__}", param=name, code="invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' is out of range: {why}", param=name, code="invalid_value")
    return text(value, name) if isinstance(value, str) else value


def _stop(body) -> tuple:
    stop = _field(body, "stop", (str, list), default=())
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
    return tuple(text(s, "stop") for s in stop)


def _messages(body) -> tuple:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role, one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content", "")
        if isinstance(content, list):  # content parts: only text here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": text(content, f"messages[{i}].content")})
    return tuple(out)


def _prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return tuple(prompt)
    raise ApiError(400, "'prompt' must be a non-empty string or an array of token ids (one prompt per request)", param="prompt")


def parse_request(kind: str, body, defaults) -> GenerationRequest:
    """Validate a chat ("chat") or completions ("completion") body against the server's defaults."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", (str,), default=defaults.model_name)
    # Both are checked: an invalid max_tokens is an error even beside a valid max_completion_tokens.
    legacy = _field(body, "max_tokens", (int,), default=defaults.max_tokens, check=lambda v: v >= 1, why="at least 1")
    max_tokens = _field(body, "max_completion_tokens", (int,), default=legacy, check=lambda v: v >= 1, why="at least 1")
    n = _field(body, "n", (int,), default=1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    sampling = Sampling(
        temperature=float(_field(body, "temperature", (int, float), defaults.temperature, lambda v: 0 <= v <= 2, "0 to 2")),
        top_p=float(_field(body, "top_p", (int, float), defaults.top_p, lambda v: 0 < v <= 1, "greater than 0, at most 1")),
        top_k=_field(body, "top_k", (int,), defaults.top_k, lambda v: v >= 0, "0 (off) or more"),
        seed=_field(body, "seed", (int,), defaults.seed, lambda v: 0 <= v < MAX_SEED, "0 to 2^64 - 1"),
    )
    stream = _field(body, "stream", (bool,), default=False)
    options = _field(body, "stream_options", (dict,), default={})
    include_usage = _field(options, "include_usage", (bool,), default=False)
    if kind == "chat":
        logprobs = _field(body, "logprobs", (bool,), default=False)
        top = _field(body, "top_logprobs", (int,), default=0, check=lambda v: 0 <= v <= 20, why="0 to 20")
        if top and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return GenerationRequest(kind, model, _messages(body), None, max_tokens, sampling, _stop(body), stream, include_usage, logprobs, top)
    top = _field(body, "logprobs", (int,), default=None, check=lambda v: 0 <= v <= 5, why="0 to 5")
    return GenerationRequest(kind, model, None, _prompt(body), max_tokens, sampling, _stop(body), stream, include_usage, top is not None, top or 0)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_logprobs(entries) -> dict:
    """entries: (token text, logprob, [(text, logprob), ...]) per generated token."""
    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [dict(one(t, lp), top_logprobs=[one(tt, tl) for tt, tl in top]) for t, lp, top in entries]}


def completion_logprobs(entries, offset0: int) -> dict:
    offsets, pos = [], offset0
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [dict(top) for _, _, top in entries],
        "text_offset": offsets,
    }


def response(req: GenerationRequest, rid: str, text: str, finish: str, logprob_entries, use: dict) -> dict:
    created = int(time.time())
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(logprob_entries) if req.logprobs else None,
            "finish_reason": finish,
        }
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": completion_logprobs(logprob_entries, 0) if req.logprobs else None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice], "usage": use}


def chunk(req: GenerationRequest, rid: str, text: str | None, finish: str | None, logprob_entries=None, first=False, offset=0) -> dict:
    created = int(time.time())
    if req.kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(logprob_entries) if req.logprobs and logprob_entries else None, "finish_reason": finish}
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model, "choices": [choice]}
    else:
        lp = completion_logprobs(logprob_entries, offset) if req.logprobs and logprob_entries else None
        choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
        body = {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None
    return body


def usage_chunk(req: GenerationRequest, rid: str, use: dict) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": [], "usage": use}
