"""`cospec-local`: the command line. It only parses flags and renders engine events."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import click

from cospec_local.backend import KERNELS
from cospec_local.config import COMBINATIONS, DRAFT_SOURCES, MODES, GenerationConfig, config_fields, parse_list
from cospec_local.errors import CospecError

DIM_GREEN = "\x1b[32m"
RESET = "\x1b[0m"


def _handle_errors(fn):
    """Turn our errors and bad values into one clear line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CospecError, ValueError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def model_options(fn):
    """--draft/--target and how to load them."""
    options = [
        click.option("--draft", type=click.Path(dir_okay=False), help="Draft GGUF (default: the default pair's draft)."),
        click.option("--target", type=click.Path(dir_okay=False), help="Target GGUF (default: Gemma 3 270M)."),
        click.option("--model", "models", multiple=True, type=click.Path(dir_okay=False),
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

    # --rpc/--draft-rpc/--kernels reach open_pair without every command naming them.
    @functools.wraps(fn)
    def with_rpc(*args, rpc=None, draft_rpc=None, kernels="exact", **kwargs):
        _LOAD_FLAGS["target"] = tuple(x.strip() for x in (rpc or "").split(",") if x.strip())
        _LOAD_FLAGS["draft"] = tuple(x.strip() for x in (draft_rpc or "").split(",") if x.strip())
        _LOAD_FLAGS["kernels"] = kernels
        return fn(*args, **kwargs)

    for option in reversed(options):
        with_rpc = option(with_rpc)
    return with_rpc


_LOAD_FLAGS: dict = {"target": (), "draft": (), "kernels": "exact"}  # set by model_options' --rpc/--draft-rpc/--kernels


def generation_options(fn=None, *, exclude=(), defaults=None):
    """One flag per GenerationConfig field, defaults taken from it (`defaults` overrides what the
    help says for commands with other defaults; `exclude` leaves fields out)."""
    if fn is None:
        return lambda f: generation_options(f, exclude=exclude, defaults=defaults)
    for name, default, help_text, flag, items in reversed(config_fields()):
        if name in exclude:
            continue
        default = (defaults or {}).get(name, default)
        decls = flag.split("/") if flag else ["--" + name.replace("_", "-")]
        if items is not None:
            opt = click.option(*decls, name, type=str, default=None, help=help_text)
        elif name == "draft_source":
            opt = click.option(*decls, name, type=click.Choice(DRAFT_SOURCES), default=None, help=help_text + f" [default: {default}]")
        elif name == "combine":
            opt = click.option(*decls, name, type=click.Choice(COMBINATIONS), default=None, help=help_text + f" [default: {default}]")
        elif name == "stop":
            opt = click.option(*decls, name, multiple=True, help=help_text)
        elif name == "mode":
            opt = click.option(*decls, name, type=click.Choice(MODES), default=None, help=help_text + f" [default: {default}]")
        elif isinstance(default, bool):
            opt = click.option(f"--{name}/--no-{name}", default=None, help=help_text + f" [default: {default}]")
        else:
            kind = type(default) if default is not None else _optional_type(name)
            opt = click.option(*decls, name, type=kind, default=None, help=help_text + f" [default: {default}]")
        fn = opt(fn)
    return fn


def _optional_type(name: str) -> type:
    """The click type of a config field whose default is None ('int | None' -> int)."""
    annotation = {f.name: f.type for f in dataclasses.fields(GenerationConfig)}[name]
    return next(t for t in (int, float, str) if t.__name__ in str(annotation))


def build_config(base: GenerationConfig, kwargs: dict) -> GenerationConfig:
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


def needs_draft(config: GenerationConfig) -> bool:
    """Whether the decoding `config` asks for needs a draft model."""
    if config.mode == "spec":
        return config.draft_source != "ngram"
    return config.mode in ("draft", "cospec")


def open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, need_draft=True):
    """Load the requested pair; with no model flags, the default pair (built on first use)."""
    from cospec_local import default_pair, load_pair

    if target is None and draft is None:
        draft, target = default_pair()
    elif target is None:
        raise click.UsageError("--draft needs --target")
    if draft is None and need_draft:
        raise click.UsageError("this mode needs a draft: pass --draft, or --mode target")
    return load_pair(
        draft, target, models=tuple(models), n_ctx=ctx_size, n_threads=threads, draft_threads=draft_threads, target_ngl=target_ngl,
        draft_ngl=draft_ngl, verbose=verbose, target_rpc=_LOAD_FLAGS["target"], draft_rpc=_LOAD_FLAGS["draft"],
        kernels=_LOAD_FLAGS["kernels"],
    )


def format_stats(stats) -> str:
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
    if s.n_generated:
        parts.append(f"{s.model_calls_per_token:.2f} model calls/token")
    times = ", ".join(f"{name} {t:.2f}s" for name, t in s.t_models.items())
    parts.append(f"time: {times + ', ' if times else ''}python {s.t_overhead:.2f}s")
    return " | ".join(parts)


@click.group()
@click.version_option(package_name="cospec-local")
def cli():
    """Speculative and collaborative decoding of GGUF model pairs on llama.cpp."""


@cli.command()
@model_options
@generation_options
@click.option("--system", default=None, help="System message.")
@click.option("--color/--no-color", default=None, help="Colour accepted proposed tokens (default: on a terminal).")
@_handle_errors
def chat(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, system, color, **kwargs):
    """Interactive chat (reads messages from stdin when piped). Commands: /stats /reset /exit."""
    config = build_config(GenerationConfig(), kwargs)
    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, need_draft=needs_draft(config))
    if pair.draft is None and config.mode == "spec" and config.draft_source != "ngram":  # only a target: decode with it alone
        config = config.with_(mode="target")
    session = pair.chat(system)
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty() if color is None else color
    if interactive:
        click.echo(f"cospec-local chat ({config.mode} mode, template: {session.template.name}). /stats /reset /exit", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo("", err=True)
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if message == "/stats":
            # The conversation keeps the last reply's statistics, also of a reply cut by Ctrl-C.
            last_stats = session.conversation.last_stats
            click.echo(format_stats(last_stats) if last_stats else "(no reply yet)", err=True)
            continue
        started = False  # the reply's leading space (after "Assistant:") is not worth printing
        try:
            for event in session.send(message, config):
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
    pair.close()


@cli.command()
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.File("r"), help="Read the prompt from a file ('-' for stdin).")
@model_options
@generation_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with the text and stats.")
@_handle_errors
def generate(prompt, prompt_file, draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, as_json, **kwargs):
    """Complete PROMPT. Prints only the completion on stdout; statistics go to stderr."""
    if prompt_file is not None:
        prompt = prompt_file.read()
    if not prompt:
        raise click.UsageError("give a PROMPT or --prompt-file")
    config = build_config(GenerationConfig(), kwargs)
    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, need_draft=needs_draft(config))
    if pair.draft is None and config.mode == "spec" and config.draft_source != "ngram":  # only a target: decode with it alone
        config = config.with_(mode="target")
    try:
        if as_json:
            result = pair.generate(prompt, config)
            click.echo(json.dumps({"text": result.text, "finish_reason": result.finish_reason, "stats": result.stats.as_dict()}))
            return
        stats = None
        try:
            for event in pair.stream(prompt, config):
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


