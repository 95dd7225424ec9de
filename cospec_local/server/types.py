"""Request bodies, and their translation into what the engine takes.

The decoding fields of a request are DERIVED from `GenerationConfig`: every config field (but the
server-only ones below) is an optional request field of the same name, so a field added to the
config can be set per request at once, and none can drift. OpenAI's own names are config names
(max_tokens, temperature, top_p, seed, stop); the rest are cospec-local's extensions."""

from __future__ import annotations

import re
import typing
from dataclasses import fields
from types import NoneType, UnionType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..config import GenerationConfig
from ..grammar import Grammar, GrammarError
from ..tools import call_grammar, parse_tools, template_messages
from .errors import ApiError

# Config fields a request may NOT set: `policy` is a path of an ONNX file the server would load; a
# client must not make the server open files (the policy is the server's --policy).
SERVER_ONLY = frozenset({"policy"})
# Config fields set from OpenAI's own request fields of other shapes (`request_logprobs`).
OPENAI_MAPPED = frozenset({"logprobs"})

# The request fields that set config fields, in the config's order, and the config's types.
CONFIG_REQUEST_FIELDS = tuple(f.name for f in fields(GenerationConfig) if f.name not in SERVER_ONLY | OPENAI_MAPPED)
_HINTS = typing.get_type_hints(GenerationConfig)

# Bounds pydantic checks before the config does (the config checks these too): a bad value gets
# pydantic's message, which names the bound, as OpenAI's API answers.
_BOUNDS = {
    "max_tokens": dict(ge=1), "temperature": dict(ge=0), "top_p": dict(gt=0, le=1),
    "top_k": dict(ge=0), "min_p": dict(ge=0, le=1), "draft_max": dict(ge=1),
}


def _without_none(hint):
    """`hint` less its None member (the config's None means "the default" as leaving it out does)."""
    if typing.get_origin(hint) in (typing.Union, UnionType):
        return typing.Union[tuple(a for a in typing.get_args(hint) if a is not NoneType)]
    return hint


def _request_type(hint):
    """The JSON type that sets a config field of type `hint` (a request may always leave it out):
    tuples come as JSON lists, and a tuple of strings (stop) also as one string, as OpenAI's
    `stop` does."""
    hint = _without_none(hint)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return str | list[str] if item is str else list[item]
    return hint


def _config_field_definitions() -> dict:
    """pydantic field definitions, `name=(type | None, Field(None, ...))`, for every config field a
    request may set, documented with the config's help text."""
    out = {}
    for f in fields(GenerationConfig):
        if f.name in CONFIG_REQUEST_FIELDS:
            out[f.name] = (_request_type(_HINTS[f.name]) | None,
                           Field(None, description=f.metadata["help"], **_BOUNDS.get(f.name, {})))
    return out


class _OpenAIFields(BaseModel):
    """OpenAI's fields that are not decoding settings. Strict types (a string where a number
    belongs is a 400, not a silent conversion); a field this server does not know is a 400 naming
    it, and a known one with a value it cannot honour too (`check_supported`), as OpenAI's API
    answers: nothing a client asked for is silently ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str | None = None
    n: int | None = None  # null or 1
    stream: bool | None = None
    stream_options: dict | None = None
    user: str | None = None  # an end-user id: nothing to do
    metadata: dict | None = None
    store: bool | None = None  # false/null only: nothing is stored
    # Constrained output: OpenAI's response_format, and the `grammar` extension (GBNF or Lark).
    response_format: dict | None = None
    grammar: str | None = Field(None, description="Extension: a GBNF or Lark grammar the output must follow.")
    # Log probabilities: chat's logprobs (bool) and top_logprobs, completions' logprobs (int).
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Known OpenAI fields this server cannot honour except at their no-op values (check_supported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


GenerationFields = create_model(
    "GenerationFields", __base__=_OpenAIFields, __module__=__name__, **_config_field_definitions())
GenerationFields.__doc__ = "Fields shared by both endpoints: OpenAI's, then one per GenerationConfig field."


class CompletionRequest(GenerationFields):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[str] | list[int]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    """One message of a chat request."""

    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None  # a participant's name (a tool's, for role "tool")
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a "tool" message answers


class ChatRequest(GenerationFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


# -- what a request asks for beyond decoding settings --------------------------------------------
# (field, the values it may take here, why others are refused)
_NO_OP_VALUES = [
    ("presence_penalty", (None, 0.0), "presence_penalty is not implemented (only 0 is accepted)"),
    ("frequency_penalty", (None, 0.0), "frequency_penalty is not implemented (only 0 is accepted)"),
    ("logit_bias", (None, {}), "logit_bias is not implemented (only an empty map is accepted); a grammar "
     "(response_format or the grammar field) restricts tokens exactly"),
    ("store", (None, False), "this server stores nothing (store must be false)"),
    ("echo", (None, False), "echo is not implemented"),
    ("best_of", (None, 1), "best_of is not implemented (one completion per request)"),
    ("suffix", (None, ""), "suffix (insertion) is not implemented"),
]


def check_supported(body: GenerationFields) -> None:
    """Refuse (400, naming the field) a known OpenAI field set to a value this server cannot honour."""
    for name, allowed, why in _NO_OP_VALUES:
        value = getattr(body, name, None)
        # (0 and False are equal in Python; completions' logprobs=0 still asks for logprobs.)
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            raise ApiError(400, f"{name}={value!r} cannot be honoured: {why}", name)


def request_logprobs(body: GenerationFields, chat: bool) -> int | None:
    """How many alternatives per token the request wants logprobs for (None: no logprobs), in
    OpenAI's shapes: chat's `logprobs: true` with `top_logprobs: N`, completions' `logprobs: N`."""
    value, top = body.logprobs, body.top_logprobs
    if chat:
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, "chat's logprobs is a boolean (give the number of alternatives as top_logprobs)", "logprobs")
        if top is not None and not value:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if value else None
    if top is not None:
        raise ApiError(400, "top_logprobs is a chat field: completions take logprobs: N", "top_logprobs")
    if isinstance(value, bool):
        raise ApiError(400, "completions' logprobs is the number of alternatives per token (an integer)", "logprobs")
    if value is not None and not 0 <= value <= 20:
        raise ApiError(400, "logprobs must be in [0, 20]", "logprobs")
    return value


