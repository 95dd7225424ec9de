"""What the commands share: error handling, the model options (one `ModelOptions` per command),
the decoding options (one `GenerationConfig`), and the parsing of list flags."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import click

from cospec_local.backend import KERNELS
from cospec_local.config import COMBINATIONS, DRAFT_SOURCES, GRAMMAR_ASSISTS, MODES, GenerationConfig, config_fields, parse_list
from cospec_local.errors import CospecError
from cospec_local.modes import mode_class


def handle_errors(fn):
    """Turn our errors and bad values into one clear line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CospecError, ValueError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


# -- constrained output -----------------------------------------------------------------------------


def grammar_options(fn):
    """--json-schema FILE and --grammar FILE (GBNF or Lark), passed on as `grammar` (a checked
    `Grammar`, or None)."""

    @click.option("--json-schema", "json_schema", type=click.File("r"),
                  help="Constrain the output to JSON valid under this JSON schema file ('-' for stdin).")
    @click.option("--grammar", "grammar_file", type=click.File("r"),
                  help="Constrain the output to this grammar file (GBNF, as llama.cpp's grammars/, or Lark).")
    @functools.wraps(fn)
    def wrapper(*args, json_schema=None, grammar_file=None, **kwargs):
        from cospec_local.grammar import Grammar

        if json_schema is not None and grammar_file is not None:
            raise click.UsageError("give --json-schema or --grammar, not both")
        grammar = None
        if json_schema is not None:
            grammar = Grammar.json_schema(json_schema.read())
        elif grammar_file is not None:
            grammar = Grammar.gbnf(grammar_file.read())
        if grammar is not None:
            try:
                grammar.compile()  # a bad file is an error now, before any model loads
            except ValueError as e:
                raise click.ClickException(str(e)) from e
        return fn(*args, grammar=grammar, **kwargs)

    return wrapper


# -- the models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    """Which models a command loads and how: the flags `model_options` adds."""

    draft: str | None = None
    target: str | None = None
    extra: tuple[str, ...] = ()  # --model (repeatable): further models for the collaborative modes
    target_ngl: int = 0
    draft_ngl: int = 0
    ctx_size: int = 4096
    threads: int | None = None
    draft_threads: int | None = None
    verbose: bool = False
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers taking the target's offloaded layers
    draft_rpc: tuple[str, ...] = ()  # ... and the draft's
    kernels: str = "exact"

    @property
    def offloaded(self) -> bool:
        """Whether any layer goes to a GPU (local or RPC)."""
        return self.target_ngl > 0 or self.draft_ngl > 0

    def with_(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)

    def open_pair(self, config: GenerationConfig | None = None, *, need_draft: bool | None = None):
        """Load the requested pair; with no model flags, the default pair (built on first use). A draft
        is required when `need_draft` says so; left out, when `config`'s mode needs one (always
        without a `config`)."""
        from cospec_local import default_pair, load_pair

        if need_draft is None:
            need_draft = mode_class(config).needs_draft(config) if config is not None else True
        draft, target = self.draft, self.target
        if target is None and draft is None:
            draft, target = default_pair()
        elif target is None:
            raise click.UsageError("--draft needs --target")
        if draft is None and need_draft:
            raise click.UsageError("this mode needs a draft: pass --draft, or --mode target")
        return load_pair(
            draft, target, models=self.extra, n_ctx=self.ctx_size, n_threads=self.threads, draft_threads=self.draft_threads,
            target_ngl=self.target_ngl, draft_ngl=self.draft_ngl, verbose=self.verbose, target_rpc=self.rpc,
            draft_rpc=self.draft_rpc, kernels=self.kernels,
        )


def runnable_config(pair, config: GenerationConfig) -> GenerationConfig:
    """`config` as `pair` runs it: without a draft, the mode's fallback (spec decodes with the target alone)."""
    return mode_class(config).without_draft(config) if pair.draft is None else config


