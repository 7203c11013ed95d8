"""The serving API past OpenAI chat: Anthropic's Messages API through the real
`anthropic` client, structured output (replies validated with `jsonschema`),
tool calling through a chat template that has tools, and speculative
decoding with a draft model. All on tiny random llamas."""

import json
import re
import shutil
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from conftest import build_model  # noqa: E402
from servers import post, start  # noqa: E402

# A Hermes/Qwen-style template: tools listed in the system turn, calls as
# JSON in <tool_call> tags (mlx-lm picks its json_tools parser for it).
TOOLS_TEMPLATE = (
    "{%- if tools %}<bos>system: You may call these tools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<bos>assistant: {{ m.content or '' }}"
    "{%- for tool_call in m.tool_calls %}{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "<tool_call>{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}</tool_call>{%- endfor %}\n"
    "{%- elif m.role == 'tool' %}<bos>tool: {{ m.content }}\n"
    "{%- else %}<bos>{{ m.role }}: {{ m.content }}\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}assistant: {% endif %}"
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                           "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                                            "required": ["zone"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tools_model(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(tools_model):
    running = start(model=str(tools_model), max_context=2048)
    running.anthropic = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=60)
    yield running
    running.stop()


def user(text):
    return [{"role": "user", "content": text}]


# ---- Anthropic Messages ------------------------------------------------------

def test_messages_reply_equals_the_chat_completion_of_the_same_turns(server):
    m = server.anthropic.messages.create(model="default", max_tokens=16, system="be brief", messages=user("what is 2 + 3?"),
                                       extra_body={"temperature": 0, "top_k": 0})  # sampling fields older clients still send
    chat = server.client.chat.completions.create(model="", max_tokens=16, temperature=0,
                                                 messages=[{"role": "system", "content": "be brief"}, *user("what is 2 + 3?")])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == chat.choices[0].message.content
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[chat.choices[0].finish_reason]
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == chat.usage.prompt_tokens
    assert m.usage.output_tokens == chat.usage.completion_tokens
    counted = server.anthropic.messages.count_tokens(model="default", system="be brief", messages=user("what is 2 + 3?"))
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_messages_stream_sends_anthropics_event_sequence(server):
    whole = server.anthropic.messages.create(model="default", max_tokens=20, messages=user("tell me a story"))
    with server.anthropic.messages.stream(model="default", max_tokens=20, messages=user("tell me a story")) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_cut_the_text_and_are_named(server):
    full = server.anthropic.messages.create(model="default", max_tokens=24, messages=user("A stitch in time")).content[0].text
    stop = full[5:8]
    assert stop.strip(), f"too short a reply to test stop_sequences: {full!r}"
    m = server.anthropic.messages.create(model="default", max_tokens=24, messages=user("A stitch in time"), stop_sequences=["\x00never", stop])
    assert m.content[0].text == full[: full.find(stop)]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)


def test_messages_errors_are_anthropic_shaped_4xx(server):
    with pytest.raises(anthropic.BadRequestError) as err:
        server.anthropic.messages.create(model="default", max_tokens=0, messages=user("hi"))
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    for body, field in [({"messages": user("hi")}, "max_tokens"), ({"max_tokens": 5, "messages": []}, "messages"),
                        ({"max_tokens": 5, "messages": user("hi"), "temperature": 1.5}, "temperature"),
                        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0"),
                        ({"max_tokens": 5, "messages": user("hi"), "output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}},
                         "output_config.format")]:
        status, data = post(server.port, "/v1/messages", body)
        reply = json.loads(data)
        assert status == 400 and reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error", reply
        assert field in reply["error"]["message"] or field.split(".")[0] in reply["error"]["message"], reply
    status, data = post(server.port, "/v1/messages", b"{not json")
    assert status == 400 and json.loads(data)["type"] == "error"


def test_x_api_key_and_bearer_both_authorize(server):
    server.app.api_key = "sekret"
    try:
        with pytest.raises(anthropic.AuthenticationError) as err:
            server.anthropic.messages.create(model="default", max_tokens=4, messages=user("hi"))
        assert err.value.body["error"]["type"] == "authentication_error"
        good = anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0)
        assert good.messages.create(model="default", max_tokens=4, messages=user("hi")).content
        bearer = anthropic.Anthropic(base_url=server.url, auth_token="sekret", max_retries=0)
        assert bearer.messages.create(model="default", max_tokens=4, messages=user("hi")).content
        assert openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0).models.list().data
    finally:
        server.app.api_key = None