@cli.command()
@model_options
@_handle_errors
def info(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose):
    """Report on a pair: vocabularies, token map, sizes, chat template, and how llama.cpp was built."""
    from cospec_local.backend import build_info

    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, need_draft=False)
    for role, model in (("target", pair.target), ("draft", pair.draft), *((f"model{i}", m) for i, m in enumerate(pair.extra, 1))):
        if model is None:
            continue
        click.echo(
            f"{role}: {model.path}\n  {model.metadata.get('general.architecture', '?')}, {model.n_params() / 1e6:.1f}M params, "
            f"{model.n_layer()} layers, vocab {model.n_vocab}, n_ctx {model.n_ctx}, {model.n_threads} threads"
        )
    r = pair.report
    if r is not None:
        click.echo(f"pair: compatible ({r.vocab_type} tokenizer {r.tokenizer}); vocabularies: target {r.target_vocab}, "
                   f"draft {r.draft_vocab} tokens")
        if r.trimmed:
            click.echo(f"  trimmed draft vocabulary: {r.draft_vocab} of {r.target_vocab} tokens ({r.n_missing} target tokens map to the draft's unknown token)")
        elif r.padded:
            click.echo(f"  padded pair: the target has {r.n_missing} extra tokens past the draft's vocabulary (never "
                       "proposed; fed to the draft as its unknown/padding token)")
        else:
            click.echo("  identical vocabularies")
    build = build_info()
    click.echo(f"llama.cpp build: {build.system_info}")  # a build this CPU cannot run was refused at load
    offloaded = target_ngl > 0 or draft_ngl > 0
    click.echo(f"kernels: {pair.kernels}; {build.guarantee(pair.kernels, offloaded)}")
    click.echo(f"chat template: {'from the GGUF' if pair.target.chat_template else 'none (fallback User:/Assistant: transcript)'}")
    pair.close()


