"""`cospec-local serve`, through the official `openai` client and raw HTTP, on a server the tests
start on a free loopback port (a subprocess, stopped with Ctrl-C as a user would)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import openai
import pytest

from cospec_local.chat import FALLBACK_STOP, ChatTemplate
from cospec_local.lab.testworld.tasks import problems
from server_load import FAMILY_MODELS, ROOT, ServerProcess, client, stream_chats, task_conversations

CTX = 512
PROMPTS = [problems("add", "eval", 1)[0].prompt, problems("count", "eval", 1)[0].prompt]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(*FAMILY_MODELS, "--ctx-size", CTX, "--parallel", 4) as s:
        yield s


def generate_cli(prompt: str, mode: str, max_tokens: int, stop=()) -> str:
    """What `cospec-local generate --temperature 0` prints for `prompt` (its JSON text)."""
    args = [sys.executable, "-m", "cli.main", "generate", prompt, *FAMILY_MODELS, "--ctx-size", str(CTX),
            "--threads", "1", "--mode", mode, "--temperature", "0", "--max-tokens", str(max_tokens), "--json"]
    for s in stop:
        args += ["--stop", s]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["text"]


# -- the openai client against `generate` ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["target", "spec", "cospec", "cos"])
def test_completions_equal_generate(server, mode):
    """Completions, streamed and not, at temperature 0: the text `cospec-local generate` prints for
    the same prompt and mode; usage counts the tokens."""
    c = client(server)
    prompt = PROMPTS[0]
    reference = generate_cli(prompt, mode, 48)
    full = c.completions.create(model="x", prompt=prompt, max_tokens=48, temperature=0, extra_body={"mode": mode})
    assert full.choices[0].text == reference
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(c.completions.create(model="x", prompt=prompt, max_tokens=48, temperature=0, stream=True, extra_body={"mode": mode}))
    assert "".join(ch.choices[0].text for ch in chunks) == reference
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.model_extra["cospec"]["mode"] == mode


@pytest.mark.parametrize("mode", ["spec", "target"])
def test_chat_completions_equal_generate_on_the_rendered_conversation(server, mode):
    """A chat completion is `generate` on the fallback transcript with its turn-marker stops."""
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    rendered = ChatTemplate.for_model(None).render(messages, True)
    reference = generate_cli(rendered, mode, 40, FALLBACK_STOP)
    full = c.chat.completions.create(model="x", messages=messages, max_tokens=40, temperature=0, extra_body={"mode": mode})
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == reference.strip()
    stream = c.chat.completions.create(model="x", messages=messages, max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"mode": mode})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reference.lstrip()
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert "User:" not in full.choices[0].message.content


def test_draft_source_and_draft_p_min_per_request(server):
    """Every GenerationConfig field can be set per request: spec with n-gram proposals (no draft
    model) and another draft_p_min gives target-only's text at temperature 0."""
    prompt = PROMPTS[0]
    status, target = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 32, "temperature": 0, "mode": "target"})
    assert status == 200, target
    for source in ("ngram", "ngram+model"):
        status, got = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 32, "temperature": 0, "mode": "spec",
                                                      "draft_source": source, "draft_p_min": 0.6})
        assert status == 200, got
        assert got["choices"][0]["text"] == target["choices"][0]["text"]
        assert got["cospec"]["mode"] == "spec"


def test_every_config_field_but_the_policy_file_is_a_request_field():
    """The request types are derived from GenerationConfig: nothing to keep in step by hand. The
    policy is a file the server loads: a client may not name one."""
    from dataclasses import fields

    from cospec_local.config import GenerationConfig
    from cospec_local.server.types import ChatRequest, CompletionRequest

    names = {f.name for f in fields(GenerationConfig)} - {"policy"}
    for request in (CompletionRequest, ChatRequest):
        assert names <= set(request.model_fields) and "policy" not in request.model_fields


