"""optiq serve on a tiny random llama: the real `openai` client for the API,
raw sockets for malformed HTTP, Hypothesis for random bodies."""

import json
import socket
import threading
import time

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")

from servers import post, raw, start  # noqa: E402


def write_mlx_adapter(model_folder, out, seed=1, rank=4, scale=2.0):
    """A LoRA adapter in mlx-lm's own format, written with mlx-lm's own tools."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(model_folder))
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}
    model.freeze()
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(seed)
    weights = {k: (mx.random.normal(v.shape) * 0.3 if k.endswith("lora_b") else v) for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}))
    return out, weights


def write_peft_copy(weights, out, scale=2.0):
    """The same adapter in PEFT's layout: lora_A (r, in), lora_B (out, r), alpha = scale * r."""
    tensors = {}
    for k, v in weights.items():
        path, leaf = k.rsplit(".", 1)
        name = "lora_A" if leaf == "lora_a" else "lora_B"
        tensors[f"base_model.model.{path}.{name}.weight"] = v.T
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), tensors)
    rank = next(iter(weights.values())).shape[-1]
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": scale * rank, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny",
    }))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    mlx_folder, weights = write_mlx_adapter(tiny_llama, root / "mlx")
    return mlx_folder, write_peft_copy(weights, root / "peft")


@pytest.fixture(scope="module")
def server(tiny_llama, adapters):
    running = start(model=str(tiny_llama), adapter=[f"mlx={adapters[0]}", f"peft={adapters[1]}"], max_context=256)
    yield running
    running.stop()


def reference_greedy(folder, prompt_tokens, n, adapter=None):
    """mlx-lm's own generate loop (fp32, greedy) on the same prompt."""
    import mlx_lm
    from mlx_lm.generate import generate_step

    from optiq.source import to_fp32

    model, tokenizer = mlx_lm.load(str(folder), adapter_path=str(adapter) if adapter else None)
    to_fp32(model)
    out = []
    for token, _ in generate_step(mx.array(prompt_tokens), model, max_tokens=n):
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return tokenizer.decode(out)


def test_completion_matches_mlx_lm_greedy_generation(server, tiny_llama):
    prompt = "The quick brown fox"
    r = server.client.completions.create(model=server.app.defaults.model_name, prompt=prompt, max_tokens=12, temperature=0)
    tokens = server.app.tokenizer.encode(prompt)
    assert r.choices[0].text == reference_greedy(tiny_llama, tokens, 12)
    assert r.usage.prompt_tokens == len(tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_tokenizer_template_and_streams_the_same_text(server):
    messages = [{"role": "user", "content": "what is 2 + 3?"}]
    whole = server.client.chat.completions.create(model=server.app.defaults.model_name, messages=messages, max_tokens=16)
    pieces, usage, finish = [], None, None
    for event in server.client.chat.completions.create(
        model=server.app.defaults.model_name, messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
    ):
        if event.usage is not None:
            usage = event.usage
        for c in event.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    from optiq.http.server import chat_tokens

    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(chat_tokens(server.app.tokenizer, messages))
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_cut_the_text_and_say_stop(server):
    full = server.client.completions.create(model="", prompt="A stitch in time", max_tokens=24).choices[0].text
    stop = full[6:9]
    assert stop, f"too short a completion to test stop: {full!r}"
    cut = server.client.completions.create(model="", prompt="A stitch in time", max_tokens=24, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in server.client.completions.create(model="", prompt="A stitch in time", max_tokens=24, stop=stop, stream=True)
    )
    assert streamed == cut.choices[0].text


def test_logprobs_are_consistent(server):
    r = server.client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "hello"}], max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and len(content) <= r.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy takes the top token


def test_models_lists_adapters_and_each_adapter_matches_mlx_lm(server, tiny_llama, adapters):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [server.app.defaults.model_name, "mlx", "peft"]
    prompt = "Numbers like 12"
    tokens = server.app.tokenizer.encode(prompt)
    texts = {m: server.client.completions.create(model=m, prompt=prompt, max_tokens=10).choices[0].text for m in ids}
    assert texts["mlx"] == reference_greedy(tiny_llama, tokens, 10, adapter=adapters[0])
    assert texts["peft"] == texts["mlx"]  # the same weights in PEFT's layout
    assert texts["mlx"] != texts[ids[0]]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="no-such-adapter", prompt=prompt, max_tokens=2)


def test_concurrent_requests_with_different_adapters_match_their_solo_runs(server):
    prompts = ["The quick", "A stitch", "Numbers like", "Question: what"]
    models = ["", "mlx", "peft", ""]
    solo = [server.client.completions.create(model=m, prompt=p, max_tokens=10).choices[0].text for m, p in zip(models, prompts)]
    results = [None] * 4

    def one(i):
        results[i] = server.client.completions.create(model=models[i], prompt=prompts[i], max_tokens=10).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert results == solo


def test_a_continued_conversation_reuses_the_cached_prefix(server):
    from optiq.http.server import chat_tokens

    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]
    first = server.client.chat.completions.create(model="", messages=messages, max_tokens=8)
    tokens1 = chat_tokens(server.app.tokenizer, messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "again"}]
    second = server.client.chat.completions.create(model="", messages=messages, max_tokens=8)
    tokens2 = chat_tokens(server.app.tokenizer, messages)
    shared = next(i for i, (a, b) in enumerate(zip(tokens1 + [-1], tokens2)) if a != b)
    assert shared > 20  # the template repeats the first turn verbatim
    assert second.usage.prompt_tokens_details.cached_tokens >= shared - 1


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "logprobs": 9}, "logprobs"),
        ({"prompt": "x " * 400}, "prompt"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, body, param):
    status, data = post(server.port, "/v1/completions", body)
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == param and error["message"]