@cli.command("make-draft")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the draft GGUF.")
@click.option("--vocab-size", default=16384, show_default=True, help="Number of frequent tokens to keep (special and byte tokens are added).")
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Text file(s) to count token frequencies on (default: the shipped corpus).")
@click.option("--drop-layers", default="", help="Comma-separated layer indices to remove (lossy without retraining).")
@_handle_errors
def make_draft_cmd(source, output, vocab_size, corpus, drop_layers):
    """Make a cheaper draft from SOURCE by trimming its vocabulary (and optionally layers)."""
    from cospec_local.draft_maker import make_draft
    from cospec_local.default_pair import corpus_files

    drop = [int(x) for x in drop_layers.split(",") if x.strip()]
    report = make_draft(source, output, corpus or corpus_files(), vocab_size, drop)
    click.echo(
        f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB): {report.draft_vocab} of {report.source_vocab} tokens "
        f"({report.n_frequent} frequent + {report.n_special} special/byte), {report.n_layers_draft}/{report.n_layers_source} layers; "
        f"corpus coverage {report.corpus_coverage:.2%} of {report.corpus_tokens} tokens"
    )


def _mode_list(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES + extra]
    if unknown:
        raise click.UsageError(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    return modes


def _problem_prompts(family: str, n: int, start: int):
    from cospec_local.lab.testworld.tasks import FAMILIES, problems

    if family not in FAMILIES:
        raise click.UsageError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return problems(family, "eval", n, start)


BENCH_DEFAULTS = {"temperature": 0.0, "max_tokens": 128}


@cli.command()
@model_options
@generation_options(exclude=("mode",), defaults=BENCH_DEFAULTS)
@click.option("--modes", default="spec", show_default=True, help="Comma-separated modes to measure against the baseline; "
              "'ngram' and 'ngram+model' are spec mode with that --draft-source.")
@click.option("--baseline", default="target", show_default=True, type=click.Choice(MODES), help="Mode the speedups are measured against (collab for the CoS modes).")
@click.option("--repeats", default=3, show_default=True, help="Repetitions (each runs every prompt in every mode).")
@click.option("--sweep-k", default="", help="Also run spec with fixed draft lengths, e.g. 1,2,4,6.")
@click.option("--family", default=None, help="Prompts: held-out problems of test-world task families (add, count, or add,count) instead of the default English prompts.")
@click.option("--num-prompts", default=6, show_default=True, help="Problems taken from each --family.")
@click.option("--prompts", "prompt_set", type=click.Choice(["open", "grounded"]), default="open", show_default=True,
              help="Prompt set: open-ended English prompts, or input-grounded ones (quote, edit code, answer from a "
              "document, continue a table) where n-gram drafts pay.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Save the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Save a PNG: speedup vs k, accepted-length histogram.")
@_handle_errors
def bench(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, modes, baseline, repeats, sweep_k,
          family, num_prompts, prompt_set, out_path, plot_path, **kwargs):
    """Modes against a baseline (tokens/s and model calls per token), interleaved, with the formula's prediction."""
    from cospec_local.lab.bench import PROMPT_SETS, plot_report, run_bench
    from cospec_local.lab.testworld.tasks import TASK_STOP

    mode_list = _mode_list(modes, ("ngram", "ngram+model"))
    config = build_config(GenerationConfig(**BENCH_DEFAULTS), kwargs)
    prompts = PROMPT_SETS[prompt_set]
    if family:
        # Held-out problems past the first 10k (eval's range), num_prompts of each listed family.
        prompts = [p.prompt for name in family.split(",") for p in _problem_prompts(name.strip(), num_prompts, 10_000)]
        config = config.with_(stop=tuple(config.stop) + TASK_STOP)
    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose)
    try:
        ks = [int(x) for x in sweep_k.split(",") if x.strip()]
        report = run_bench(pair, prompts, config.max_tokens, repeats, config, ks, modes=mode_list, baseline=baseline)
    finally:
        pair.close()
    report["models"] = [str(slot.model.path) for slot in pair.engine.slots]
    from cospec_local.backend import build_info

    build = build_info()
    report["kernels"] = pair.kernels
    report["llama_cpp_build"] = build.system_info
    report["guarantee"] = build.guarantee(pair.kernels, target_ngl > 0 or draft_ngl > 0)
    click.echo(f"kernels: {pair.kernels} ({report['guarantee']}); llama.cpp: {build.system_info}")
    c = report["costs"]
    others = ", ".join(f"{name} call {ms:.2f} ms" for name, ms in c["call_ms"].items())
    click.echo(f"cost: target call {c['target_call_ms']:.2f} ms{', ' + others if others else ''}"
               + (f", c = {c['c']:.3f}" if "c" in c else ""))
    click.echo("verify call by logit rows (ms): " + ", ".join(f"{n}: {v:.1f}" for n, v in c["verify_ms_by_rows"].items()))
    b = report["modes"][baseline]
    click.echo(f"{baseline}: {b['tok_s_median']:.1f} tok/s (median of {repeats}), {b['calls_per_token']:.2f} model calls/token, "
               f"{b['outside_llama_us_per_token']:.0f} us/token outside llama.cpp")
    for name, m in report["modes"].items():
        if name == baseline:
            continue
        line = (f"{name}: {m['tok_s_median']:.1f} tok/s, speedup {m['speedup_median']:.2f}x in wall time, "
                f"{m['calls_speedup']:.2f}x in model calls ({m['calls_per_token']:.2f}/token); "
                f"acceptance {m['acceptance_rate']:.1%} (alpha {m['alpha']:.3f}, mean proposal {m['mean_draft_length']:.2f}, "
                f"mean accepted {m['mean_accepted_length']:.2f})")
        if m["predicted_speedup"]:
            line += f"; formula {m['predicted_speedup']:.2f}x ({m['achieved_over_predicted']:.0%} of it)"
        if "predicted_speedup_with_verify_cost" in m:
            line += (f"; with the measured verification cost {m['predicted_speedup_with_verify_cost']:.2f}x "
                     f"({m['achieved_over_predicted_with_verify_cost']:.0%} of it)")
        if "ceiling_free_draft" in m:
            line += f"; ceiling with a cost-free draft {m['ceiling_free_draft']:.2f}x"
        line += f"; python overhead {m['python_overhead_share']:.1%}, {m['outside_llama_us_per_token']:.0f} us/token outside llama.cpp"
        if m[f"greedy_output_identical_to_{baseline}"] is False:
            line += f"  OUTPUT DIFFERS FROM {baseline.upper()}"
        click.echo(line)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        click.echo(f"saved {out_path}")
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"saved {plot_path}")


