"""`cospec-local serve`: the OpenAI-compatible server."""

from __future__ import annotations

import click

from cospec_local.modes import mode_class

from .options import generation_options, handle_errors, model_options, runnable_config


@click.command()
@model_options
@generation_options(exclude=("max_tokens", "stop", "seed"))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default; anything else is reachable from other machines).")
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port.")
@click.option("--parallel", "-np", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Conversations decoded at once (slots). Each slot has its own KV caches; all share one copy of the weights. "
              "More requests wait in a queue.")
@click.option("--api-key", envvar="COSPEC_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' (also $COSPEC_API_KEY).")
@click.option("--model-id", default=None, help="Model name reported by /v1/models (default: the target file's name).")
@click.option("--shared-ngrams/--no-shared-ngrams", default=False, show_default=True,
              help="Let n-gram proposals (--draft-source ngram or ngram+model) continue from the text of earlier requests "
              "(the same system prompt, repeated documents). Outputs stay the target's, but a request then runs faster when "
              "another one held the same text: a timing side channel between clients. Off by default.")
@handle_errors
def serve(models, config, host, port, parallel, api_key, model_id, shared_ngrams):
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (streaming or not),
    /v1/models, /health, /metrics. The decoding flags set the defaults; a request may override
    any of them (but --policy) with an extension field of the same name (mode, draft_max, draft_source, ...)."""
    try:
        from cospec_local.server import ServerSettings
        from cospec_local.server import serve as run_server
    except ImportError as e:
        raise click.ClickException(f"the server needs the 'server' extra: pip install 'cospec-local[server]' ({e})") from e
    from cospec_local.backend import default_threads, is_loopback

    if models.threads is None:  # the slots decode side by side: share the cores between them
        models = models.with_(threads=max(1, default_threads() // parallel))
    threads = models.threads
    pair = models.open_pair(config)
    try:
        config = runnable_config(pair, config)
        pair.engine.check(config)  # a default mode these models cannot run fails now, not per request
        if mode_class(config).arbitrates or config.policy:
            pair.engine.load_policy(config.policy)  # a bad policy file fails now
        settings = ServerSettings(model_id or pair.target.path.stem, config, api_key, shared_ngrams)
        if not is_loopback(host):
            click.echo(f"warning: binding {host}: the server is reachable from other machines"
                       + ("" if api_key else " and anyone can use it (set --api-key)"), err=True)

        def ready(url):
            click.echo(f"cospec-local serving {settings.model_id} on {url} ({parallel} slot{'s' if parallel > 1 else ''}, "
                       f"{config.mode} mode by default, {threads} thread{'s' if threads > 1 else ''} per slot); Ctrl-C stops", err=True)

        run_server(pair, settings, host, port, parallel, threads, models.draft_threads, on_ready=ready)
    finally:
        pair.close()
