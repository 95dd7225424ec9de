"""Tool calls (OpenAI's `tools`): the tools a request offers, the grammar that makes a reply a
call, and the calls read back out of a reply, in the formats the chat templates teach:

- "hermes" (Qwen2.5, Hermes 2 Pro / 3): one block per call,
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- "llama3" (Llama 3.1 / 3.2 / 3.3): the reply is one JSON object `{"name": ..., "parameters": {...}}`.

The template renders the tools (`ChatTemplate.render(..., tools=...)`) and says which format its
model was taught (`ChatTemplate.tool_format`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .grammar import JSON_OPTIONS, Grammar, GrammarError, check_json_schema

TOOL_FORMATS = ("hermes", "llama3")
_ARGUMENTS_KEY = {"hermes": "arguments", "llama3": "parameters"}
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tool_format(template_source: str | None) -> str | None:
    """The call format a chat template teaches its model (None: it renders no tools)."""
    if not template_source or "tools" not in template_source:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if '"parameters"' in template_source:
        return "llama3"
    return None


@dataclass(frozen=True)
class Tool:
    """One function a request offers: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict


def parse_tools(tools: list) -> list[Tool]:
    """The functions of an OpenAI `tools` list; ValueError naming what is wrong."""
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        try:
            check_json_schema(json.dumps(parameters))
        except GrammarError as e:
            raise ValueError(f"tools[{i}].function.parameters: {e}") from None
        out.append(Tool(name, parameters))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError("tool names must be unique")
    return out


def call_grammar(tools: list[Tool], fmt: str, name: str | None = None) -> Grammar:
    """A reply that is exactly one call, of the tool `name` or of any of `tools`, in `fmt`."""
    chosen = [t for t in tools if name is None or t.name == name]
    if not chosen:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    key = _ARGUMENTS_KEY[fmt]
    schemas = [{"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
                "required": ["name", key], "additionalProperties": False} for t in chosen]
    schema = dict(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, **{"x-guidance": JSON_OPTIONS})
    if fmt == "llama3":
        return Grammar.json_schema(schema)
    return Grammar.lark(f'start: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"')


def _call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def _as_call(text: str, fmt: str) -> dict | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    key = _ARGUMENTS_KEY[fmt]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get(key, {}), dict):
        return None
    return _call(obj["name"], obj.get(key, {}))


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[dict]]:
    """(the reply's remaining text, its calls as OpenAI `tool_calls` entries with the arguments
    as a JSON string). Text that is not a well-formed call stays text."""
    if fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        call = _as_call(body, fmt) if body.startswith("{") else None
        return ("", [call]) if call else (text, [])
    calls, kept, last = [], [], 0
    for match in _HERMES_CALL.finditer(text):
        call = _as_call(match.group(1), fmt)
        if call is not None:
            calls.append(call)
            kept.append(text[last:match.start()])
            last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def template_tools(tools: list) -> list[dict]:
    """OpenAI tools with the optional parts filled in, as every template reads them (Hermes' needs a
    description, others print the parameters)."""
    out = []
    for tool in tools:
        function = {"description": "", "parameters": {"type": "object", "properties": {}}, **tool["function"]}
        out.append({**tool, "function": function})
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the templates read them: an assistant's tool calls with their arguments as
    objects (OpenAI sends JSON strings; the templates print them with `tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            converted = []
            for c in calls:
                function = dict(c.get("function", {}))
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        raise ValueError(f"tool call arguments are not JSON: {function['arguments']!r}") from None
                converted.append({**c, "function": function})
            m = {**m, "tool_calls": converted}
        out.append(m)
    return out
