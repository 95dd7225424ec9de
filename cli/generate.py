"""`cospec-local generate`: one completion, streamed to stdout, statistics on stderr."""

from __future__ import annotations

import json
import sys

import click

from .options import generation_options, grammar_options, handle_errors, model_options, runnable_config


def format_stats(stats) -> str:
    """One line of a generation's statistics (`generate`'s stderr, chat's /stats)."""
    s = stats
    parts = [
        f"{s.n_generated} tokens in {s.t_decode:.2f}s ({s.tokens_per_second:.1f} tok/s)",
        f"prompt {s.n_prompt} tokens ({s.t_prefill:.2f}s)",
    ]
    if s.n_drafted:
        parts.append(
            f"acceptance {s.acceptance_rate:.1%}, mean accepted {s.mean_accepted_length:.2f}/cycle, "
            f"{s.n_cycles} cycles + {s.n_target_steps} target steps"
        )
    if s.n_forced:
        parts.append(f"{s.n_forced} tokens forced by the grammar (no model call)")
    if s.n_generated:
        parts.append(f"{s.model_calls_per_token:.2f} model calls/token")
    times = ", ".join(f"{name} {t:.2f}s" for name, t in s.t_models.items())
    parts.append(f"time: {times + ', ' if times else ''}python {s.t_overhead:.2f}s")
    return " | ".join(parts)


@click.command()
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.File("r"), help="Read the prompt from a file ('-' for stdin).")
@model_options
@generation_options
@grammar_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with the text and stats.")
@handle_errors
def generate(prompt, prompt_file, models, config, grammar, as_json):
    """Complete PROMPT. Prints only the completion on stdout; statistics go to stderr."""
    if prompt_file is not None:
        prompt = prompt_file.read()
    if not prompt:
        raise click.UsageError("give a PROMPT or --prompt-file")
    pair = models.open_pair(config)
    config = runnable_config(pair, config)
    try:
        if as_json:
            result = pair.generate(prompt, config, grammar=grammar)
            out = {"text": result.text, "finish_reason": result.finish_reason, "stats": result.stats.as_dict()}
            if result.logprobs is not None:  # --logprobs N: [{token, logprob, top: [[token, logprob], ...]}]
                out["logprobs"] = [{"token": t, "logprob": lp.logprob, "top": lp.top} for t, lp in zip(result.tokens, result.logprobs)]
            click.echo(json.dumps(out))
            return
        stats = None
        try:
            for event in pair.stream(prompt, config, grammar=grammar):
                if hasattr(event, "stats"):
                    stats = event.stats
                else:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)
        sys.stdout.write("\n")
        if stats is not None:
            click.echo(format_stats(stats), err=True)
    finally:
        pair.close()