def test_models_health_and_metrics(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["target"]
    status, health = server.get("/health")
    assert status == 200 and health["slots"] == 4
    before = server.metrics()
    done = c.completions.create(model="x", prompt=PROMPTS[1], max_tokens=20, temperature=0, extra_body={"mode": "spec"})
    after = server.metrics()
    ok = 'cospec_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after["cospec_generated_tokens_total"] - before["cospec_generated_tokens_total"] == done.usage.completion_tokens
    assert after["cospec_prompt_tokens_total"] - before["cospec_prompt_tokens_total"] == done.usage.prompt_tokens
    assert after["cospec_slots"] == 4 and after["cospec_slots_busy"] == 0 and after["cospec_queue_length"] == 0
    drafted = after["cospec_drafted_tokens_total"]
    assert drafted > 0 and after["cospec_acceptance_rate"] == pytest.approx(after["cospec_accepted_tokens_total"] / drafted)


def test_a_growing_chat_reuses_its_slots_cache(server):
    """The second turn of a conversation goes to the slot holding the first (four slots to choose
    from) and evaluates only what is new: its cached prompt covers the whole first prompt."""
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    first = c.chat.completions.create(model="x", messages=messages, max_tokens=30, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": PROMPTS[1]}]
    second = c.chat.completions.create(model="x", messages=messages, max_tokens=30, temperature=0)
    assert second.model_extra["cospec"]["n_prompt_cached"] >= first.usage.prompt_tokens - 1
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


# -- load -----------------------------------------------------------------------------------------------


def test_32_concurrent_streams_on_4_slots_equal_their_sequential_results(server):
    """32 streaming chats at once on 4 slots all complete (28 of them queue), each with the text
    it gets alone: slots do not disturb one another, and reusing whatever a slot held before gives
    the same output as a fresh context."""
    conversations = task_conversations(32)
    params = dict(temperature=0, max_tokens=48, extra_body={"mode": "spec"})
    sequential = stream_chats(server, conversations, concurrent=False, **params)
    t0 = time.monotonic()
    concurrent = stream_chats(server, conversations, concurrent=True, **params)
    assert time.monotonic() - t0 < 120
    assert concurrent["texts"] == sequential["texts"]
    assert all(t.strip() for t in concurrent["texts"])
    m = server.metrics()
    assert m["cospec_queue_wait_seconds_count"] >= 1 and m["cospec_queue_wait_max_seconds"] > 0  # requests queued
    assert m["cospec_slots_busy"] == 0 and m["cospec_queue_length"] == 0


# -- bad input --------------------------------------------------------------------------------------------


KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed_server():
    with ServerProcess(*FAMILY_MODELS, "--ctx-size", CTX, "--api-key", KEY) as s:
        yield s


def chat_body(**changes):
    body = {"messages": [{"role": "user", "content": "add 1 2"}], "max_tokens": 5, "temperature": 0}
    body.update(changes)
    return body


TOO_LONG = "add 12 34 " * 200  # > 512 tokens


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "maximum": 120},
          "pet": {"enum": ["cat", "dog"]}}, "required": ["name", "age", "pet"], "additionalProperties": False}


