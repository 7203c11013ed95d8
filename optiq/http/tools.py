"""Tool calling: tools into the chat template, tool calls out of the reply.

The tools go to the tokenizer's own chat template (`apply_chat_template(...,
tools=...)`), in the OpenAI function shape every Hugging Face template reads.
The reply is cut at the template's tool-call tags and each call is parsed by
mlx-lm's parser for that model family (`TokenizerWrapper.tool_parser`: JSON
in <tool_call> tags for Qwen/Hermes, Mistral's [TOOL_CALLS], pythonic, GLM,
Kimi, MiniMax and others). A required tool call (OpenAI `tool_choice:
"required"` or a named function, Anthropic `any` or `tool`) is enforced with
a grammar over the template's JSON tool-call format, so even a model that
would rather talk makes the call.
"""

import json
import uuid

import attrs

from . import grammar
from .errors import ApiError


@attrs.frozen
class ToolChoice:
    mode: str = "auto"  # "auto", "none" or "required"
    name: str | None = None  # a required call to this function


def _schema(value, where):
    if value is None:
        return {"type": "object", "properties": {}}
    if not isinstance(value, dict):
        raise ApiError(400, f"{where} must be a JSON schema object", param=where)
    return value


def _name(value, where):
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where} must be a non-empty string", param=where)
    return value


def _tools(body, read) -> tuple:
    """`tools` in the template's (OpenAI function) shape; read(i, tool) -> (name, description, schema)."""
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    out = []
    for i, t in enumerate(tools):
        name, description, schema = read(i, t)
        entry = {"name": name, "parameters": schema}
        if isinstance(description, str):
            entry["description"] = description
        out.append({"type": "function", "function": entry})
    return tuple(out)


def openai_tools(body) -> tuple:
    """OpenAI `tools`: [{"type": "function", "function": {name, description, parameters}}]."""
    def read(i, t):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]")
        return _name(fn.get("name"), f"tools[{i}].function.name"), fn.get("description"), _schema(fn.get("parameters"), f"tools[{i}].function.parameters")

    return _tools(body, read)


def anthropic_tools(body) -> tuple:
    """Anthropic `tools`: [{name, description, input_schema}]."""
    def read(i, t):
        if not isinstance(t, dict) or t.get("type", "custom") not in ("custom", None):
            raise ApiError(400, f"tools.{i}: only client tools (name, description, input_schema) are served", param=f"tools.{i}")
        return _name(t.get("name"), f"tools.{i}.name"), t.get("description"), _schema(t.get("input_schema"), f"tools.{i}.input_schema")

    return _tools(body, read)


def _known(tools, name, where):
    if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
        raise ApiError(400, f"{where}: no tool named {name!r}", param=where)
    return name


def openai_tool_choice(body, tools) -> ToolChoice:
    choice = body.get("tool_choice")
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("auto", "none", "required"):
        if choice != "none" and not tools:
            raise ApiError(400, f"'tool_choice' {choice!r} needs 'tools'", param="tool_choice")
        return ToolChoice(choice)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        return ToolChoice("required", _known(tools, choice["function"].get("name"), "tool_choice.function.name"))
    raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def anthropic_tool_choice(body, tools) -> ToolChoice:
    choice = body.get("tool_choice")
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return ToolChoice(kind if tools else "none")
    if kind == "any" and tools:
        return ToolChoice("required")
    if kind == "tool" and tools:
        return ToolChoice("required", _known(tools, choice.get("name"), "tool_choice.name"))
    raise ApiError(400, "'tool_choice' must be {'type': 'auto'|'any'|'tool'|'none'} ('any' and 'tool' need 'tools')", param="tool_choice")


def call_grammar(tokenizer, tools, choice: ToolChoice) -> grammar.Grammar | None:
    """The grammar of one required call in the template's tags, or None when
    the call is not required. Only JSON tool-call formats can be enforced."""
    if choice.mode != "required":
        return None
    start, end = getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None)
    parser = getattr(getattr(tokenizer, "tool_parser", None), "__module__", "")
    if not start or not parser.endswith("json_tools"):
        raise ApiError(400, "a required tool call is enforced only for models whose chat template writes JSON tool calls "
                       f"in <tool_call> tags; this model's format is {parser.rsplit('.', 1)[-1] or 'none'}", param="tool_choice")
    chosen = [t["function"] for t in tools if choice.name in (None, t["function"]["name"])]
    one = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
    return grammar.tagged_json(start, end, one[0] if len(one) == 1 else {"anyOf": one})


@attrs.frozen
class ToolCall:
    id: str
    name: str
    arguments: dict


def _new_call(parsed: dict, prefix: str) -> ToolCall:
    args = parsed.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args)
    return ToolCall(parsed.get("id") or prefix + uuid.uuid4().hex[:24], str(parsed["name"]), args if isinstance(args, dict) else {"value": args})


class ToolStream:
    """Splits streamed reply text into plain text (sent as it comes) and tool
    calls (held from the start tag to the end tag, parsed at the end).

    `feed` returns the text safe to send now: never a prefix that may grow into
    the start tag. `finish` returns the held plain text and the parsed calls;
    a call the parser refuses stays in the text, so nothing is lost."""

    def __init__(self, tokenizer, tools, id_prefix="call_"):
        self.start = getattr(tokenizer, "tool_call_start", None) if tools else None
        self.end = getattr(tokenizer, "tool_call_end", None)
        self.parser = getattr(tokenizer, "tool_parser", None)
        self.tools, self.prefix = list(tools), id_prefix
        self.buffer, self.calls, self.unparsed = "", [], ""

    def feed(self, text: str) -> str:
        if not self.start:
            return text
        self.buffer += text
        out = ""
        while True:
            i = self.buffer.find(self.start)
            if i < 0:
                break
            j = self.buffer.find(self.end, i + len(self.start)) if self.end else -1
            if j < 0:  # inside a call: hold the rest
                out, self.buffer = out + self.buffer[:i], self.buffer[i:]
                return out
            out += self.buffer[:i]
            self._parse(self.buffer[i:j + len(self.end)], self.buffer[i + len(self.start):j])
            self.buffer = self.buffer[j + len(self.end):]
        hold = max((k for k in range(1, len(self.start)) if self.buffer.endswith(self.start[:k])), default=0)
        out, self.buffer = out + self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return out

    def _parse(self, whole: str, inner: str):
        try:
            parsed = self.parser(inner, self.tools)
            for p in parsed if isinstance(parsed, list) else [parsed]:
                self.calls.append(_new_call(p, self.prefix))
        except (ValueError, KeyError, TypeError, AttributeError):  # json.JSONDecodeError is a ValueError
            self.unparsed += whole

    def finish(self) -> tuple:
        """(text not yet sent, [ToolCall]) once the reply is complete."""
        rest, self.buffer = self.buffer, ""
        if self.start and rest.startswith(self.start):  # a call with no end tag: the template may end calls with EOS
            self._parse(rest, rest[len(self.start):])
            rest = ""
        rest, self.unparsed = self.unparsed + rest, ""
        return rest, list(self.calls)


def openai_tool_calls(calls, streaming=False) -> list:
    out = []
    for i, c in enumerate(calls):
        entry = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        out.append({"index": i, **entry} if streaming else entry)
    return out