EVAL_DEFAULTS = {"temperature": 0.0, "max_tokens": 160}


@cli.command("eval")
@model_options
@generation_options(exclude=("mode",), defaults=EVAL_DEFAULTS)
@click.option("--family", default=None, help="Built-in task family (add, count).")
@click.option("--tasks", "tasks_path", type=click.Path(exists=True, dir_okay=False), help='JSONL file of {"prompt", "answer"} lines.')
@click.option("-n", "--num-problems", default=100, show_default=True, help="Problems to run (held-out split for families).")
@click.option("--start", default=0, show_default=True, help="Index of the first held-out problem.")
@click.option("--modes", default="target,draft,spec", show_default=True,
              help="Comma-separated modes to compare: decoding modes, plus rule (cospec with the fixed-threshold rule) and oracle (knows the answer, may swap the first disagreement only).")
@click.option("--rule", default=None, help="Thresholds TAU,RHO of the rule mode (default: those fitted with the policy).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Save the report as JSON.")
@_handle_errors
def eval_cmd(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, family, tasks_path, num_problems,
             start, modes, rule, out_path, **kwargs):
    """Accuracy (95% CI), tokens/s, model calls and acceptance of decoding modes on checkable problems."""
    from cospec_local.lab.evaluate import evaluate, format_table
    from cospec_local.lab.testworld.tasks import TASK_STOP
    from cospec_local.lab.testworld.tasks import load_jsonl_tasks

    if (family is None) == (tasks_path is None):
        raise click.UsageError("give exactly one of --family or --tasks")
    probs = _problem_prompts(family, num_problems, start) if family else load_jsonl_tasks(tasks_path)[start : start + num_problems]
    if not probs:
        raise click.UsageError("no problems to run")
    mode_list = _mode_list(modes, extra=("rule", "oracle"))
    config = build_config(GenerationConfig(**EVAL_DEFAULTS, stop=TASK_STOP), kwargs)
    config = config.with_(stop=tuple(dict.fromkeys(config.stop + TASK_STOP)))
    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose,
                     need_draft=bool({"spec", "draft", "cospec", "rule", "oracle"} & set(mode_list)))
    try:
        rule_thresholds = None
        if "rule" in mode_list:
            if rule:
                rule_thresholds = parse_list(rule, float)
                if len(rule_thresholds) != 2:
                    raise click.UsageError("--rule takes two values: TAU,RHO")
            else:  # the thresholds fitted on training problems, stored with the policy
                meta = pair.engine.load_policy(config.policy).metadata
                if "cospec.rule_tau" not in meta:
                    raise click.UsageError("mode 'rule' needs --rule TAU,RHO (this policy stores no fitted rule)")
                rule_thresholds = (float(meta["cospec.rule_tau"]), float(meta["cospec.rule_rho"]))
        for mode in mode_list:
            if mode not in ("rule", "oracle"):
                pair.engine.check(config.with_(mode=mode))  # fail before the first problem
        if "cospec" in mode_list:
            pair.engine.load_policy(config.policy)
        report = evaluate(pair, probs, mode_list, config, rule=rule_thresholds)
        report["rule"] = rule_thresholds
    finally:
        pair.close()
    report["source"] = family or tasks_path
    click.echo(format_table(report))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        click.echo(f"saved {out_path}")


