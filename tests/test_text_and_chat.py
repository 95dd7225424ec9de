"""Streaming text (stop strings, split UTF-8) and chat templates (Jinja, fallback, from a GGUF)."""

import jinja2
import pytest

from cospec_local import load_pair
from cospec_local.chat import FALLBACK_PREAMBLE, FALLBACK_STOP, ChatTemplate
from cospec_local.text import TextStream
from gguf_util import copy_gguf_with

# A small template in the style of real GGUF chat templates (Zephyr/ChatML-like): a loop over
# messages with a role check that calls raise_exception, eos_token after assistant turns,
# bos_token at the start, whitespace-control markers and an add_generation_prompt tail.
TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] }}
    {%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
    {{- '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\\n' }}
{%- endif %}
"""

MESSAGES = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello."},
    {"role": "user", "content": "how are you?"},
]


def feed(stream: TextStream, pieces) -> list[str]:
    """What the stream returns for each pushed piece (bytes)."""
    return [stream.push(p) for p in pieces]


# -- TextStream ---------------------------------------------------------------------------------


def test_stop_string_split_across_pushes_is_caught_and_never_shown():
    """A stop string arriving in pieces ("\\nUs", "er", ":") must end the stream with none of its
    characters shown: the prefix is held back until it is known to be the stop string."""
    stream = TextStream(("\nUser:",))
    shown = feed(stream, [b"Hello", b"\nUs", b"er", b":", b" more"])
    assert shown[:4] == ["Hello", "", "", ""]
    assert stream.stopped
    assert stream.flush() == ""


def test_stop_string_inside_one_push_cuts_there():
    """Text before a stop string in the same piece is shown; the stop string and what follows are not."""
    stream = TextStream(("</answer>",))
    assert stream.push(b"42</answer> trailing") == "42"
    assert stream.stopped


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    """A tail that could start a stop string is held, then released once the next piece shows it
    is not one; the stream does not stop and loses nothing."""
    stream = TextStream(("\nUser:",))
    shown = feed(stream, [b"a\nUs", b"e", b"d it"])
    assert shown == ["a", "", "\nUsed it"]  # "\nUse" still could be "\nUser:"; "\nUsed" cannot
    assert not stream.stopped
    assert stream.flush() == ""
    stream = TextStream(("\nUser:",))
    assert feed(stream, [b"x\n", b"Usage"]) == ["x", "\nUsage"]


def test_overlapping_prefix_restarts_are_found():
    """A held prefix that fails can itself contain the start of the stop string ("aa" + "ab"):
    the stream must find the stop string starting inside the held text."""
    stream = TextStream(("aab",))
    shown = feed(stream, [b"xa", b"a", b"ab"])
    assert stream.stopped
    assert "".join(shown) == "xa"  # "xaaab": the stop string starts at index 2


def test_several_stop_strings_hold_the_longest_possible_prefix():
    """With several stop strings the held tail is the longest one that could still become any of
    them, and the first stop string to appear ends the stream."""
    stream = TextStream(("\nQ:", "###"))
    assert stream.push(b"x\n") == "x"
    assert stream.push(b"##") == "\n"  # "\n##" cannot become "\nQ:", but "##" can become "###"
    assert stream.push(b"#") == ""
    assert stream.stopped
    stream = TextStream(("\nQ:", "###"))
    assert stream.push(b"y\n#") == "y\n"  # only the tail "#" can still grow into a stop string
    assert stream.push(b"Q") == "#Q"


def test_the_earliest_of_several_stop_strings_ends_the_text():
    """When one piece holds two different stop strings, the text ends at the one that comes FIRST
    in the text, whatever their order in the stop tuple: no stop string is ever shown. (Pieces are
    whole tokens, and real vocabularies have tokens like ".\n\n": with stop=("\n\n", ".") that
    token must show nothing, not the ".".)"""
    for stop in (("###", "\nQ:"), ("\nQ:", "###")):
        stream = TextStream(stop)
        assert stream.push(b"a\nQ:b###c") == "a", stop
        assert stream.stopped
    for stop in (("\n\n", "."), (".", "\n\n")):
        stream = TextStream(stop)
        assert stream.push(b"end") == "end"
        assert stream.push(b".\n\n") == "", stop
        assert stream.stopped


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_character_fed_byte_by_byte_appears_whole(char):
    """A character split across tokens (byte-fallback tokens carry one byte each) must appear once
    complete, never as a replacement character."""
    stream = TextStream(("\nUser:",))
    data = ("a" + char + "b").encode("utf-8")
    shown = feed(stream, [data[i : i + 1] for i in range(len(data))])
    assert "\ufffd" not in "".join(shown)
    assert "".join(shown) == "a" + char + "b"
    assert shown[-2] == char and all(s == "" for s in shown[1:-2])


def test_split_multibyte_character_inside_a_stop_string():
    """A stop string containing a multi-byte character is caught when its bytes arrive split."""
    stream = TextStream(("é!",))
    shown = feed(stream, [b"ok", "é".encode()[:1], "é".encode()[1:], b"!"])
    assert stream.stopped
    assert "".join(shown) == "ok"


def test_flush_returns_held_text_once():
    """At the end of generation the held-back tail is real output: flush returns it, then nothing."""
    stream = TextStream(("\nUser:",))
    assert stream.push(b"done\nUse") == "done"
    assert stream.flush() == "\nUse"
    assert stream.flush() == ""


def test_flush_of_a_truncated_character_marks_it():
    """Bytes of an unfinished character at the very end cannot be decoded: flush shows them as
    one replacement character instead of dropping them silently."""
    stream = TextStream(())
    assert stream.push("é".encode()[:1]) == ""
    assert stream.flush() == "\ufffd"


def test_empty_stop_strings_are_ignored():
    """An empty stop string would match everywhere; it is dropped, so text flows unchanged."""
    stream = TextStream(("",))
    assert stream.push(b"abc") == "abc"
    assert not stream.stopped


# -- ChatTemplate ------------------------------------------------------------------------------


def test_jinja_template_renders_exactly():
    """The model's Jinja template renders the conversation as Hugging Face would (trim_blocks,
    lstrip_blocks), with the eos text after assistant turns and no BOS text (the tokenizer adds
    BOS). The model's template brings no extra stop strings."""
    template = ChatTemplate.for_model(TEMPLATE, bos_text="<s>", eos_text="</s>")
    assert template.render(MESSAGES, True) == (
        "<|system|>\nbe brief.\n"
        "<|user|>\nhi\n"
        "<|assistant|>\nhello.</s>\n"
        "<|user|>\nhow are you?\n"
        "<|assistant|>\n"
    )
    assert template.render(MESSAGES[:2], False) == "<|system|>\nbe brief.\n<|user|>\nhi\n"
    assert template.stop == ()
    assert "model" in template.name and "chat_template" in template.name