@pytest.mark.parametrize("mode", ["target", "spec", "cos"])
def test_response_format_json_schema_streamed_and_not(server, mode):
    """The openai client's response_format: json_schema replies validate against the schema (or are
    cut by max_tokens, finish_reason "length"), streamed text equals the whole reply, json_object
    replies parse as objects, and no-op values of known fields are accepted."""
    import jsonschema

    c = client(server)
    messages = [{"role": "user", "content": "add 3 4"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    params = dict(model="x", messages=messages, max_tokens=60, temperature=0, response_format=fmt,
                  presence_penalty=0, user="u1", extra_body={"mode": mode})
    full = c.chat.completions.create(**params)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    chunks = list(c.chat.completions.create(**params, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    obj = c.chat.completions.create(model="x", messages=messages, max_tokens=60, temperature=1.0, seed=3,
                                    response_format={"type": "json_object"}, extra_body={"mode": mode})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    cut = c.chat.completions.create(**{**params, "max_tokens": 4})
    assert cut.choices[0].finish_reason == "length"


def test_logprobs_on_both_endpoints_equal_across_modes(server):
    """Chat (logprobs + top_logprobs) and completions (logprobs: N), streamed and not: one entry per
    token, alternatives sorted, the chosen token first when greedy, and the same values in spec
    mode as in target-only mode (verification rows equal target-only's)."""
    c = client(server)
    messages = [{"role": "user", "content": "add 3 4"}]
    got = {}
    for mode in ("target", "spec"):
        full = c.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"mode": mode})
        content = full.choices[0].logprobs.content
        assert "".join(t.token for t in content).strip() == full.choices[0].message.content
        for t in content:
            assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
            assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
            assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        streamed = [e for chunk in c.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0,
                                                              logprobs=True, top_logprobs=3, stream=True,
                                                              extra_body={"mode": mode})
                    if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
        assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
        got[mode] = [(t.token, t.logprob) for t in content]
    assert got["spec"] == got["target"]
    out = c.completions.create(model="x", prompt="add 1 2 =", max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(top) <= 2 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_the_grammar_extension_on_completions(server):
    c = client(server)
    out = c.completions.create(model="x", prompt="add 1 2 =", max_tokens=12, temperature=0,
                               extra_body={"grammar": 'root ::= ("yes" | "no") " " [0-9] [0-9]? "."'})
    text = out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    import re

    assert re.fullmatch(r"(yes|no) [0-9]+\.", text), text


@pytest.mark.parametrize(
    "path, body, headers, status, param, code, words",
    [
        ("/v1/chat/completions", chat_body(), {}, 401, None, "invalid_api_key", "missing API key"),
        ("/v1/chat/completions", chat_body(), {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key", "incorrect API key"),
        ("/v1/models", None, {}, 401, None, "invalid_api_key", "missing API key"),
        ("/v1/chat/completions", b'{"messages": [', AUTH, 400, None, None, "malformed JSON"),
        ("/v1/chat/completions", chat_body(temperature="hot"), AUTH, 400, "temperature", None, "valid number"),
        ("/v1/chat/completions", chat_body(max_tokens=2.5), AUTH, 400, "max_tokens", None, "valid integer"),
        ("/v1/chat/completions", chat_body(messages="add 1 2"), AUTH, 400, "messages", None, "valid list"),
        ("/v1/chat/completions", chat_body(messages=[]), AUTH, 400, "messages", None, "must not be empty"),
        ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "  "}]), AUTH, 400, "messages", None, "non-empty user"),
        ("/v1/chat/completions", chat_body(messages=[{"role": "wizard", "content": "hi"}]), AUTH, 400, "messages", None, "role"),
        ("/v1/completions", {"prompt": TOO_LONG}, AUTH, 400, "prompt", "context_length_exceeded", "context holds 512"),
        ("/v1/completions", {"prompt": TOO_LONG, "stream": True}, AUTH, 400, "prompt", "context_length_exceeded", "context holds 512"),
        ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": TOO_LONG}]), AUTH, 400, "messages",
         "context_length_exceeded", "context holds 512"),
        ("/v1/completions", {"prompt": ""}, AUTH, 400, "prompt", None, "empty"),
        ("/v1/completions", {"prompt": [10**9]}, AUTH, 400, "prompt", None, "outside the vocabulary"),
        ("/v1/chat/completions", chat_body(mode="fastest"), AUTH, 400, "mode", None, "mode must be one of"),
        ("/v1/chat/completions", chat_body(n=2), AUTH, 400, "n", None, "n=2 is not supported"),
        ("/v1/chat/completions", chat_body(mode="cos", weights=[1.0]), AUTH, 400, "weights", None, "weights"),
        ("/v1/chat/completions", chat_body(mode="cos", mu=float("nan")), AUTH, 400, "mu", None, "finite number"),
        ("/v1/chat/completions", chat_body(stop=3), AUTH, 400, "stop", None, "valid string"),
        ("/v1/completions", {"prompt": "add 1 2", "draft_source": "psychic"}, AUTH, 400, "draft_source", None,
         "draft_source must be one of"),
        ("/v1/chat/completions", chat_body(draft_p_min="high"), AUTH, 400, "draft_p_min", None, "valid number"),
        ("/v1/chat/completions", chat_body(frobnicate=1), AUTH, 400, "frobnicate", None, "unrecognized request field"),
        ("/v1/completions", {"prompt": "add 1 2", "logprobs": True}, AUTH, 400, "logprobs", None, "an integer"),
        ("/v1/completions", {"prompt": "add 1 2", "logprobs": 21}, AUTH, 400, "logprobs", None, "[0, 20]"),
        ("/v1/chat/completions", chat_body(logprobs=3), AUTH, 400, "logprobs", None, "a boolean"),
        ("/v1/chat/completions", chat_body(top_logprobs=2), AUTH, 400, "top_logprobs", None, "needs logprobs: true"),
        ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), AUTH, 400, "top_logprobs", None, "less than or equal to 20"),
        ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), AUTH, 400, "tools",
         None, "does not render tools"),
        ("/v1/chat/completions", chat_body(presence_penalty=0.5), AUTH, 400, "presence_penalty", None, "only 0"),
        ("/v1/chat/completions", chat_body(logit_bias={"5": 100}), AUTH, 400, "logit_bias", None, "grammar"),
        ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "hi", "audio": {"id": "x"}}]), AUTH, 400,
         "messages", None, "unrecognized request field"),
        ("/v1/chat/completions", chat_body(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "object", "properties": {"a": {"type": "strin"}}}}}), AUTH, 400, "response_format", None,
         "invalid JSON schema at properties/a/type"),
        ("/v1/chat/completions", chat_body(response_format={"type": "json_schema"}), AUTH, 400, "response_format", None,
         "needs"),
        ("/v1/chat/completions", chat_body(response_format={"type": "yaml"}), AUTH, 400, "response_format", None,
         "not supported"),
        ("/v1/completions", {"prompt": "add 1 2", "grammar": "root ::= foo"}, AUTH, 400, "grammar", None,
         "Rule 'foo' not found"),
        ("/v1/nowhere", {}, AUTH, 404, None, None, "Not Found"),
    ],
)
def test_bad_requests_get_openai_errors(keyed_server, path, body, headers, status, param, code, words):
    """Each bad request gets its status and OpenAI's error JSON, and the server lives on."""
    if body is None:
        got_status, got = keyed_server.get(path, headers)
    else:
        got_status, got = keyed_server.post(path, body, headers)
    assert got_status == status, got
    error = got["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["param"] == param and error["code"] == code
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert keyed_server.get("/health")[0] == 200


def test_a_fuzz_of_malformed_requests_gets_only_openai_shaped_answers(keyed_server):
    """300 mutations of valid chat and completion bodies (fields dropped, retyped, nested wrongly,
    unknown ones added, broken JSON): every answer is a 200 or an OpenAI-shaped 4xx, never a 5xx."""
    import random

    rng = random.Random(7)
    weird = [None, True, -1, 0, 2**40, 1.5, float("nan"), "", "x" * 300, [], [1, "a"], {}, {"type": "x"},
             {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}, {"type": "function"}]
    bases = [("/v1/chat/completions", chat_body()),
             ("/v1/completions", {"prompt": "add 1 2", "max_tokens": 4, "temperature": 0})]
    fields = ["messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "mode", "seed", "logprobs",
              "top_logprobs", "response_format", "grammar", "tools", "tool_choice", "n", "stream", "draft_max",
              "weights", "gamma", "grammar_assist", "frobnicate", "logit_bias", "echo"]
    statuses = []
    for i in range(300):
        path, body = bases[i % 2]
        body = json.loads(json.dumps(body))
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(fields)
            if rng.random() < 0.2:
                body.pop(name, None)
            else:
                body[name] = rng.choice(weird)
        if rng.random() < 0.1 and body.get("messages") and isinstance(body["messages"], list):
            body["messages"] = [{"role": rng.choice(["user", "tool", "wizard"]), "content": rng.choice(weird)}]
        payload = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.05:
            payload = payload[: rng.randint(0, len(payload))]
        status, got = keyed_server.post(path, payload, AUTH)
        statuses.append(status)
        assert status == 200 or (400 <= status < 500 and set(got["error"]) == {"message", "type", "param", "code"}), (body, got)
    assert statuses.count(200) > 5 and any(s == 400 for s in statuses)


def test_the_keyed_server_serves_the_right_key(keyed_server):
    c = client(keyed_server, api_key=KEY)
    # null for optional fields, and llama.cpp's seed -1 ("random"), are fine, and leave the slot usable.
    for _ in range(2):
        status, body = keyed_server.post("/v1/chat/completions", chat_body(n=None, stream=None, seed=-1, temperature=1.0), AUTH)
        assert status == 200, body
    reply = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "add 1 2"}], max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="x", prompt=TOO_LONG, max_tokens=5)
    assert info.value.code == "context_length_exceeded"