@cli.command("train-policy")
@model_options
@click.option("--family", default="add,count", show_default=True, help="Task families to train on (fresh seeded problems, never the eval range).")
@click.option("--tasks", "tasks_path", type=click.Path(exists=True, dir_okay=False), help='JSONL file of {"prompt", "answer"} lines instead (last 20% held out).')
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Where to write the ONNX policy (a .json report goes beside it).")
@click.option("--epochs", default=12, show_default=True)
@click.option("--batches-per-epoch", default=4, show_default=True)
@click.option("--problems-per-batch", default=16, show_default=True)
@click.option("--group-size", default=8, show_default=True, help="Rollouts per problem (the group whose mean reward is the baseline).")
@click.option("--hidden", default=16, show_default=True, help="Hidden units of the policy MLP.")
@click.option("--lr", default=0.03, show_default=True)
@click.option("--cost", default=0.0, show_default=True, help="Reward penalty per target call per generated token.")
@click.option("--seed", default=0, show_default=True)
@click.option("--held-out", default=100, show_default=True, help="Held-out problems per family, scored every epoch.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (--out + .ckpt).")
@click.option("--fit-rule/--no-fit-rule", default=True, show_default=True, help="Also fit the fixed-threshold rule baseline on training problems (stored in the policy's metadata).")
@click.option("--compare-supervised", default=0, show_default=True, help="Also train the supervised baseline on oracle labels from this many training problems and report both.")
@click.option("--init-supervised", is_flag=True, help="Start the RL run from that supervised baseline instead of random weights (needs --compare-supervised N).")
@_handle_errors
def train_policy_cmd(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, family, tasks_path,
                     out_path, epochs, batches_per_epoch, problems_per_batch, group_size, hidden, lr, cost, seed, held_out,
                     resume, fit_rule, compare_supervised, init_supervised):
    """Train the CoSpec arbitration policy by reinforcement learning (group-relative policy gradient)."""
    from cospec_local.lab.testworld.tasks import load_jsonl_tasks
    from cospec_local.lab.training import TaskSource, TrainSettings, accuracy, fit_rule as fit_rule_fn, oracle_labels, train_policy, train_supervised

    families = tuple(f.strip() for f in family.split(",") if f.strip())
    for name in families:
        _problem_prompts(name, 1, 0)  # unknown family: a clear error now
    if init_supervised and not compare_supervised:
        raise click.UsageError("--init-supervised needs --compare-supervised N (the problems to label)")
    if tasks_path:
        tasks, families = TaskSource(items=load_jsonl_tasks(tasks_path)), ()
    else:
        tasks = TaskSource(families)
    settings = TrainSettings(families=families, tasks=str(tasks_path) if tasks_path else None, epochs=epochs, batches_per_epoch=batches_per_epoch,
                             problems_per_batch=problems_per_batch, group_size=group_size, hidden=hidden, lr=lr,
                             cost=cost, seed=seed, held_out=held_out)
    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose)
    report = {}
    try:
        rule = None
        if fit_rule:
            rule_policy, rule_accuracy = fit_rule_fn(pair, tasks.train_set(100))
            rule = (rule_policy.tau, rule_policy.rho)
            report["rule"] = {"tau": rule[0], "rho": rule[1], "train_accuracy": rule_accuracy,
                              "held_out_accuracy": accuracy(pair, rule_policy, tasks.held_out(held_out))}
            click.echo(f"rule: keep when q(x) > {rule[0]} and p(y) < {rule[1]} (train accuracy {rule_accuracy:.3f}, "
                       f"held-out {report['rule']['held_out_accuracy']:.3f})")
        supervised = None
        if compare_supervised:
            t0 = time.perf_counter()
            x, y = oracle_labels(pair, tasks.train_set(compare_supervised))
            supervised = train_supervised(x, y, hidden=hidden, seed=seed)
            report["supervised"] = {"labels": int(len(y)), "positive": int(y.sum()), "seconds": time.perf_counter() - t0,
                                    "held_out_accuracy": accuracy(pair, supervised, tasks.held_out(held_out))}
            click.echo(f"supervised baseline on {len(y)} oracle labels: held-out accuracy "
                       f"{report['supervised']['held_out_accuracy']:.3f}")
        report.update(train_policy(pair, out_path, settings, tasks, resume=resume, rule=rule,
                                   init=supervised if init_supervised else None))
        history = report["settings"]["history"]
        click.echo(f"held-out accuracy {history[0]['held_out_accuracy']:.3f} -> {history[-1]['held_out_accuracy']:.3f} "
                   f"(exported epoch {report['exported_epoch']}) in {report['seconds']:.0f} s; wrote {out_path}")
    finally:
        pair.close()
    Path(out_path).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")