def request_grammar(body: GenerationFields) -> Grammar | None:
    """The constraint a request asks for (response_format or the grammar extension), checked now:
    an invalid schema or grammar is a 400 naming what is wrong, before any slot is taken."""
    fmt, text = body.response_format, body.grammar
    if fmt is not None and fmt.get("type") != "text" and text is not None:
        raise ApiError(400, "give either response_format or grammar, not both", "grammar")
    grammar, param = None, "response_format"
    if text is not None:
        grammar, param = Grammar.gbnf(text), "grammar"
    elif fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            grammar = Grammar.json_object()
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ApiError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}", param)
            grammar = Grammar.json_schema(spec["schema"])  # strict or not, the schema is enforced
        elif kind != "text":
            raise ApiError(400, f"response_format type {kind!r} is not supported: use text, json_object or json_schema", param)
    if grammar is not None:
        try:
            grammar.compile()
        except GrammarError as e:
            raise ApiError(400, str(e), param) from None
    return grammar


# -- request -> GenerationConfig ------------------------------------------------------------------
def _config_value(name: str, value):
    """A request field's value as the config takes it (None: not set)."""
    if value is None:
        return None
    if name == "seed" and value < 0:
        return None  # llama.cpp's (and some clients') -1: fresh entropy, the config's None
    if isinstance(value, str) and typing.get_origin(_without_none(_HINTS[name])) is tuple:
        value = [value]  # one stop string
    if isinstance(value, list):
        return tuple(v for v in value if v != "")  # an empty stop string would end every reply at once
    return value


def build_config(body: GenerationFields, defaults: GenerationConfig, chat: bool) -> GenerationConfig:
    """The request's GenerationConfig: server defaults, then the fields the request sets."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n} is not supported: this server returns one choice per request (n=1)", "n")
    changes = {name: _config_value(name, getattr(body, name)) for name in CONFIG_REQUEST_FIELDS}
    changes["logprobs"] = request_logprobs(body, chat)
    newer_max = getattr(body, "max_completion_tokens", None)  # chat's newer name wins
    if newer_max is not None:
        changes["max_tokens"] = newer_max
    try:
        return defaults.with_(**changes)  # the config checks every value (None: keep the default)
    except ValueError as e:
        raise ApiError(400, str(e), param_named_in(str(e))) from None


_PARAM_PATTERNS = [(name, re.compile(rf"(?<![\w-])(?:{name}|--{name.replace('_', '-')})(?![\w-])"))
                   for name in CONFIG_REQUEST_FIELDS]


def param_named_in(message: str) -> str | None:
    """The request field a config or mode error is about: the field it names first, as `name` or
    as the CLI's `--name` ("--weights has 1 values for 2 models" -> weights)."""
    found = [(m.start(), name) for name, pattern in _PARAM_PATTERNS if (m := pattern.search(message))]
    return min(found)[1] if found else None


# -- request -> prompt --------------------------------------------------------------------------------
def completion_tokens(body: CompletionRequest, pair) -> list[int]:
    """The prompt's tokens: its text tokenized, or its token ids (checked against the vocabulary)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "a list of several prompts is not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        return pair.tokenize(prompt)
    n_vocab = pair.engine.n_vocab
    bad = [t for t in prompt if not 0 <= t < n_vocab]
    if bad:
        raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary (0..{n_vocab - 1})", "prompt")
    return list(prompt)


def _message_text(message: ChatMessage) -> str:
    """A message's text: a string, or the text parts of a content list (images are refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"only text content parts are supported, not {part.get('type')!r}", "messages")
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: ChatRequest) -> list[dict]:
    """The conversation as the chat template takes it: {"role", "content"} dicts ("developer" is
    OpenAI's newer name of "system"), with an assistant's tool calls and a tool message's call id
    and name; refuses one without a user message."""
    if not body.messages:
        raise ApiError(400, "messages must not be empty", "messages")
    messages = []
    for m in body.messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        messages.append(message)
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ApiError(400, "messages need at least one non-empty user message", "messages")
    try:
        return template_messages(messages)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None


def request_tools(body: ChatRequest, tool_format: str | None) -> tuple[list | None, Grammar | None]:
    """(the tools to render, the grammar that makes the reply a call, if `tool_choice` demands one)
    for a chat request: "auto" (the default) offers the tools and reads calls out of the reply,
    "required" or a named function constrains the reply to a call, "none" offers nothing."""
    tools, choice = body.tools or None, body.tool_choice
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return None, None
    if tool_format is None:
        raise ApiError(400, "this model's chat template does not render tools", "tools")
    try:
        parsed = parse_tools(tools)
    except ValueError as e:
        raise ApiError(400, str(e), "tools") from None
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        name = None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    else:
        raise ApiError(400, "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}",
                       "tool_choice")
    try:
        grammar = call_grammar(parsed, tool_format, name)
        grammar.compile()
    except (ValueError, GrammarError) as e:
        raise ApiError(400, str(e), "tool_choice") from None
    return tools, grammar
