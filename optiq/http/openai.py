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

from . import grammar, tools
from .grammar import Grammar
from .errors import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool")


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
    tools: tuple = ()  # OpenAI function shape, for the chat template
    tool_choice: object = None  # tools.ToolChoice
    grammar: Grammar | None = None  # structured output, enforced while decoding
    api: str = "openai"  # "openai" or "anthropic": the response shape


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
        message = {"role": m["role"], "content": text(content, f"messages[{i}].content")}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return tuple(out)


def _tool_calls(calls, i) -> list:
    """An assistant turn's tool calls, arguments as objects (chat templates
    render them with tojson)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be an array", param=where)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}[{j}] needs function.name", param=f"{where}[{j}]")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise ApiError(400, f"{where}[{j}].function.arguments is not JSON", param=f"{where}[{j}].function.arguments")
        out.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def response_grammar(body) -> Grammar | None:
    """OpenAI `response_format` (json_object, json_schema, and a `regex` type),
    or vLLM's `structured_outputs` ({json | regex | choice | grammar}) for
    clients written against vLLM."""
    fmt = _field(body, "response_format", (dict,), default=None)
    vllm = _field(body, "structured_outputs", (dict,), default=None)
    if fmt is not None and vllm is not None:
        raise ApiError(400, "give 'response_format' or 'structured_outputs', not both", param="response_format")
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return grammar.json_schema(None)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(400, "'response_format.json_schema' must be {name, schema, strict}", param="response_format.json_schema")
            return grammar.json_schema(spec.get("schema", {}))
        if kind == "regex" and isinstance(fmt.get("regex"), str):
            return grammar.regex(text(fmt["regex"], "response_format.regex"))
        raise ApiError(400, "'response_format.type' must be text, json_object, json_schema or regex (with 'regex')", param="response_format.type")
    if vllm is not None:
        given = [k for k in ("json", "regex", "choice", "grammar") if vllm.get(k) is not None]
        if len(given) != 1:
            raise ApiError(400, "'structured_outputs' takes one of json, regex, choice, grammar", param="structured_outputs")
        value = vllm[given[0]]
        if given[0] == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ApiError(400, f"'structured_outputs.json' is not a JSON schema: {exc}", param="structured_outputs.json")
        if given[0] == "json" and isinstance(value, dict):
            return grammar.json_schema(value)
        if given[0] == "regex" and isinstance(value, str):
            return grammar.regex(text(value, "structured_outputs.regex"))
        if given[0] == "choice" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return grammar.choice([text(v, "structured_outputs.choice") for v in value])
        if given[0] == "grammar" and isinstance(value, str):
            return grammar.lark(text(value, "structured_outputs.grammar"))
        raise ApiError(400, f"'structured_outputs.{given[0]}' has the wrong type", param=f"structured_outputs.{given[0]}")
    return None


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
        tool_list = tools.openai_tools(body)
        return GenerationRequest(kind, model, _messages(body), None, max_tokens, sampling, _stop(body), stream, include_usage, logprobs, top,
                                 tool_list, tools.openai_tool_choice(body, tool_list), response_grammar(body))
    top = _field(body, "logprobs", (int,), default=None, check=lambda v: 0 <= v <= 5, why="0 to 5")
    return GenerationRequest(kind, model, None, _prompt(body), max_tokens, sampling, _stop(body), stream, include_usage, top is not None, top or 0,
                             grammar=response_grammar(body))


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, draft=None) -> dict:
    """draft: (accepted, proposed) draft-model tokens of a speculative request,
    reported in OpenAI's prediction fields."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if draft is not None:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": draft[0], "rejected_prediction_tokens": draft[1] - draft[0]}
    return out


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


def finish_reason(finish: str, calls) -> str:
    return "tool_calls" if calls and finish == "stop" else finish


def response(req: GenerationRequest, rid: str, text: str, finish: str, logprob_entries, use: dict, calls=()) -> dict:
    created = int(time.time())
    if req.kind == "chat":
        message = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = tools.openai_tool_calls(calls)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": chat_logprobs(logprob_entries) if req.logprobs else None,
            "finish_reason": finish_reason(finish, calls),
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


def tool_calls_chunk(req: GenerationRequest, rid: str, calls) -> dict:
    choice = {"index": 0, "delta": {"tool_calls": tools.openai_tool_calls(calls, streaming=True)}, "logprobs": None, "finish_reason": None}
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None
    return body


def usage_chunk(req: GenerationRequest, rid: str, use: dict) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": [], "usage": use}