@cli.command()
@model_options
@generation_options(exclude=("max_tokens", "stop", "seed"))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default; anything else is reachable from other machines).")
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port.")
@click.option("--parallel", "-np", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Conversations decoded at once (slots). Each slot has its own KV caches; all share one copy of the weights. "
              "More requests wait in a queue.")
@click.option("--api-key", envvar="COSPEC_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' (also $COSPEC_API_KEY).")
@click.option("--model-id", default=None, help="Model name reported by /v1/models (default: the target file's name).")
@_handle_errors
def serve(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose, host, port, parallel, api_key, model_id, **kwargs):
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (streaming or not),
    /v1/models, /health, /metrics. The decoding flags set the defaults; a request may override
    them with the extension fields mode, draft_max, combine, weights, mu, gamma, threshold, top_k, min_p."""
    try:
        from cospec_local.server import ServerSettings
        from cospec_local.server import serve as run_server
    except ImportError as e:
        raise click.ClickException(f"the server needs the 'server' extra: pip install 'cospec-local[server]' ({e})") from e
    from cospec_local.backend import default_threads, is_loopback

    config = build_config(GenerationConfig(), kwargs)
    if threads is None:  # the slots decode side by side: share the cores between them
        threads = max(1, default_threads() // parallel)
    pair = open_pair(draft, target, models, target_ngl, draft_ngl, ctx_size, threads, draft_threads, verbose,
                     need_draft=needs_draft(config))
    try:
        if pair.draft is None and config.mode == "spec" and config.draft_source != "ngram":
            config = config.with_(mode="target")
        pair.engine.check(config)  # a default mode these models cannot run fails now, not per request
        if config.mode == "cospec" or config.policy:
            pair.engine.load_policy(config.policy)  # a bad policy file fails now
        settings = ServerSettings(model_id or pair.target.path.stem, config, api_key)
        if not is_loopback(host):
            click.echo(f"warning: binding {host}: the server is reachable from other machines"
                       + ("" if api_key else " and anyone can use it (set --api-key)"), err=True)

        def ready(url):
            click.echo(f"cospec-local serving {settings.model_id} on {url} ({parallel} slot{'s' if parallel > 1 else ''}, "
                       f"{config.mode} mode by default, {threads} thread{'s' if threads > 1 else ''} per slot); Ctrl-C stops", err=True)

        run_server(pair, settings, host, port, parallel, threads, draft_threads, on_ready=ready)
    finally:
        pair.close()


@cli.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="TCP port.")
@click.option("--threads", type=int, default=None, help="CPU threads for the computations (default: all cores, or half on big machines).")
@_handle_errors
def rpc_server(host, port, threads):
    """Lend this machine's GPUs (else its CPU) to llama.cpp RPC clients (`--rpc HOST:PORT` on another
    machine). RPC has NO authentication: anyone who can reach the port can use it."""
    import threading

    from cospec_local.backend import default_threads, is_loopback, start_rpc_server

    import ipaddress
    import socket

    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise click.UsageError(f"--host {host}: llama.cpp's RPC server binds IPv4 addresses only (e.g. 127.0.0.1, 0.0.0.0)")
    if not is_loopback(host):
        click.echo(f"warning: binding {host}: llama.cpp's RPC has no authentication or encryption; anyone who can "
                   f"reach {host}:{port} can run computations on this machine. Use it only on a trusted network.", err=True)
    # llama.cpp's server returns silently when it cannot listen: try the address first.
    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}")
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


def main():
    cli()


if __name__ == "__main__":
    main()
