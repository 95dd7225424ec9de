"""`cospec-local`: the command line. It only parses flags and renders engine events and reports;
each command lives in its own module, the shared options in `options`."""

from __future__ import annotations

import click

from .bench import bench
from .chat import chat
from .draft import make_draft_cmd
from .eval import eval_cmd
from .generate import generate
from .info import info
from .rpc import rpc_server
from .serve import serve
from .train import train_policy_cmd


@click.group()
@click.version_option(package_name="cospec-local")
def cli():
    """Speculative and collaborative decoding of GGUF model pairs on llama.cpp."""


for _command in (chat, generate, info, make_draft_cmd, bench, eval_cmd, train_policy_cmd, serve, rpc_server):
    cli.add_command(_command)


def main():
    cli()


if __name__ == "__main__":
    main()
