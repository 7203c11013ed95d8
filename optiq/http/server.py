"""The HTTP edge: asyncio streams from the standard library, HTTP/1.1 parsed by
h11 (sans-IO), routes for OpenAI's API and Anthropic's Messages API.
Generation happens in the engine thread; this loop only parses, validates,
tokenizes, splits tool calls out of replies and writes.
"""

import asyncio
import hmac
import json
import logging
import time

import attrs
import h11

from . import anthropic, grammar, tools
from .engine import Ticket
from .errors import ApiError
from .openai import chunk, decode_body, finish_reason, new_id, parse_request, response, tool_calls_chunk, usage, usage_chunk

log = logging.getLogger("optiq.http")

ROUTES = {
    "/health": ("GET",),
    "/v1/models": ("GET",),
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/messages": ("POST",),
    "/v1/messages/count_tokens": ("POST",),
}


SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


@attrs.frozen
class Defaults:
    model_name: str
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@attrs.define
class App:
    """Everything a request handler reads: the engine and the server's settings."""

    engine: object
    tokenizer: object
    defaults: Defaults
    adapters: tuple = ()
    max_context: int = 4096
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    timeout: float = 60.0
    vocab_size: int = 1 << 31
    created: int = attrs.field(factory=lambda: int(time.time()))

    def adapter_for(self, model: str):
        if model in (None, "", self.defaults.model_name, "default", "default_model"):  # mlx_lm.server's name too
            return None
        if model in self.adapters:
            return model
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the base model and its adapters",
                       param="model", code="model_not_found")

    def prompt_tokens(self, req) -> list:
        if req.kind == "chat":
            offered = req.tools if req.tools and req.tool_choice is not None and req.tool_choice.mode != "none" else None
            try:
                return chat_tokens(self.tokenizer, list(req.messages), offered)
            except Exception as exc:  # jinja's TemplateError, a template's raise_exception: the messages, not a bug
                raise ApiError(400, f"the model's chat template refuses these messages: {type(exc).__name__}: {exc}", param="messages")
        if isinstance(req.prompt, tuple):
            if max(req.prompt) >= self.vocab_size:
                raise ApiError(400, f"token ids must be below the vocabulary size {self.vocab_size}", param="prompt")
            return list(req.prompt)
        return self.tokenizer.encode(req.prompt)

    def constraint(self, req):
        """(the grammar this reply must follow: a required tool call or the
        response format, its logits processor), compiled against the
        vocabulary now: a schema or regex llguidance refuses is a 400 before
        anything is queued. (None, None) for a free reply."""
        call = tools.call_grammar(self.tokenizer, req.tools, req.tool_choice) if req.tool_choice is not None else None
        if call is not None and req.grammar is not None:
            raise ApiError(400, "a required tool call and a response format cannot both constrain one reply", param="tool_choice")
        chosen = call or req.grammar
        if chosen is None:
            return None, None
        try:
            return chosen, self.engine.make_processor(chosen)
        except grammar.GrammarError as exc:
            where = "tools" if call is not None else "output_config.format" if req.api == "anthropic" else "response_format"
            raise ApiError(400, f"the requested output format does not compile: {exc}", param=where, code="invalid_grammar")