def test_serve_binds_loopback_by_default():
    with ServerProcess(*FAMILY_MODELS, "--ctx-size", CTX) as s:
        assert "http://127.0.0.1:" in s.output()


def test_serve_warns_before_binding_beyond_loopback():
    """Asked for 0.0.0.0 it warns that anyone can reach it (here the port is taken by a socket of
    ours, so nothing is ever exposed: the server then exits with a clear error)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "cli.main", "serve", *FAMILY_MODELS, "--ctx-size", str(CTX),
                              "--host", "0.0.0.0", "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "warning: binding 0.0.0.0" in out.stderr and "set --api-key" in out.stderr
    assert out.returncode != 0


# -- the default pair: a dropped client, and memory with P slots ------------------------------------


@pytest.mark.slow
def test_a_client_dropped_mid_stream_frees_its_slot_and_weights_are_shared(default_pair_paths):
    """On one slot: a client that reads a few chunks of a long stream and hangs up stops its
    generation (counted as cancelled, far fewer tokens than asked) and a request sent right after
    is served at once. Then memory: four slots on the same weights cost the KV caches and compute
    buffers of three more contexts, not three more copies of the weights."""
    weights_mib = sum(p.stat().st_size for p in map(__import__("pathlib").Path, default_pair_paths)) / 2**20
    with ServerProcess("--ctx-size", 1024, "--parallel", 1) as one:
        c = client(one)
        stream = c.completions.create(model="x", prompt="The history of the Roman Empire", max_tokens=900,
                                      temperature=0, stream=True, extra_body={"mode": "target"})
        for _, chunk in zip(range(3), stream):
            pass
        stream.close()  # hang up
        t0 = time.monotonic()
        quick = c.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0)
        waited = time.monotonic() - t0
        assert quick.usage.completion_tokens > 0
        # Nine hundred tokens at Gemma's ~90 tok/s would take ~10 s; a freed slot answers at once.
        assert waited < 3.0
        m = one.metrics()
        assert m["cospec_cancelled_total"] == 1
        assert m["cospec_generated_tokens_total"] < 300
        assert m["cospec_slots_busy"] == 0
        long_request = {"prompt": "The history of the Roman Empire", "max_tokens": 900, "temperature": 0, "mode": "target"}
        # A non-streaming client that hangs up mid-generation.
        one.abandon("/v1/completions", long_request, after=1.0)
        t0 = time.monotonic()
        c.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert time.monotonic() - t0 < 3.0
        assert one.metrics()["cospec_cancelled_total"] == 2
        # A client that hangs up while queued behind a busy slot never gets the slot.
        busy = c.completions.create(model="x", stream=True, **{k: v for k, v in long_request.items() if k != "mode"},
                                    extra_body={"mode": "target"})
        next(iter(busy))
        one.abandon("/v1/completions", long_request, after=0.5)
        closed = 'cospec_requests_total{endpoint="/v1/completions",status="499"}'
        deadline = time.monotonic() + 10
        while one.metrics().get(closed, 0) < 1:  # noticed while the slot is still busy
            assert time.monotonic() < deadline, "the queued request's disconnect was never noticed"
            time.sleep(0.1)
        busy.close()
        c.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0)
        m = one.metrics()
        assert m['cospec_requests_total{endpoint="/v1/completions",status="499"}'] == 1
        assert m["cospec_cancelled_total"] == 3  # the busy stream; the queued request never ran
        assert m["cospec_slots_busy"] == 0 and m["cospec_queue_length"] == 0
        rss_one = one.rss_mib()
    with ServerProcess("--ctx-size", 1024, "--parallel", 4) as four:
        # Use every slot once, so each context has allocated what it needs.
        stream_chats(four, [[{"role": "user", "content": f"Say {i}."}] for i in range(4)], concurrent=True,
                     temperature=0, max_tokens=8)
        rss_four = four.rss_mib()
    growth = rss_four - rss_one
    print(f"RSS: P=1 {rss_one:.0f} MiB, P=4 {rss_four:.0f} MiB, +{growth / 3:.0f} MiB per extra slot; weights {weights_mib:.0f} MiB")
    # Each extra slot adds its own KV caches and compute buffers (~50-60 MiB here, more when batch
    # shapes vary); a copy of the weights per slot would add a whole weights_mib per slot.
    assert growth / 3 < 0.5 * weights_mib


def test_a_late_cancel_of_a_finished_job_does_not_stop_the_next_one_on_its_worker():
    """A client that goes away after its reply ended (its worker already serving the next request)
    must not cancel that next request: the cancel flag lives on the worker's conversation."""
    import asyncio
    import types

    from fake_backend import make_engine

    from cospec_local.config import GenerationConfig
    from cospec_local.engine import DoneEvent
    from cospec_local.server.pool import _END, Job, Metrics, Worker, WorkerPool

    engine, _ = make_engine((11, 22))
    config = GenerationConfig(mode="spec", temperature=0, max_tokens=40, adaptive=False)

    async def drain(job):
        done = None
        while (item := await job.next()) is not _END:
            if isinstance(item, DoneEvent):
                done = item
        return done

    async def main():
        pool = WorkerPool([Worker(0, types.SimpleNamespace(engine=engine))], Metrics(1))
        loop = asyncio.get_running_loop()
        worker = await pool.acquire([1, 2, 3])
        first = Job(pool, worker, engine.stream([1, 2, 3], config, conversation=worker.conversation), loop)
        assert (await drain(first)).finish_reason != "cancelled"
        worker = await pool.acquire([1, 2, 3])
        events = engine.stream([1, 2, 3], config, conversation=worker.conversation)
        first.cancel()  # the first client hangs up late, as the next request starts on its worker
        return await drain(Job(pool, worker, events, loop))

    done = asyncio.run(main())
    assert done.finish_reason == "length" and done.stats.n_generated == 40