def test_jinja_template_renders_prefixes_of_one_another():
    """Each turn's rendering extends the previous one (with the reply in between): what lets a
    chat session evaluate only the new text of each turn."""
    template = ChatTemplate.for_model(TEMPLATE, eos_text="</s>")
    first = template.render(MESSAGES[:2], True)
    second = template.render(MESSAGES, True)
    assert second.startswith(first)
    assert second[len(first) :].startswith("hello.</s>\n<|user|>")


def test_template_raise_exception_raises_a_template_error():
    """raise_exception in a template (how real templates reject bad conversations) raises
    jinja2.TemplateError carrying the template's message."""
    template = ChatTemplate.for_model(TEMPLATE)
    with pytest.raises(jinja2.TemplateError, match="unknown role: tool"):
        template.render([{"role": "tool", "content": "x"}], True)


def test_fallback_template_is_a_user_assistant_transcript():
    """Without a template (base models) the chat is a plain transcript after a preamble that sets
    up the assistant role; replies stop at the next turn marker of either side."""
    template = ChatTemplate.for_model(None)
    assert template.render(MESSAGES, True) == FALLBACK_PREAMBLE + (
        "be brief.\n\nUser: hi\nAssistant: hello.\nUser: how are you?\nAssistant:"
    )
    assert template.render(MESSAGES[1:2], False) == FALLBACK_PREAMBLE + "User: hi\n"
    assert FALLBACK_PREAMBLE.rstrip().endswith("stays on topic.")
    assert template.stop == FALLBACK_STOP == ("\nUser:", "\nAssistant:")
    assert "fallback" in template.name
    assert ChatTemplate.for_model("").name == template.name  # an empty template counts as none


