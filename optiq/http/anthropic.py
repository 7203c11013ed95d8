"""Anthropic's Messages API shapes (POST /v1/messages): validate a body into
the engine's GenerationRequest, build the message and the stream's events.

What is served: a system prompt (string or text blocks), text content
blocks, tool_use / tool_result blocks (through the chat template's tool
messages), `tools` and `tool_choice`, `max_tokens` (required, as Anthropic
requires it), `temperature` (0 to 1), `top_p`, `top_k`, `stop_sequences`,
`stream`, `output_config.format` (a JSON schema, enforced while decoding)
and `metadata` (accepted, unused). Images, documents and server tools are
refused with a 400; `thinking` is accepted and ignored (a local model has no
thinking budget to set).
"""

import json
import uuid

from . import grammar, tools
from .errors import ApiError
from .openai import MAX_SEED, GenerationRequest, Sampling, text


def _int(body, name, default=None, low=None, high=None, required=False):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name}: Field required", param=name)
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (high is not None and value >= high):
        raise ApiError(400, f"{name}: must be an integer" + (f" of at least {low}" if low is not None else ""), param=name)
    return value


def _number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value <= high if low_open else low <= value <= high):
        raise ApiError(400, f"{name}: must be a number from {low} to {high}", param=name)
    return float(value)


def _text_of(blocks, where) -> str:
    """A string, or text blocks joined (tool_result content, system)."""
    if isinstance(blocks, str):
        return text(blocks, where)
    if isinstance(blocks, list) and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in blocks):
        return text("".join(b["text"] for b in blocks), where)
    raise ApiError(400, f"{where}: expected a string or an array of text blocks", param=where)


def _turn(i, message) -> list:
    """One Anthropic message as chat-template messages: user text, tool
    results (role "tool"), assistant text with its tool calls."""
    where = f"messages.{i}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise ApiError(400, f"{where}.role: must be 'user' or 'assistant'", param=f"{where}.role")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": text(content, f"{where}.content")}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: must be a string or an array of content blocks", param=f"{where}.content")
    out, parts, calls = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(text(block["text"], f"{where}.content.{j}.text"))
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str) and isinstance(block.get("input", {}), dict):
            calls.append({"id": block.get("id"), "type": "function", "function": {"name": block["name"], "arguments": block.get("input", {})}})
        elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
            body = block.get("content") or ""
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": _text_of(body, f"{where}.content.{j}.content")})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        else:
            raise ApiError(400, f"{where}.content.{j}: unsupported content block {kind!r} (text, tool_use and tool_result are served)",
                           param=f"{where}.content.{j}")
    if parts or calls or not out:
        turn = {"role": role, "content": "".join(parts)}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _output_grammar(body):
    config = body.get("output_config")
    if config is None:
        return None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, "output_config.format: must be {'type': 'json_schema', 'schema': {...}}", param="output_config.format")
    return grammar.json_schema(fmt["schema"])


def parse_messages(body, defaults) -> GenerationRequest:
    """Validate a Messages body (Anthropic's field names and limits)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", defaults.model_name)
    if not isinstance(model, str):
        raise ApiError(400, "model: must be a string", param="model")
    max_tokens = _int(body, "max_tokens", low=1, required=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty array", param="messages")
    system = body.get("system")
    turns = [{"role": "system", "content": _text_of(system, "system")}] if system not in (None, "", []) else []
    for i, m in enumerate(messages):
        turns += _turn(i, m)
    stop = body.get("stop_sequences") or []
    if not isinstance(stop, list) or len(stop) > 64 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop_sequences: must be an array of non-empty strings", param="stop_sequences")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream: must be a boolean", param="stream")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise ApiError(400, "metadata: must be an object", param="metadata")
    sampling = Sampling(
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 1.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=_int(body, "top_k", defaults.top_k, low=0),
        seed=_int(body, "seed", defaults.seed, low=0, high=MAX_SEED),
    )
    tool_list = tools.anthropic_tools(body)
    return GenerationRequest("chat", model, tuple(turns), None, max_tokens, sampling, tuple(text(s, "stop_sequences") for s in stop),
                             bool(body.get("stream", False)), False, False, 0, tool_list, tools.anthropic_tool_choice(body, tool_list),
                             _output_grammar(body), api="anthropic")


def new_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


STOP_REASONS = {"length": "max_tokens"}


def stop_reason(finish: str, stop_sequence, calls) -> str:
    if calls and finish == "stop":
        return "tool_use"
    if finish == "stop":
        return "stop_sequence" if stop_sequence is not None else "end_turn"
    return STOP_REASONS.get(finish, "end_turn")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """input_tokens excludes what was read from the prompt cache, as Anthropic counts."""
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": completion_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0}


def tool_block(call) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def message(req, mid: str, content_text: str, calls, finish: str, stop_sequence, use: dict) -> dict:
    content = ([{"type": "text", "text": content_text}] if content_text or not calls else []) + [tool_block(c) for c in calls]
    return {"id": mid, "type": "message", "role": "assistant", "model": req.model, "content": content,
            "stop_reason": stop_reason(finish, stop_sequence, calls), "stop_sequence": stop_sequence, "usage": use}


def event(kind: str, **fields) -> bytes:
    """One server-sent event in Anthropic's framing: an `event:` line naming the type."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def message_start(req, mid: str, prompt_tokens: int) -> bytes:
    start = {"id": mid, "type": "message", "role": "assistant", "model": req.model, "content": [], "stop_reason": None,
             "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
    return event("message_start", message=start)
