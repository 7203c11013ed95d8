"""A hostile client against optiq serve: bodies no server can serve get a 4xx
JSON error naming the field (never a 500), slow and flooding clients are
dropped within bounds, bad chunking gets a response, and memory stays flat
over hundreds of requests."""

import json
import socket
import time

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

pytest.importorskip("openai")

from servers import post, raw, start  # noqa: E402

from optiq.http.openai import ApiError, decode_body, parse_request  # noqa: E402
from optiq.http.server import Defaults  # noqa: E402

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def server(tiny_llama):
    running = start(model=str(tiny_llama), max_context=256, timeout=1.0)
    yield running
    running.stop()


def alive(server):
    return raw(server.port, HEALTH).startswith(b"HTTP/1.1 200")


def error_of(status, data):
    body = json.loads(data)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return status, body["error"]


def send_text(port, path, text):
    """A body written by hand: JSON that json.dumps would not produce (surrogate escapes, huge numbers)."""
    return post(port, path, text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages[0].content"),
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud83d"], "max_tokens": 2}', "stop"),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800", "max_tokens": 2}', "model"),
    ("/v1/completions", '{"prompt": "x", "seed": -1, "max_tokens": 2}', "seed"),
    ("/v1/completions", '{"prompt": "x", "seed": 18446744073709551616, "max_tokens": 2}', "seed"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 0, "max_completion_tokens": 3}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": true, "max_completion_tokens": 3}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": "8", "max_completion_tokens": 3}', "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e400, "max_tokens": 2}', "temperature"),
])
def test_unservable_fields_are_400_naming_the_field(server, path, body, param):
    status, error = error_of(*send_text(server.port, path, body))
    assert status == 400 and error["param"] == param, error
    assert alive(server)


@pytest.mark.parametrize("body", [
    '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}",  # past Python's 4300-digit int parsing limit
    '{"prompt": "x", "temperature": NaN}',
    '{"prompt": "x", "top_p": Infinity}',
    '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}",  # past the recursion limit
    '{"prompt": "x"',
    b"\xff\xfe not utf-8",
])
def test_bodies_that_are_not_strict_json_are_400_invalid_json(server, body):
    status, error = error_of(*send_text(server.port, "/v1/completions", body))
    assert status == 400 and error["code"] == "invalid_json"
    assert alive(server)


def test_a_huge_seed_within_range_and_a_huge_top_k_are_served(server):
    status, data = post(server.port, "/v1/completions", {"prompt": "x", "seed": 2**64 - 1, "top_k": 10**30, "temperature": 1, "max_tokens": 2})
    assert status == 200 and json.loads(data)["choices"]


def test_a_chat_template_that_refuses_the_messages_is_a_400(server, monkeypatch):
    def refuses(*args, **kwargs):
        raise ValueError("Conversation roles must alternate user/assistant")

    monkeypatch.setattr(server.app.tokenizer, "apply_chat_template", refuses)
    status, error = error_of(*post(server.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}))
    assert status == 400 and error["param"] == "messages" and "alternate" in error["message"]


def dropped_after(port, prefix: bytes, slow: bytes, every: float = 0.1, limit: float = 15.0):
    """Seconds until the server drops a client that sends `prefix`, then one
    byte of `slow` every `every` s (any reply or a close counts); None if it
    is still open when `slow` runs out or `limit` passes."""
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(prefix)
        s.settimeout(every)
        for b in slow:
            try:
                s.sendall(bytes([b]))
                s.recv(65536)  # b"" (closed) or an error response: either way, dropped
                return time.time() - t0
            except socket.timeout:
                pass
            except OSError:  # reset
                return time.time() - t0
            if time.time() - t0 > limit:
                break
    return None