# -- end to end: a GGUF carrying a chat template --------------------------------------------


@pytest.fixture(scope="module")
def templated_target(tiny_target, tmp_path_factory):
    path = tmp_path_factory.mktemp("templated") / "target_with_template.gguf"
    return copy_gguf_with(tiny_target, path, added={"tokenizer.chat_template": TEMPLATE})


def test_chat_uses_the_template_stored_in_the_gguf(templated_target, tiny_target):
    """A GGUF with tokenizer.chat_template: the chat session uses it (not the fallback), the
    engine's context starts with exactly the rendered prompt's tokens, and the reply equals a
    plain generation from that rendered prompt. The same file without the key falls back."""
    with load_pair(None, templated_target, n_ctx=512, n_threads=1) as pair:
        assert pair.target.chat_template == TEMPLATE
        chat = pair.chat()
        assert chat.template.name == ChatTemplate.for_model(TEMPLATE).name != ChatTemplate.for_model(None).name
        assert chat.template.stop == ()
        reply = chat.say("hi", temperature=0, max_tokens=5, mode="target")
        eos_text = pair.target.token_text(pair.target.eos_id)
        rendered = ChatTemplate.for_model(TEMPLATE, eos_text=eos_text).render([{"role": "user", "content": "hi"}], True)
        assert rendered == "<|user|>\nhi\n<|assistant|>\n"
        prompt_tokens = pair.tokenize(rendered)
        assert chat.tokens[: len(prompt_tokens)] == prompt_tokens
        assert pair.target.detokenize(chat.tokens).startswith(rendered)
        assert chat.tokens[len(prompt_tokens) :] == reply.tokens
        ref = pair.generate(rendered, temperature=0, max_tokens=5, mode="target")
        assert reply.tokens == ref.tokens and reply.text == ref.text
        assert chat.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply.text.strip()}]
    with load_pair(None, tiny_target, n_ctx=512, n_threads=1) as plain:
        assert plain.target.chat_template is None
        assert plain.chat().template.stop == FALLBACK_STOP


# -- the fallback transcript stops at turn markers ------------------------------------------------


@pytest.mark.parametrize("marker", ["\nUser:", "\nAssistant:"])
def test_fallback_chat_stops_at_a_turn_marker_and_never_shows_it(marker):
    """A base model that goes on to write the next turn itself: the reply ends right before the
    marker, the marker's text is never streamed, and the next turn still works."""
    from fake_backend import ScriptedPair

    from cospec_local.api import ChatSession

    script = f" Paris is the capital.{marker} And what about Spain? Madrid."
    session = ChatSession(ScriptedPair(script))
    events = list(session.send("What is the capital of France?", temperature=0, max_tokens=200, mode="target"))
    shown = "".join(e.text for e in events if hasattr(e, "token"))
    assert shown == " Paris is the capital."
    assert events[-1].finish_reason == "stop"
    assert events[-1].stats.n_generated < len(script)  # stopped at the marker, not at max_tokens or EOS
    assert session.messages[-1] == {"role": "assistant", "content": "Paris is the capital."}
    second = session.say("And Spain?", temperature=0, max_tokens=200, mode="target")
    assert second.text == " Paris is the capital."  # the script again: the session is usable


def test_fallback_chat_reply_without_a_marker_runs_to_eos():
    """The stop strings cut only at markers: a reply that mentions 'User' mid-line is kept whole."""
    from fake_backend import ScriptedPair

    from cospec_local.api import ChatSession

    script = " The User: field is optional."
    reply = ChatSession(ScriptedPair(script)).say("What is optional?", temperature=0, max_tokens=200, mode="target")
    assert reply.text == script and reply.finish_reason == "stop"