def _hosts(text: str | None) -> tuple[str, ...]:
    """'a:1, b:2' -> ('a:1', 'b:2')."""
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def _model_flags() -> list:
    return [
        click.option("--draft", type=click.Path(dir_okay=False), help="Draft GGUF (default: the default pair's draft)."),
        click.option("--target", type=click.Path(dir_okay=False), help="Target GGUF (default: Gemma 3 270M)."),
        click.option("--model", "extra", multiple=True, type=click.Path(dir_okay=False),
                     help="A further model for the collaborative modes (repeatable; same vocabulary as the target)."),
        click.option("--target-ngl", type=int, default=0, show_default=True, help="Target layers offloaded to the GPU."),
        click.option("--draft-ngl", type=int, default=0, show_default=True, help="Draft layers offloaded to the GPU."),
        click.option("--ctx-size", type=int, default=4096, show_default=True, help="Context size (tokens) of each model."),
        click.option("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all cores, or half on big machines)."),
        click.option("--draft-threads", type=int, default=None, help="CPU threads for the draft (default: --threads; 1 often suits a very small draft, whose calls are too short to split)."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
        click.option("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                     help="Offload the target's layers (--target-ngl) to these llama.cpp RPC servers "
                     "(`cospec-local rpc-server` on the other machine); the draft stays local."),
        click.option("--draft-rpc", default=None, metavar="HOST:PORT[,...]", help="RPC servers for the draft's offloaded layers (--draft-ngl)."),
        click.option("--kernels", type=click.Choice(KERNELS), default="exact", show_default=True,
                     help="exact: bit-exact verification (greedy output token-for-token target-only's); fast: llama.cpp's "
                     "own kernels (repacked weights, flash attention), greedy output equal up to near-ties. See README."),
    ]


def model_options(fn):
    """--draft/--target and how to load them, passed to the command as one `models: ModelOptions`."""
    names = [f.name for f in dataclasses.fields(ModelOptions)]

    @functools.wraps(fn)
    def with_models(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        values.update(extra=tuple(values["extra"]), rpc=_hosts(values["rpc"]), draft_rpc=_hosts(values["draft_rpc"]))
        return fn(*args, models=ModelOptions(**values), **kwargs)

    for option in reversed(_model_flags()):
        with_models = option(with_models)
    return with_models


# -- the decoding config ----------------------------------------------------------------------------


def generation_options(fn=None, *, exclude=(), base: GenerationConfig | None = None):
    """One flag per GenerationConfig field, passed to the command as one `config: GenerationConfig`:
    `base` (default: GenerationConfig()) with the flags given applied. The help shows `base`'s
    values as defaults; `exclude` leaves fields out (they keep `base`'s values)."""
    if fn is None:
        return lambda f: generation_options(f, exclude=exclude, base=base)
    base = base or GenerationConfig()

    @functools.wraps(fn)
    def with_config(*args, **kwargs):
        try:
            config = build_config(base, kwargs)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
        return fn(*args, config=config, **kwargs)

    for name, default, help_text, flag, items in reversed(config_fields()):
        if name not in exclude:
            with_config = _config_flag(name, default, getattr(base, name), help_text, flag, items)(with_config)
    return with_config


def _config_flag(name, field_default, default, help_text, flag, items):
    """The click option of one config field (`default`: the value the help names)."""
    decls = flag.split("/") if flag else ["--" + name.replace("_", "-")]
    choices = {"draft_source": DRAFT_SOURCES, "combine": COMBINATIONS, "mode": MODES, "grammar_assist": GRAMMAR_ASSISTS}
    if items is not None:
        return click.option(*decls, name, type=str, default=None, help=help_text)
    if name in choices:
        return click.option(*decls, name, type=click.Choice(choices[name]), default=None, help=help_text + f" [default: {default}]")
    if name == "stop":
        return click.option(*decls, name, multiple=True, help=help_text)
    if isinstance(field_default, bool):
        return click.option(f"--{name}/--no-{name}", default=None, help=help_text + f" [default: {default}]")
    kind = type(field_default) if field_default is not None else _optional_type(name)
    return click.option(*decls, name, type=kind, default=None, help=help_text + f" [default: {default}]")


def _optional_type(name: str) -> type:
    """The click type of a config field whose default is None ('int | None' -> int)."""
    annotation = {f.name: f.type for f in dataclasses.fields(GenerationConfig)}[name]
    return next(t for t in (int, float, str) if t.__name__ in str(annotation))


def build_config(base: GenerationConfig, kwargs: dict) -> GenerationConfig:
    """`base` with the config flags in `kwargs` applied (and popped from it)."""
    changes = {}
    for name, _, _, _, items in config_fields():
        if name in kwargs:
            value = kwargs.pop(name)
            changes[name] = parse_list(value, items) if items is not None and value is not None else value
    if not changes.get("stop"):
        changes.pop("stop", None)
    else:
        changes["stop"] = tuple(changes["stop"])
    return base.with_(**changes)


# -- list flags -------------------------------------------------------------------------------------


def mode_list(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """'target,spec' -> ['target', 'spec']: decoding modes and the command's own `extra` names."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES + tuple(extra)]
    if unknown:
        raise click.UsageError(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    return modes


def family_problems(family: str, n: int, start: int):
    """`n` held-out problems of the test-world task `family` from index `start`."""
    from cospec_local.lab.testworld.tasks import FAMILIES, problems

    if family not in FAMILIES:
        raise click.UsageError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return problems(family, "eval", n, start)