def test_bad_http_gets_4xx_and_the_server_lives(server):
    assert raw(server.port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    status, data = post(server.port, "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(data)["error"]["code"] == "invalid_json"
    status, _ = post(server.port, "/v1/nothing", {})
    assert status == 404
    assert raw(server.port, b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 405")
    huge = b"x" * (server.app.max_body_bytes + 1)
    status, data = post(server.port, "/v1/completions", huge)
    assert status == 413
    status, data = post(server.port, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400
    assert json.loads(raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").split(b"\r\n\r\n")[1])["status"] == "ok"


def test_keep_alive_serves_two_requests_on_one_connection(server):
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(req + req.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2


def test_api_key_guards_everything_but_health(server):
    server.app.api_key = "sekret"
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client.models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data
        assert raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        server.app.api_key = None


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server):
    body = json.dumps({"prompt": "The quick", "max_tokens": 200, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    deadline = time.time() + 10
    while server.app.engine.tickets and time.time() < deadline:
        time.sleep(0.05)
    assert not server.app.engine.tickets


def test_idle_and_slow_connections_time_out(server):
    server.app.timeout = 0.5
    try:
        t0 = time.time()
        reply = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", read_timeout=10)
        assert reply == b"" and time.time() - t0 < 5  # closed by the server, not by our read timeout
    finally:
        server.app.timeout = 60.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
fields = st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream",
                          "logprobs", "top_logprobs", "n", "seed", "model", "stream_options", "max_completion_tokens"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(fields, json_values, max_size=5) | json_values, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_bodies_get_well_formed_2xx_or_4xx(server, body, path):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4) or 0
    body = body if not isinstance(body, dict) else {k: v for k, v in body.items() if k not in ("max_completion_tokens",)}
    if isinstance(body, dict) and body.get("stream") is True:
        body["stream"] = False
    if isinstance(body, dict):
        body.setdefault("max_tokens", 2)
    status, data = post(server.port, path, body)
    assert 200 <= status < 300 or 400 <= status < 500, (status, data)
    reply = json.loads(data)
    assert ("choices" in reply) if status < 300 else set(reply["error"]) == {"message", "type", "param", "code"}
    assert raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


@pytest.fixture(scope="module")
def kv_server(tmp_path_factory):
    from conftest import build_model

    folder = build_model(tmp_path_factory.mktemp("kv") / "model", "llama", hidden_size=128, intermediate_size=256)
    running = start(model=str(folder), kv_bits=8, kv_group_size=32)
    yield running
    running.stop()


def test_quantized_kv_serving_batches_and_matches_solo_runs(kv_server):
    prompts = ["The quick", "A stitch", "Numbers like"]
    solo = [kv_server.client.completions.create(model="", prompt=p, max_tokens=8).choices[0].text for p in prompts]
    results = [None] * 3

    def one(i):
        results[i] = kv_server.client.completions.create(model="", prompt=prompts[i], max_tokens=8).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert results == solo
    from optiq.kv import PlannedKVCache

    assert all(isinstance(c, PlannedKVCache) for c in kv_server.app.engine.make_cache())
    assert kv_server.app.engine.batched  # one BatchGenerator: the planned caches merge (BatchPlannedKVCache)


def test_turbo_kv_serving(tmp_path_factory):
    from conftest import build_model
    from optiq.kv.turbo_cache import TurboQuantKVCache

    folder = build_model(tmp_path_factory.mktemp("turbo-serve") / "model", "llama", hidden_size=128, intermediate_size=256)
    running = start(model=str(folder), kv_bits=3, kv_mode="turbo")
    try:
        a = running.client.completions.create(model="", prompt="The quick", max_tokens=6)
        b = running.client.completions.create(model="", prompt="The quick", max_tokens=6)
        assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens >= 1
        assert all(isinstance(c, TurboQuantKVCache) for c in running.app.engine.make_cache())
        assert not running.app.engine.batched  # TurboQuant caches do not merge: interleaved
    finally:
        running.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-bits", "7"], "--kv-bits 7"),
        (["--kv-bits", "8", "--kv-mode", "turbo"], "--kv-bits 8 with --kv-mode turbo"),
        (["--kv-bits", "4", "--kv-group-size", "32"], "the KV plan does not fit"),
        (["--kv-config", "/no/such/kv_config.json"], "cannot read KV config"),
        (["--adapter", "/no/such/adapter"], "neither a folder nor a Hugging Face repo id"),
        (["--adapter", "a=/x", "--adapter", "a=/y"], "used twice"),
    ],
)
def test_serve_bad_options_exit_2_with_a_message(tiny_llama, args, message, capsys):
    from optiq.commands.serve import main

    with pytest.raises(SystemExit) as exit:
        main(["--model", str(tiny_llama), "--port", "0", *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_adapter_repo_ids_download_only_configs_and_safetensors(adapters, monkeypatch):
    """The Hub path, offline: snapshot_download is asked for json and safetensors only."""
    import huggingface_hub

    from optiq.errors import OptiqError
    from optiq.lora.adapters import read_adapter, resolve_adapter

    calls = []

    def fake(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(adapters[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = resolve_adapter("someone/some-adapter")
    assert calls == [("someone/some-adapter", ["*.json", "*.safetensors"])]
    assert read_adapter(folder).modules

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OptiqError, match="cannot download adapter"):
        resolve_adapter("someone/other-adapter")
