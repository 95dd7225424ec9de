"""Tool calls (`cospec_local.tools`): the real Qwen2.5, Llama 3.1 and Hermes templates render the
tools, a required or named tool_choice constrains the reply to a call (random-weight models only
produce one because of the grammar), and calls are read back into OpenAI's `tool_calls`."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from cospec_local import load_pair
from cospec_local.chat import ChatTemplate
from cospec_local.tools import call_grammar, parse_tool_calls, parse_tools
from families import FAMILIES, build_family, models_dir
from server_load import ServerProcess, client

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TEMPLATES = {"Qwen-Qwen2.5-7B-Instruct.jinja": "hermes", "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
             "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "hermes",
             "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "hermes"}


@pytest.mark.parametrize("name, fmt", TEMPLATES.items())
def test_the_real_templates_render_tools_and_earlier_calls(name, fmt):
    template = ChatTemplate.for_model((models_dir() / "templates" / name).read_text(encoding="utf-8"))
    assert template.tool_format == fmt
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "21 C"}]
    out = template.render(messages, True, tools=TOOLS)
    assert "get_weather" in out and "21 C" in out and '"Paris"' in out


def test_calls_are_read_out_of_replies():
    content, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "hermes")
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2} and calls[0]["id"].startswith("call_")
    content, calls = parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 3, "b": 4}}', "llama3")
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"a": 3, "b": 4}
    text = "<tool_call>\n{broken\n</tool_call> and plain text"
    assert parse_tool_calls(text, "hermes") == (text, [])
    assert parse_tool_calls("The answer is 4.", "llama3") == ("The answer is 4.", [])
    with pytest.raises(ValueError, match="tools\\[0\\].function.name"):
        parse_tools([{"type": "function", "function": {"name": "bad name!"}}])
    with pytest.raises(ValueError, match="parameters"):
        parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}])
    with pytest.raises(ValueError, match="not among the tools"):
        call_grammar(parse_tools(TOOLS), "hermes", "nope")


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    return {name: build_family(FAMILIES[name], d / name).target for name in ("qwen2.5", "llama3")}


@pytest.mark.parametrize("family, fmt", [("qwen2.5", "hermes"), ("llama3", "llama3")])
@pytest.mark.parametrize("mode", ["target", "spec"])
def test_a_required_call_grammar_makes_random_models_call_a_tool(family_models, family, fmt, mode):
    """Under the call grammar, every reply (greedy and sampled) is one call of an offered tool whose
    arguments validate against its schema."""
    tools = parse_tools(TOOLS)
    with load_pair(None, family_models[family], n_ctx=1024, n_threads=1) as pair:
        chat = pair.chat()
        prompt = chat.template.render([{"role": "user", "content": "Weather in Paris?"}], True, tools=TOOLS)
        for name in (None, "add"):
            for seed in range(3):
                out = pair.generate(prompt, mode=mode, temperature=1.0 if seed else 0.0, seed=seed, max_tokens=80,
                                    grammar=call_grammar(tools, fmt, name))
                assert out.finish_reason == "stop", out.text
                content, calls = parse_tool_calls(out.text, fmt)
                assert len(calls) == 1 and content == "", out.text
                called = calls[0]["function"]["name"]
                assert name is None or called == name
                jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SCHEMAS[called])


@pytest.fixture(scope="module")
def qwen_server(family_models):
    with ServerProcess("--target", family_models["qwen2.5"], "--ctx-size", 1024, "--threads", 1) as server:
        yield server


@pytest.mark.parametrize("stream", [False, True])
def test_the_openai_client_gets_tool_calls(qwen_server, stream):
    """tool_choice required and named, streamed and not: tool_calls with valid arguments and
    finish_reason "tool_calls"; the call and its result can be sent back for the next turn."""
    c = client(qwen_server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        params = dict(model="x", messages=messages, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0)
        if stream:
            chunks = list(c.chat.completions.create(**params, stream=True))
            deltas = [ch.choices[0] for ch in chunks if ch.choices]
            calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
            finish = deltas[-1].finish_reason
            name, arguments, call_id = calls[0].function.name, calls[0].function.arguments, calls[0].id
        else:
            reply = c.chat.completions.create(**params)
            calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
            name, arguments, call_id = calls[0].function.name, calls[0].function.arguments, calls[0].id
        assert finish == "tool_calls" and len(calls) == 1
        assert choice == "required" or name == "get_weather"
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    follow_up = messages + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function",
                                                               "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "21 C"}]
    reply = c.chat.completions.create(model="x", messages=follow_up, tools=TOOLS, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tool_requests_are_400s(qwen_server):
    c = client(qwen_server)
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "not among"),
        (dict(tool_choice="required"), "tool_choice", "needs tools"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]), "tools", "parameters"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice", "cannot be combined"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "must be none, auto"),
    ]
    for extra, param, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="x", messages=messages, max_tokens=4, **extra)
        body = err.value.body
        assert body["param"] == param and words in body["message"], body
