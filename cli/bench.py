"""`cospec-local bench`: decoding modes against a baseline, and the report's rendering."""

from __future__ import annotations

import json

import click

from cospec_local.config import MODES, GenerationConfig, parse_list

from .options import family_problems, generation_options, grammar_options, handle_errors, mode_list, model_options

BENCH_DEFAULTS = {"temperature": 0.0, "max_tokens": 128}


@click.command()
@model_options
@generation_options(exclude=("mode",), base=GenerationConfig(**BENCH_DEFAULTS))
@click.option("--modes", default="spec", show_default=True, help="Comma-separated modes to measure against the baseline; "
              "'ngram', 'ngram+model', 'mtp' and 'ngram+mtp' are spec mode with that --draft-source.")
@click.option("--baseline", default="target", show_default=True, type=click.Choice(MODES), help="Mode the speedups are measured against (collab for the CoS modes).")
@click.option("--repeats", default=3, show_default=True, help="Repetitions (each runs every prompt in every mode).")
@click.option("--sweep-k", default="", help="Also run spec with fixed draft lengths, e.g. 1,2,4,6.")
@click.option("--family", default=None, help="Prompts: held-out problems of test-world task families (add, count, or add,count) instead of the default English prompts.")
@click.option("--num-prompts", default=6, show_default=True, help="Problems taken from each --family.")
@click.option("--prompts", "prompt_set", type=click.Choice(["open", "grounded", "json"]), default="open", show_default=True,
              help="Prompt set: open-ended English prompts, input-grounded ones (quote, edit code, answer from a "
              "document, continue a table) where n-gram drafts pay, or requests for JSON records (with --json-schema).")
@grammar_options
@click.option("--grammar-assists", default="", help="With --json-schema/--grammar: run every mode once per grammar "
              "assist, e.g. verify,drafts,forced (the baseline masks verified rows only).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Save the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Save a PNG: speedup vs k, accepted-length histogram.")
@handle_errors
def bench(models, config, modes, baseline, repeats, sweep_k, family, num_prompts, prompt_set, grammar, grammar_assists,
          out_path, plot_path):
    """Modes against a baseline (tokens/s and model calls per token), interleaved, with the formula's prediction."""
    from cospec_local.backend import build_info
    from cospec_local.lab.bench import DRAFT_SOURCE_MODES, PROMPT_SETS, bench_configs, plot_report, run_bench
    from cospec_local.modes import mode_class
    from cospec_local.lab.testworld.tasks import TASK_STOP

    mode_names = mode_list(modes, DRAFT_SOURCE_MODES)
    prompts = PROMPT_SETS[prompt_set]
    if family:
        # Held-out problems past the first 10k (eval's range), num_prompts of each listed family.
        prompts = [p.prompt for name in family.split(",") for p in family_problems(name.strip(), num_prompts, 10_000)]
        config = config.with_(stop=tuple(config.stop) + TASK_STOP)
    ks = parse_list(sweep_k, int)
    assists = [a.strip() for a in grammar_assists.split(",") if a.strip()]
    if assists and grammar is None:
        raise click.UsageError("--grammar-assists needs --json-schema or --grammar")
    configs = bench_configs(config, mode_names, ks, baseline, assists).values()
    pair = models.open_pair(need_draft=any(mode_class(cfg).needs_draft(cfg) for cfg in configs))
    try:
        report = run_bench(pair, prompts, config.max_tokens, repeats, config, ks, modes=mode_names, baseline=baseline,
                           grammar=grammar, assists=assists)
    finally:
        pair.close()
    report["models"] = [str(slot.model.path) for slot in pair.engine.slots]
    build = build_info()
    report["kernels"] = pair.kernels
    report["llama_cpp_build"] = build.system_info
    report["guarantee"] = build.guarantee(pair.kernels, models.offloaded)
    for line in bench_lines(report, baseline, repeats):
        click.echo(line)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        click.echo(f"saved {out_path}")
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"saved {plot_path}")


def bench_lines(report: dict, baseline: str, repeats: int) -> list[str]:
    """A bench report in words: the build, the measured costs, then one line per mode."""
    c = report["costs"]
    others = ", ".join(f"{name} call {ms:.2f} ms" for name, ms in c["call_ms"].items())
    b = report["modes"][baseline]
    lines = [
        f"kernels: {report['kernels']} ({report['guarantee']}); llama.cpp: {report['llama_cpp_build']}",
        f"cost: target call {c['target_call_ms']:.2f} ms{', ' + others if others else ''}" + (f", c = {c['c']:.3f}" if "c" in c else ""),
        "verify call by logit rows (ms): " + ", ".join(f"{n}: {v:.1f}" for n, v in c["verify_ms_by_rows"].items()),
        f"{baseline}: {b['tok_s_median']:.1f} tok/s (median of {repeats}), {b['calls_per_token']:.2f} model calls/token, "
        f"{b['outside_llama_us_per_token']:.0f} us/token outside llama.cpp",
    ]
    return lines + [mode_line(name, m, baseline) for name, m in report["modes"].items() if name != baseline]


def mode_line(name: str, m: dict, baseline: str) -> str:
    """One mode of a bench report against `baseline`."""
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
    if m.get("grammar_us_per_token"):
        line += f"; grammar {m['grammar_us_per_token']:.0f} us/token, {m['forced_share']:.0%} of tokens forced"
    if m[f"greedy_output_identical_to_{baseline}"] is False:
        line += f"  OUTPUT DIFFERS FROM {baseline.upper()}"
    return line
