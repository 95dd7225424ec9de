"""`cospec-local eval`: accuracy and speed of decoding modes on checkable problems, as a table."""

from __future__ import annotations

import json

import click

from cospec_local.config import GenerationConfig, parse_list

from .options import family_problems, generation_options, handle_errors, mode_list, model_options

EVAL_DEFAULTS = {"temperature": 0.0, "max_tokens": 160}


@click.command("eval")
@model_options
@generation_options(exclude=("mode",), base=GenerationConfig(**EVAL_DEFAULTS))
@click.option("--family", default=None, help="Built-in task family (add, count).")
@click.option("--tasks", "tasks_path", type=click.Path(exists=True, dir_okay=False), help='JSONL file of {"prompt", "answer"} lines.')
@click.option("-n", "--num-problems", default=100, show_default=True, help="Problems to run (held-out split for families).")
@click.option("--start", default=0, show_default=True, help="Index of the first held-out problem.")
@click.option("--modes", default="target,draft,spec", show_default=True,
              help="Comma-separated modes to compare: decoding modes, plus rule (cospec with the fixed-threshold rule) and oracle (knows the answer, may swap the first disagreement only).")
@click.option("--rule", default=None, help="Thresholds TAU,RHO of the rule mode (default: those fitted with the policy).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Save the report as JSON.")
@handle_errors
def eval_cmd(models, config, family, tasks_path, num_problems, start, modes, rule, out_path):
    """Accuracy (95% CI), tokens/s, model calls and acceptance of decoding modes on checkable problems."""
    from cospec_local.lab.evaluate import LAB_MODES, needs_draft, run_evaluation
    from cospec_local.lab.testworld.tasks import load_jsonl_tasks

    if (family is None) == (tasks_path is None):
        raise click.UsageError("give exactly one of --family or --tasks")
    probs = family_problems(family, num_problems, start) if family else load_jsonl_tasks(tasks_path)[start : start + num_problems]
    if not probs:
        raise click.UsageError("no problems to run")
    mode_names = mode_list(modes, extra=LAB_MODES)
    thresholds = None
    if rule:
        thresholds = parse_list(rule, float)
        if len(thresholds) != 2:
            raise click.UsageError("--rule takes two values: TAU,RHO")
    pair = models.open_pair(need_draft=needs_draft(mode_names, config))
    try:
        report = run_evaluation(pair, probs, mode_names, config, rule=thresholds, source=family or tasks_path)
    finally:
        pair.close()
    click.echo(format_table(report))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        click.echo(f"saved {out_path}")


def format_table(report: dict) -> str:
    """A plain-text table of an `evaluate` report: one column per mode."""
    modes = report["modes"]

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    rows = [
        ("accuracy", [pct(m["accuracy"]) for m in modes]),
        ("95% CI", [f"{m['ci95'][0]:.1%}-{m['ci95'][1]:.1%}" for m in modes]),
        ("tok/s", [f"{m['tokens_per_second']:.1f}" for m in modes]),
        ("calls/token", [f"{m['model_calls_per_token']:.2f}" for m in modes]),
        ("target calls/tok", [f"{m['target_calls_per_token']:.2f}" for m in modes]),
        ("overrides", [f"{m['overrides']}/{m['mismatches']}" if m["mismatches"] else "-" for m in modes]),
        ("acceptance", [pct(m["acceptance_rate"]) for m in modes]),
        ("accepted/cycle", ["-" if m["mean_accepted_length"] is None else f"{m['mean_accepted_length']:.2f}" for m in modes]),
    ]
    width = max(13, *(len(m["mode"]) + 2 for m in modes))
    lines = [f"{'':<15}" + "".join(f"{m['mode']:>{width}}" for m in modes)]
    lines += [f"{name:<15}" + "".join(f"{v:>{width}}" for v in values) for name, values in rows]
    return "\n".join(lines)
