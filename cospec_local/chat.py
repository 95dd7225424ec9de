"""Chat prompts: the model's own template (GGUF metadata, Jinja) or a plain transcript for base
models, turned into tokens incrementally so each turn evaluates only its new text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .tools import template_tools, tool_format

# A base model continues a transcript past its own turn: it writes the next "User:" line, or another
# "Assistant:" line, and so on until max_tokens. Every turn marker ends the reply (never shown).
FALLBACK_STOP = ("\nUser:", "\nAssistant:")
# Base models carry no notion of an assistant; a line saying what the transcript is makes small ones
# answer the question instead of echoing it (Gemma 3 270M: "Write a very long essay about ..." was
# repeated verbatim without it; with it, a short on-topic reply).
FALLBACK_PREAMBLE = (
    "A conversation between a User and a helpful Assistant. "
    "The Assistant answers each question directly, in a few clear sentences, and stays on topic.\n\n"
)


def render_fallback(messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
    """A transcript that base models continue sensibly: a preamble, then 'User: ...\\nAssistant: ...'
    (a system message follows the preamble). It has no way to offer tools."""
    if tools:
        raise ValueError("this model has no chat template, so it cannot be offered tools")
    parts = [FALLBACK_PREAMBLE]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"User: {content}\n")
        else:
            parts.append(f"Assistant: {content.strip()}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


@dataclass
class ChatTemplate:
    """Renders a message list (and the tools offered, OpenAI's shape) to prompt text; `stop` are
    extra stop strings for replies; `tool_format` the tool-call format the template teaches
    (`tools.TOOL_FORMATS`; None: it renders no tools)."""

    render: Callable[..., str]
    stop: tuple[str, ...]
    name: str
    tool_format: str | None = None

    @classmethod
    def for_model(cls, jinja_source: str | None, bos_text: str = "", eos_text: str = "") -> "ChatTemplate":
        if not jinja_source:
            return cls(render_fallback, FALLBACK_STOP, "fallback (User:/Assistant: transcript)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        template = env.from_string(jinja_source)

        fmt = tool_format(jinja_source)

        def render(messages, add_generation_prompt, tools=None):
            if tools and fmt is None:
                raise ValueError("this model's chat template does not render tools")
            # The BOS token is added by the tokenizer, not by the template text.
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token="",
                eos_token=eos_text,
                raise_exception=raise_exception,
                tools=template_tools(tools) if tools else None,
            )

        return cls(render, (), "model (GGUF tokenizer.chat_template)", fmt)