def chat_tokens(tokenizer, messages, tools=None) -> list:
    """The tokenizer's own chat template (jinja, via transformers), with the
    tools offered; a plain transcript when the tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": list(tools)} if tools else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        return tokenizer.encode(text, add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer.encode(text)


def _json(status: int, body: dict, headers=()):
    data = json.dumps(body).encode()
    return status, [("content-type", "application/json"), ("content-length", str(len(data))), *headers], data


def _error(exc: ApiError, api: str = "openai"):
    return _json(exc.status, exc.anthropic_body() if api == "anthropic" else exc.body(), exc.headers)


def api_of(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"


class Connection:
    """One client: a keep-alive loop of request -> response over h11."""

    def __init__(self, app: App, reader, writer):
        self.app, self.reader, self.writer = app, reader, writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.closed = False

    async def send(self, *events):
        for event in events:
            data = self.conn.send(event)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def _receive(self, deadline=None, start_on_data=False):
        """The next h11 event, reading the socket as needed. Each read waits at
        most `timeout` (an idle connection is dropped); with a `deadline` (loop
        time) the whole event must arrive by then, however the bytes trickle
        in. start_on_data: the deadline starts with the first byte read (the
        headers of a request on a keep-alive connection)."""
        loop = asyncio.get_running_loop()
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            wait = self.app.timeout if deadline is None else deadline - loop.time()
            if wait <= 0:
                raise asyncio.TimeoutError
            data = await asyncio.wait_for(self.reader.read(65536), min(wait, self.app.timeout))
            if start_on_data and deadline is None and data:
                deadline = loop.time() + self.app.timeout
            self.conn.receive_data(data)

    async def _body(self, request) -> bytes:
        length = dict(request.headers).get(b"content-length")
        if length is not None and int(length) > self.app.max_body_bytes:
            raise ApiError(413, f"request body over {self.app.max_body_bytes} bytes", code="body_too_large")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.app.timeout  # the whole body, not each read
        while True:
            event = await self._receive(deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.app.max_body_bytes:
                    raise ApiError(413, f"request body over {self.app.max_body_bytes} bytes", code="body_too_large")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ApiError(400, "incomplete request body")

    async def serve(self):
        try:
            while not self.closed:
                try:
                    event = await self._receive(start_on_data=True)
                except (asyncio.TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
                    if isinstance(exc, h11.RemoteProtocolError) and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self.respond(*_json(getattr(exc, "error_status_hint", 400), ApiError(400, f"malformed HTTP request: {exc}").body()))
                    break
                if isinstance(event, (h11.ConnectionClosed,)) or event is h11.PAUSED:
                    break
                if not isinstance(event, h11.Request):
                    break
                await self.handle(event)
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        finally:
            if self.closed:
                await self._linger()
            self.writer.close()

    async def _linger(self, seconds: float = 2.0):
        """Half-close, then discard what the client still sends: closing a socket
        with unread data resets it, and the reset can eat our error response."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            deadline = asyncio.get_running_loop().time() + seconds
            while await asyncio.wait_for(self.reader.read(65536), max(0.0, deadline - asyncio.get_running_loop().time())):
                pass
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    async def respond(self, status, headers, data):
        await self.send(h11.Response(status_code=status, headers=headers), h11.Data(data=data), h11.EndOfMessage())

    async def handle(self, request):
        path = request.target.decode("latin-1").split("?", 1)[0]
        method = request.method.decode()
        try:
            body = await self._body(request)
            result = await self.route(method, path, dict(request.headers), body)
        except ApiError as exc:
            if self.conn.our_state is not h11.SEND_RESPONSE:  # a stream already under way
                self.closed = True
                return
            result = _error(exc, api_of(path))
            if exc.status == 413:
                self.closed = True  # the rest of the body is unread
        except h11.RemoteProtocolError as exc:  # a malformed body (a bad chunk size): say so, then close
            self.closed = True
            if self.conn.our_state is not h11.SEND_RESPONSE:
                return
            result = _error(ApiError(400, f"malformed request body: {exc}", code="invalid_body"), api_of(path))
        except asyncio.TimeoutError:  # a body slower than --timeout: the client is dropped
            self.closed = True
            return
        except ConnectionError:
            raise
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("internal error serving %s %s", method, path)
            if self.conn.our_state is not h11.SEND_RESPONSE:
                self.closed = True
                return
            result = _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"), api_of(path))
        if result is not None:
            status, headers, data = result
            if self.closed:
                headers = headers + [("connection", "close")]
            await self.respond(status, headers, data)

    def _authorize(self, headers):
        """Authorization: Bearer KEY (OpenAI's clients) or x-api-key: KEY (Anthropic's)."""
        if self.app.api_key is None:
            return
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
        # RFC 7235: the scheme is case-insensitive
        if scheme.lower() != "bearer":
            key = headers.get(b"x-api-key", b"").decode("latin-1")
        if not hmac.compare_digest(key.strip().encode("utf-8", "replace"), self.app.api_key.encode()):  # constant time
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY, or x-api-key: KEY)", code="invalid_api_key",
                           headers=[("www-authenticate", 'Bearer realm="optiq"')])

    async def route(self, method, path, headers, body):
        if path not in ROUTES:
            raise ApiError(404, f"no route {path}", code="not_found")
        if method not in ROUTES[path]:
            raise ApiError(405, f"{method} is not allowed on {path}; use {', '.join(ROUTES[path])}", code="method_not_allowed")
        if path == "/health":
            return _json(200, {"status": "ok", **self.app.engine.stats})
        self._authorize(headers)
        if path == "/v1/models":
            names = [self.app.defaults.model_name, *self.app.adapters]
            data = [{"id": n, "object": "model", "created": self.app.created, "owned_by": "optiq"} for n in names]
            return _json(200, {"object": "list", "data": data})
        parsed = decode_body(body)
        if path == "/v1/messages/count_tokens":  # Anthropic's: the prompt's size, nothing generated
            if isinstance(parsed, dict):
                parsed = {**parsed, "max_tokens": parsed.get("max_tokens", 1)}
            req = anthropic.parse_messages(parsed, self.app.defaults)
            return _json(200, {"input_tokens": len(self.app.prompt_tokens(req))})
        if path == "/v1/messages":
            return await self.generate(anthropic.parse_messages(parsed, self.app.defaults))
        kind = "chat" if path.endswith("chat/completions") else "completion"
        return await self.generate(parse_request(kind, parsed, self.app.defaults))

    async def generate(self, req):
        app = self.app
        adapter = app.adapter_for(req.model)
        tokens = app.prompt_tokens(req)
        if len(tokens) >= app.max_context:
            raise ApiError(400, f"the prompt has {len(tokens)} tokens; the context holds {app.max_context}",
                           param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
        chosen, processor = app.constraint(req)
        req = attrs.evolve(req, max_tokens=min(req.max_tokens, app.max_context - len(tokens)), grammar=chosen)
        if req.sampling.top_k >= app.vocab_size:  # every token is in the top k: the same as no top-k
            req = attrs.evolve(req, sampling=attrs.evolve(req.sampling, top_k=0))
        ticket = Ticket(req, tokens, adapter, asyncio.get_running_loop(), asyncio.Queue(), processor=processor)
        app.engine.submit(ticket)
        watcher = asyncio.ensure_future(self._watch())  # one per request, not per event
        try:
            if req.stream:
                await (self.stream_messages if req.api == "anthropic" else self.stream)(req, ticket, watcher, len(tokens))
                return None
            return await self.complete(req, ticket, watcher)
        finally:
            watcher.cancel()
            try:
                await watcher
            except (asyncio.CancelledError, ConnectionError):
                pass
            if not ticket.done:
                app.engine.cancel(ticket)  # a client gone mid-request frees its slot

    async def _watch(self):
        """Read the socket while a request runs: h11 keeps pipelined bytes up to
        one more request's worth; past that the bytes are dropped and the
        connection closes after this response. The end of the stream means
        the client hung up."""
        kept, cap = 0, self.app.max_body_bytes + 64 * 1024
        while data := await self.reader.read(65536):
            if kept + len(data) <= cap and not self.closed:
                self.conn.receive_data(data)
                kept += len(data)
            else:
                self.closed = True

    async def _event(self, ticket, watcher):
        """The next engine event, or ConnectionError once the client hangs up."""
        if ticket.events.empty():
            get = asyncio.ensure_future(ticket.events.get())
            await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise ConnectionError("client closed the connection")
            event = get.result()
        else:  # a step's events arrive together: no waiting for the rest
            event = ticket.events.get_nowait()
        if "error" in event:
            ticket.done = True
            raise ApiError(500, event["error"], type="server_error", code="generation_failed")
        if "finish" in event:
            ticket.done = True
        return event

    async def complete(self, req, ticket, watcher):
        text, entries = "", []
        while True:
            event = await self._event(ticket, watcher)
            text += event["text"]
            entries += event["entries"]
            if "finish" in event:
                break
        split = tools.ToolStream(self.app.tokenizer, req.tools, "toolu_" if req.api == "anthropic" else "call_")
        sent = split.feed(text)
        rest, calls = split.finish()
        if req.api == "anthropic":
            use = anthropic.usage(event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"])
            return _json(200, anthropic.message(req, anthropic.new_id(), sent + rest, calls, event["finish"], event.get("stop_sequence"), use))
        use = usage(event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"], event.get("draft"))
        return _json(200, response(req, new_id(req.kind), sent + rest, event["finish"], entries, use, calls))

    async def stream(self, req, ticket, watcher, prompt_tokens):
        rid = new_id(req.kind)
        first = True
        offset = 0
        split = tools.ToolStream(self.app.tokenizer, req.tools)
        while True:
            event = await self._event(ticket, watcher)  # errors before the first byte are plain 4xx/5xx
            if first:
                await self.send(h11.Response(status_code=200, headers=SSE_HEADERS))
                if req.kind == "chat":
                    await self._sse(chunk(req, rid, "", None, first=True))
                first = False
            text = split.feed(event["text"])
            calls = ()
            if "finish" in event:
                rest, calls = split.finish()
                text += rest
            if text or event["entries"]:
                await self._sse(chunk(req, rid, text, None, event["entries"], offset=offset))
                offset += len(text)
            if "finish" in event:
                if calls:
                    await self._sse(tool_calls_chunk(req, rid, calls))
                await self._sse(chunk(req, rid, None if req.kind == "chat" else "", finish_reason(event["finish"], calls)))
                if req.include_usage:
                    use = usage(event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"], event.get("draft"))
                    await self._sse(usage_chunk(req, rid, use))
                await self.send(h11.Data(data=b"data: [DONE]\n\n"), h11.EndOfMessage())
                return

    async def stream_messages(self, req, ticket, watcher, prompt_tokens):
        """Anthropic's event sequence: message_start, ping, then per content
        block start/delta.../stop (text first, then each tool_use with its
        input as one input_json_delta), message_delta (stop reason, output
        tokens), message_stop."""
        mid, split, block = anthropic.new_id(), tools.ToolStream(self.app.tokenizer, req.tools, "toolu_"), None
        first = True
        while True:
            event = await self._event(ticket, watcher)
            if first:
                await self.send(h11.Response(status_code=200, headers=SSE_HEADERS))
                await self._raw(anthropic.message_start(req, mid, prompt_tokens - event.get("cached_tokens", 0)))
                await self._raw(anthropic.event("ping"))
                first = False
            text, calls = split.feed(event["text"]), ()
            if "finish" in event:
                rest, calls = split.finish()
                text += rest
            if text:
                if block is None:
                    block = 0
                    await self._raw(anthropic.event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
                await self._raw(anthropic.event("content_block_delta", index=0, delta={"type": "text_delta", "text": text}))
            if "finish" in event:
                break
        if block is not None:
            await self._raw(anthropic.event("content_block_stop", index=0))
        for i, call in enumerate(calls, start=0 if block is None else 1):
            await self._raw(anthropic.event("content_block_start", index=i, content_block={**anthropic.tool_block(call), "input": {}}))
            await self._raw(anthropic.event("content_block_delta", index=i, delta={"type": "input_json_delta", "partial_json": json.dumps(call.arguments)}))
            await self._raw(anthropic.event("content_block_stop", index=i))
        reason = anthropic.stop_reason(event["finish"], event.get("stop_sequence"), calls)
        await self._raw(anthropic.event("message_delta", delta={"stop_reason": reason, "stop_sequence": event.get("stop_sequence")},
                                        usage={"output_tokens": event["completion_tokens"]}))
        await self._raw(anthropic.event("message_stop"))
        await self.send(h11.EndOfMessage())

    async def _raw(self, data: bytes):
        await self.send(h11.Data(data=data))

    async def _sse(self, body: dict):
        await self.send(h11.Data(data=b"data: " + json.dumps(body).encode() + b"\n\n"))


async def serve(app: App, host: str, port: int, ready=None):
    """Run until cancelled; `ready(server)` is called once the socket listens."""

    async def client(reader, writer):
        try:
            await Connection(app, reader, writer).serve()
        except (ConnectionError, asyncio.TimeoutError):
            pass

    server = await asyncio.start_server(client, host, port, limit=1 << 20)
    if ready is not None:
        ready(server)
    async with server:
        await server.serve_forever()
