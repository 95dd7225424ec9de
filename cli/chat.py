"""`cospec-local chat`: a conversation on the terminal, or over piped stdin."""

from __future__ import annotations

import sys

import click

from .generate import format_stats
from .options import generation_options, grammar_options, handle_errors, model_options, runnable_config

DIM_GREEN = "\x1b[32m"
RESET = "\x1b[0m"


@click.command()
@model_options
@generation_options
@click.option("--system", default=None, help="System message.")
@click.option("--color/--no-color", default=None, help="Colour accepted proposed tokens (default: on a terminal).")
@grammar_options
@handle_errors
def chat(models, config, system, color, grammar):
    """Interactive chat (reads messages from stdin when piped). Commands: /stats /reset /exit.
    Ctrl-C stops a reply; at the prompt it clears the line. Ctrl-D quits."""
    pair = models.open_pair(config)
    try:
        config = runnable_config(pair, config)
        session = pair.chat(system)
        interactive = sys.stdin.isatty()
        color = sys.stdout.isatty() if color is None else color
        if interactive:
            click.echo(f"cospec-local chat ({config.mode} mode, template: {session.template.name}). /stats /reset /exit", err=True)
        while (message := read_message(interactive)) is not None:
            if message in ("/exit", "/quit"):
                break
            if message == "/reset":
                session.reset()
                click.echo("(conversation reset)", err=True)
            elif message == "/stats":
                # The conversation keeps the last reply's statistics, also of a reply cut by Ctrl-C.
                last_stats = session.conversation.last_stats
                click.echo(format_stats(last_stats) if last_stats else "(no reply yet)", err=True)
            else:
                reply(session, message, config, color, grammar)
    finally:
        pair.close()


def read_message(interactive: bool) -> str | None:
    """The next non-empty line, stripped; None at the end of input (Ctrl-D, or the end of piped
    stdin). On a terminal, Ctrl-C drops the line being typed and prompts afresh, as a shell does
    (the conversation stays); on piped input it ends the chat."""
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return None
        except KeyboardInterrupt:
            click.echo("", err=True)
            if not interactive:
                return None
            continue
        if line.strip():
            return line.strip()


def reply(session, message: str, config, color: bool, grammar=None) -> None:
    """Stream the reply to `message` to stdout (proposed tokens in green when `color`; constrained
    by `grammar`, if given); Ctrl-C stops it and the partial reply stays in the conversation."""
    started = False  # the reply's leading space (after "Assistant:") is not worth printing
    try:
        for event in session.send(message, config, grammar):
            if getattr(event, "text", ""):
                text = event.text if started else event.text.lstrip()
                if not text:
                    continue
                started = True
                if color and event.proposed:
                    text = DIM_GREEN + text + RESET
                sys.stdout.write(text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(RESET if color else "")
        click.echo("\n(interrupted)", err=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
