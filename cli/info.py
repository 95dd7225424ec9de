"""`cospec-local info`: what a pair is made of and how llama.cpp runs it."""

from __future__ import annotations

import click

from .options import handle_errors, model_options


@click.command()
@model_options
@handle_errors
def info(models):
    """Report on a pair: vocabularies, token map, sizes, chat template, and how llama.cpp was built."""
    from cospec_local.backend import build_info

    pair = models.open_pair(need_draft=False)
    try:
        for line in pair_lines(pair):
            click.echo(line)
        build = build_info()
        click.echo(f"llama.cpp build: {build.system_info}")  # a build this CPU cannot run was refused at load
        click.echo(f"kernels: {pair.kernels}; {build.guarantee(pair.kernels, models.offloaded)}")
        click.echo(f"chat template: {'from the GGUF' if pair.target.chat_template else 'none (fallback User:/Assistant: transcript)'}")
    finally:
        pair.close()


def memory_line(model) -> str:
    """How the model's memory rolls back a rejected proposal."""
    if model.memory == "attention":
        return "attention KV cache (rolls back per position)"
    native = (f"llama.cpp's state snapshots for the last {model.native_snapshots} positions, then "
              if model.native_snapshots else "")
    return f"{model.memory} (recurrent layers): rolls back by {native}copies of the recurrent state per scoring call"


def pair_lines(pair) -> list[str]:
    """The models of `pair` and how their vocabularies match."""
    lines = []
    for role, model in (("target", pair.target), ("draft", pair.draft), *((f"model{i}", m) for i, m in enumerate(pair.extra, 1))):
        if model is None:
            continue
        lines.append(
            f"{role}: {model.path}\n  {model.metadata.get('general.architecture', '?')}, {model.n_params() / 1e6:.1f}M params, "
            f"{model.n_layer()} layers, vocab {model.n_vocab}, n_ctx {model.n_ctx}, {model.n_threads} threads\n"
            f"  memory: {memory_line(model)}"
        )
        if role == "target" and model.n_mtp_layers:
            usable = ("can draft alone (--draft-source mtp)" if model.mtp_unavailable is None
                      else f"cannot draft: {model.mtp_unavailable}")
            lines.append(f"  MTP: {model.n_mtp_layers} multi-token-prediction layer(s): {usable}")
    r = pair.report
    if r is not None:
        lines.append(f"pair: compatible ({r.vocab_type} tokenizer {r.tokenizer}); vocabularies: target {r.target_vocab}, "
                     f"draft {r.draft_vocab} tokens")
        if r.trimmed:
            lines.append(f"  trimmed draft vocabulary: {r.draft_vocab} of {r.target_vocab} tokens ({r.n_missing} target tokens map to the draft's unknown token)")
        elif r.padded:
            lines.append(f"  padded pair: the target has {r.n_missing} extra tokens past the draft's vocabulary (never "
                         "proposed; fed to the draft as its unknown/padding token)")
        else:
            lines.append("  identical vocabularies")
    return lines