# ---- structured output ---------------------------------------------------------

def test_json_schema_replies_validate(server):
    r = server.client.chat.completions.create(
        model="", messages=user("answer in JSON"), max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    obj = server.client.chat.completions.create(model="", messages=user("any JSON"), max_tokens=48, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # an open-ended object may run out of tokens
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    m = server.anthropic.messages.create(model="default", max_tokens=64, messages=user("JSON please"),
                                         output_config={"format": {"type": "json_schema", "schema": SCHEMA}})
    jsonschema.validate(json.loads(m.content[0].text), SCHEMA)


def test_regex_choice_and_grammar_constrain_the_text(server):
    pattern = r"(red|green|blue)-[0-9]{3}"
    r = server.client.completions.create(model="", prompt="a code:", max_tokens=16, extra_body={"response_format": {"type": "regex", "regex": pattern}})
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
    r = server.client.chat.completions.create(model="", messages=user("pick"), max_tokens=16,
                                              extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma"]}})
    assert r.choices[0].message.content in ("alpha", "beta gamma")
    r = server.client.completions.create(model="", prompt="x", max_tokens=16, extra_body={"structured_outputs": {"grammar": 'start: "A" ("B" | "C")+ "!"'}})
    assert re.fullmatch(r"A[BC]+!", r.choices[0].text), r.choices[0].text


def test_constrained_and_free_requests_share_a_batch(server):
    free_solo = server.client.completions.create(model="", prompt="Once upon a time", max_tokens=24).choices[0].text
    results = {}

    def constrained(i):
        results[i] = server.client.chat.completions.create(
            model="", messages=user(f"JSON {i}"), max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}).choices[0].message.content

    def free():
        results["free"] = server.client.completions.create(model="", prompt="Once upon a time", max_tokens=24).choices[0].text

    threads = [threading.Thread(target=constrained, args=(i,)) for i in range(3)] + [threading.Thread(target=free)]
    steps = server.app.engine.stats["steps"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["free"] == free_solo
    for i in range(3):
        jsonschema.validate(json.loads(results[i]), SCHEMA)
    # four requests of up to 24-64 tokens, decoded together: fewer steps than one after another
    assert server.app.engine.stats["steps"] - steps < 24 + 3 * 64


def test_bad_formats_are_400_naming_the_field(server):
    for extra, param in [({"response_format": {"type": "regex", "regex": "(["}}, "response_format"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "response_format"),
                         ({"response_format": {"type": "xml"}}, "response_format.type"),
                         ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs")]:
        status, data = post(server.port, "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 4, **extra})
        assert status == 400 and json.loads(data)["error"]["param"] == param, data


# ---- tools ------------------------------------------------------------------

def test_required_tool_call_is_parsed_and_valid(server):
    for choice, names in [("required", {"get_weather", "get_time"}), ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
        r = server.client.chat.completions.create(model="", messages=user("weather in Oslo?"), max_tokens=160, tools=[WEATHER, TIME], tool_choice=choice)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls, r
        assert calls[0].function.name in names and calls[0].id.startswith("call_")
        schema = {"get_weather": WEATHER, "get_time": TIME}[calls[0].function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(calls[0].function.arguments), schema)
    streamed = {}
    for event in server.client.chat.completions.create(model="", messages=user("weather in Oslo?"), max_tokens=160, tools=[WEATHER, TIME],
                                                       tool_choice="required", stream=True):
        for c in event.choices:
            for tc in c.delta.tool_calls or []:
                streamed = {"name": tc.function.name, "arguments": tc.function.arguments}
            streamed["finish"] = c.finish_reason or streamed.get("finish")
    assert streamed["name"] == r.choices[0].message.tool_calls[0].function.name or streamed["name"] in names | {"get_weather"}
    assert streamed["finish"] == "tool_calls"


def test_anthropic_tool_use_blocks(server):
    tools = [{"name": "get_weather", "description": "The weather", "input_schema": WEATHER["function"]["parameters"]}]
    m = server.anthropic.messages.create(model="default", max_tokens=160, messages=user("weather?"), tools=tools, tool_choice={"type": "any"})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, tools[0]["input_schema"])
    with server.anthropic.messages.stream(model="default", max_tokens=160, messages=user("weather?"), tools=tools, tool_choice={"type": "tool", "name": "get_weather"}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    assert final.content[-1].input == uses[0].input  # greedy: the same call streamed or not
    # the call and its result go back through the template
    turns = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": uses[0].input}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny, 21 C"}]}]
    from optiq.http import anthropic as api

    prompt = server.app.tokenizer.decode(server.app.prompt_tokens(api.parse_messages({"max_tokens": 4, "messages": turns, "tools": tools}, server.app.defaults)))
    assert "tool: sunny, 21 C" in prompt and '"name": "get_weather"' in prompt and "You may call these tools" in prompt


def test_openai_tool_messages_render_through_the_template(server):
    turns = [*user("time?"), {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                                      "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    r = server.client.chat.completions.create(model="", messages=turns, max_tokens=4, tools=[TIME])
    from optiq.http.server import chat_tokens

    rendered = [turns[0], {**turns[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
                turns[2]]
    tokens = chat_tokens(server.app.tokenizer, rendered, [TIME])
    assert r.usage.prompt_tokens == len(tokens)  # arguments sent as a JSON string reach the template as an object
    text = server.app.tokenizer.decode(tokens)
    assert '{"name": "get_time", "arguments": {"zone": "UTC"}}' in text and "tool: 12:00" in text


def test_tool_stream_holds_calls_and_passes_text():
    from mlx_lm.tool_parsers import json_tools
    from types import SimpleNamespace

    from optiq.http.tools import ToolStream

    tok = SimpleNamespace(tool_call_start="<tool_call>", tool_call_end="</tool_call>", tool_parser=json_tools.parse_tool_call)
    split = ToolStream(tok, [WEATHER])
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call> done <tool_call>{bad'
    sent = "".join(split.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    assert sent == "Let me check.  done "
    rest, calls = split.finish()
    assert rest == "<tool_call>{bad"  # a call the parser refuses stays text
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo", "days": 2})]
    assert ToolStream(tok, []).feed("<tool_call>x") == "<tool_call>x"  # no tools offered: all text


def test_required_tool_call_without_a_json_tool_format_is_400(tiny_llama):
    running = start(model=str(tiny_llama), max_context=256)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            running.client.chat.completions.create(model="", messages=user("hi"), max_tokens=4, tools=[TIME], tool_choice="required")
        assert err.value.body["param"] == "tool_choice"
        for choice in ["sometimes", {"type": "function", "function": {"name": "nope"}}]:
            status, _ = post(running.port, "/v1/chat/completions", {"messages": user("hi"), "tools": [TIME], "tool_choice": choice})
            assert status == 400
    finally:
        running.stop()


# ---- speculative decoding ------------------------------------------------------

def test_speculative_decoding_keeps_greedy_output_and_reports_acceptance(tiny_llama, tmp_path_factory):
    plain = start(model=str(tiny_llama), max_context=256)
    try:
        prompts = ["Once upon a time", "The weather today", "Mixed precision"]
        expected = [plain.client.completions.create(model="", prompt=p, max_tokens=20).choices[0].text for p in prompts]
    finally:
        plain.stop()
    other = build_model(tmp_path_factory.mktemp("draft") / "model", "llama", seed=7)
    for draft, full_acceptance in [(tiny_llama, True), (other, False)]:
        running = start(model=str(tiny_llama), max_context=256, draft_model=str(draft), num_draft_tokens=3)
        try:
            got = {}

            def one(i):
                got[i] = running.client.completions.create(model="", prompt=prompts[i], max_tokens=20)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert [got[i].choices[0].text for i in range(3)] == expected  # the model verifies every token
            details = [got[i].usage.completion_tokens_details for i in range(3)]
            accepted = sum(d.accepted_prediction_tokens for d in details)
            rejected = sum(d.rejected_prediction_tokens for d in details)
            stats = running.app.engine.stats
            assert (stats["draft_tokens_accepted"], stats["draft_tokens_proposed"]) == (accepted, accepted + rejected)
            if full_acceptance:  # the model as its own draft: every proposal is accepted
                assert rejected == 0 and accepted > 0
            else:
                assert rejected > 0
            # a constrained request still works beside a draft model (it takes the batched path)
            r = running.client.chat.completions.create(model="", messages=user("json"), max_tokens=64,
                                                       response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        finally:
            running.stop()


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama, tmp_path_factory):
    from optiq.commands.serve import ServeOptions, build_app
    from optiq.errors import OptiqError

    other = build_model(tmp_path_factory.mktemp("other_vocab") / "model", "llama")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": len(tok["model"]["vocab"]) + 10, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(OptiqError, match="vocabulary"):
        build_app(ServeOptions(model=str(tiny_llama), draft_model=str(other), port=0))
    with pytest.raises(OptiqError, match="num-draft-tokens"):
        build_app(ServeOptions(model=str(tiny_llama), draft_model=str(tiny_llama), num_draft_tokens=0, port=0))


# ---- random bodies on the new fields -------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "name", "schema", "function", "regex", "json",
                                                                                 "choice", "grammar", "input_schema", "parameters", "format",
                                                                                 "content", "role", "text", "x"]), inner, max_size=3),
    max_leaves=10,
)
near_valid = st.sampled_from([
    {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": "a"}}},
    {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, {"type": "regex", "regex": "a{99999999}"},
    {"type": "json_schema", "schema": {"type": "object"}}, [{"type": "function", "function": {"name": ["x"]}}],
    {"type": "tool", "name": ["get_time"]}, {"type": "function", "function": {"name": {"a": 1}}},
    [{"name": "t", "input_schema": []}], {"format": {"type": "json_schema", "schema": {"enum": []}}},
    [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": [{"type": "image"}]}]}],
    [{"role": "assistant", "content": [{"type": "tool_use", "name": "t", "input": []}]}],
    {"json": "{not json"}, {"type": "function", "function": {"name": ["get_time"]}}, {"type": "tool", "name": {"x": 1}},
    [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": None}]}],
    [WEATHER], [TIME], [{"name": "get_time", "input_schema": TIME["function"]["parameters"]}], "required", {"type": "any"},
])
api_fields = st.sampled_from(["tools", "tool_choice", "response_format", "structured_outputs", "system", "stop_sequences",
                              "output_config", "messages", "thinking", "metadata"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(api_fields, json_values | near_valid, max_size=4),
       path=st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"]))
def test_random_bodies_on_the_new_fields_get_2xx_or_4xx_in_their_apis_shape(server, body, path):
    body.setdefault("messages", user("hi"))
    body["max_tokens"] = 2
    status, data = post(server.port, path, body)
    assert 200 <= status < 300 or 400 <= status < 500, (status, data)
    reply = json.loads(data)
    if status >= 400:
        if path.startswith("/v1/messages"):
            assert reply["type"] == "error" and set(reply["error"]) == {"type", "message"}, reply
        else:
            assert set(reply["error"]) == {"message", "type", "param", "code"}, reply


def test_packed_mask_unpacks_to_the_allowed_tokens():
    import mlx.core as mx
    import numpy as np

    from optiq.http.grammar import apply_bitmask

    rng = np.random.default_rng(0)
    allowed = rng.random(100) < 0.3
    words = np.packbits(np.pad(allowed, (0, 28)), bitorder="little").view(np.uint32)
    logits = mx.array(rng.normal(size=(1, 100)).astype(np.float32))
    out = np.array(apply_bitmask(logits, mx.array(words)))
    assert np.array_equal(np.isfinite(out[0]), allowed)
    assert np.array_equal(out[0][allowed], np.array(logits)[0][allowed])
    wide = np.array(apply_bitmask(mx.zeros((1, 140)), mx.array(words)))  # logits past the mask's words: refused
    assert not np.isfinite(wide[0, 128:]).any()
