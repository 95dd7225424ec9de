"""`cospec-local rpc-server`: lend this machine to llama.cpp RPC clients."""

from __future__ import annotations

import click

from .options import handle_errors


@click.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="TCP port.")
@click.option("--threads", type=int, default=None, help="CPU threads for the computations (default: all cores, or half on big machines).")
@handle_errors
def rpc_server(host, port, threads):
    """Lend this machine's GPUs (else its CPU) to llama.cpp RPC clients (`--rpc HOST:PORT` on another
    machine). RPC has NO authentication: anyone who can reach the port can use it."""
    import threading

    from cospec_local.backend import default_threads, is_loopback, start_rpc_server

    host = _ipv4(host)
    if not is_loopback(host):
        click.echo(f"warning: binding {host}: llama.cpp's RPC has no authentication or encryption; anyone who can "
                   f"reach {host}:{port} can run computations on this machine. Use it only on a trusted network.", err=True)
    _check_free(host, port)
    errors = []

    def run():
        try:
            start_rpc_server(host, port, threads or default_threads())
        except Exception as e:  # reported by the main thread
            errors.append(e)

    # llama.cpp's server loop never returns: it runs on a daemon thread so Ctrl-C ends the process.
    server = threading.Thread(target=run, daemon=True)
    server.start()
    server.join(0.5)
    if errors:
        raise errors[0]
    if not server.is_alive():
        raise click.ClickException(f"llama.cpp's RPC server did not start on {host}:{port} (see its output above)")
    click.echo(f"cospec-local rpc-server listening on {host}:{port}; Ctrl-C stops", err=True)
    try:
        while server.is_alive():
            server.join(1.0)
    except KeyboardInterrupt:
        click.echo("(stopped)", err=True)
        return
    raise click.ClickException(errors[0] if errors else "llama.cpp's RPC server stopped")


def _ipv4(host: str) -> str:
    """`host` as an IPv4 address, which is all llama.cpp's RPC server binds ('localhost' -> 127.0.0.1)."""
    import ipaddress

    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise click.UsageError(f"--host {host}: llama.cpp's RPC server binds IPv4 addresses only (e.g. 127.0.0.1, 0.0.0.0)")
    return host


def _check_free(host: str, port: int) -> None:
    """Fail clearly when `host:port` cannot be listened on (llama.cpp's server returns silently then)."""
    import socket

    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}")
