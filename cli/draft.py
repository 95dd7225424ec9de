"""`cospec-local make-draft`: a cheaper draft cut from a bigger model."""

from __future__ import annotations

import click

from .options import handle_errors


@click.command("make-draft")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the draft GGUF.")
@click.option("--vocab-size", default=16384, show_default=True, help="Number of frequent tokens to keep (special and byte tokens are added).")
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Text file(s) to count token frequencies on (default: the shipped corpus).")
@click.option("--drop-layers", default="", help="Comma-separated layer indices to remove (lossy without retraining).")
@handle_errors
def make_draft_cmd(source, output, vocab_size, corpus, drop_layers):
    """Make a cheaper draft from SOURCE by trimming its vocabulary (and optionally layers)."""
    from cospec_local.default_pair import corpus_files
    from cospec_local.draft_maker import make_draft

    drop = [int(x) for x in drop_layers.split(",") if x.strip()]
    report = make_draft(source, output, corpus or corpus_files(), vocab_size, drop)
    click.echo(
        f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB): {report.draft_vocab} of {report.source_vocab} tokens "
        f"({report.n_frequent} frequent + {report.n_special} special/byte), {report.n_layers_draft}/{report.n_layers_source} layers; "
        f"corpus coverage {report.corpus_coverage:.2%} of {report.corpus_tokens} tokens"
    )