def test_slow_loris_headers_and_bodies_are_dropped_at_the_deadline(server):
    """Each byte arrives well inside the 1 s idle timeout, so only a deadline
    on the whole header block (and on the whole body) can end these: 20 s of
    trickling each, dropped after about one."""
    seconds = dropped_after(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200 + b"\r\n\r\n")
    assert seconds is not None and seconds < 5, seconds
    body = b'{"prompt": "' + b"x" * 200 + b'"}'
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    seconds = dropped_after(server.port, head, body)
    assert seconds is not None and seconds < 5, seconds
    assert alive(server)


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_bytes_sent_ahead_while_generating_are_bounded(server, monkeypatch):
    """A client that floods its connection while its request is in flight:
    at most one more request's worth is kept, the rest is read and dropped
    (so a hang-up is still seen), and the process does not grow by the flood."""
    monkeypatch.setattr(server.app.engine, "submit", lambda ticket: None)  # the request stays in flight
    body = json.dumps({"prompt": "The quick", "max_tokens": 40, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    before = rss()
    junk, sent = b"J" * (1 << 20), 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        for _ in range(64):  # 64 MiB, far past the 1 MiB body cap
            s.sendall(junk)
            sent += len(junk)
        time.sleep(0.5)
        grown = rss() - before
    assert sent == 64 << 20
    assert grown < 16 << 20, f"{grown / 2**20:.1f} MiB kept of a 64 MiB flood"
    assert alive(server)


def test_a_bad_chunk_size_gets_a_400(server):
    reply = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    _, error = error_of(400, reply.split(b"\r\n\r\n", 1)[1])
    assert alive(server)


def test_bearer_is_case_insensitive_and_401_says_how_to_authenticate(server):
    server.app.api_key = "sekret"
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            reply = raw(server.port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {scheme} sekret\r\nConnection: close\r\n\r\n".encode())
            assert reply.startswith(b"HTTP/1.1 200"), (scheme, reply[:100])
        reply = raw(server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401") and b'www-authenticate: bearer realm="optiq"' in reply.lower()
    finally:
        server.app.api_key = None


# -- properties: any JSON at all, to the validator and to the live server --------

hostile_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=12)
hostile_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | hostile_text
                   | st.integers(10**300, 10**301))
hostile = st.recursive(hostile_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4), max_leaves=12)
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "stream",
          "logprobs", "top_logprobs", "n", "seed", "model", "stream_options"]
bodies = st.dictionaries(st.sampled_from(FIELDS) | hostile_text, hostile, max_size=6) | hostile


def encode(body) -> bytes:
    """JSON text of any Python value, lone surrogates and NaN included (as a hostile client sends them)."""
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


@settings(max_examples=300, deadline=None)
@given(body=bodies, kind=st.sampled_from(["chat", "completion"]))
def test_the_validator_is_total(body, kind):
    """Every body either parses or raises ApiError with a 4xx: nothing else escapes."""
    try:
        parsed = decode_body(encode(body))
        parse_request(kind, parsed, Defaults("m"))
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), depth=st.sampled_from([0, 0, 0, 3000]))
def test_a_live_server_answers_any_json_with_2xx_or_a_4xx_error(server, body, path, depth):
    if isinstance(body, dict):  # keep generation short where a body happens to be valid
        body = {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens", "stream")}
        body["max_tokens"] = 2
    status, data = post(server.port, path, nested(depth) if depth else encode(body))
    assert 200 <= status < 300 or 400 <= status < 500, (status, data[:300])
    reply = json.loads(data)
    assert ("choices" in reply) if status < 300 else set(reply["error"]) == {"message", "type", "param", "code"}
    assert alive(server)


# -- memory ------------------------------------------------------------------------------


def test_memory_stays_under_the_prompt_cache_cap_over_hundreds_of_requests(tmp_path_factory):
    """MLX's active memory after each wave of requests stays under the model,
    the prompt-cache cap and a fixed margin: entries hold what they are
    counted at, and nothing else accumulates."""
    from conftest import build_model

    folder = build_model(tmp_path_factory.mktemp("mem") / "model", "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    cap = 2 << 20
    base = mx.get_active_memory()  # what the other tests hold
    running = start(model=str(folder), prompt_cache_bytes=cap, max_context=512)
    try:
        model_bytes = sum(v.nbytes for _, v in tree_flatten(running.app.engine.model.parameters()))
        peaks = []
        for wave in range(6):
            for i in range(50):
                messages = [{"role": "user", "content": f"wave {wave} question {i}: tell me about item {i * 7}"}]
                running.client.chat.completions.create(model="", messages=messages, max_tokens=6)
            peaks.append(mx.get_active_memory() - base)
        margin = 4 << 20  # the engine's live batch and the last step's activations
        assert max(peaks) < model_bytes + cap + margin, [p / 2**20 for p in peaks]
        assert running.app.engine.prompt_cache.nbytes <= cap
    finally:
        running.stop()
