"""`cospec-local bench`: decoding modes against a baseline, interleaved, on a fixed prompt set.

Speed claims are ratios measured in one run: each repetition runs every prompt in every mode back
to back (alternating the order), and we report medians over repetitions. Next to each measured
speedup we report what the standard formula predicts from the measured acceptance alpha and cost
ratio c, and the speedup in model calls per token (machine-independent):
- `spec` over `target` (Leviathan et al.): (1 - a^(g+1)) / ((1 - a)(g c + 1));
- `cos-naive` over `collab`: (1 + c)(1 - a^g) / ((1 - a)(g c + 1)) (a proposal of g draft tokens,
  no bonus token; collab pays 1 + c per token);
- `cos` over `collab`, two models (Alternate Proposal Framework, Fu et al. 2025):
  (1 - a^gq)(1 + c) / ((1 - a)(1 + c gq - a^gp c)).
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np

from ..config import DRAFT_SOURCES, GenerationConfig
from ..stats import GenerationStats
from .probes import measure_costs

# Disjoint from the prompts of models/make_corpus.py, whose outputs chose the default draft's vocabulary.
BENCH_PROMPTS = [
    "The industrial revolution changed",
    "User: What are the benefits of regular exercise?\nAssistant:",
    "def binary_search(arr, target):\n",
    "It was a cold winter morning when",
    "Here are some ideas for a birthday party:\n1.",
    "The solar system consists of",
]


# Input-grounded prompts: the answer quotes or edits its input, so what it writes has occurred
# before in the context (where n-gram drafts pay). Each ends where the copying starts.
GROUNDED_PROMPTS = [
    "Repeat the following paragraph exactly.\n\nParagraph: The Roman Empire was the post-Republican period of "
    "ancient Rome. As a polity it included large territorial holdings around the Mediterranean Sea in Europe, "
    "Northern Africa, and Western Asia, ruled by emperors. From the accession of Caesar Augustus as the first Roman "
    "emperor to the military anarchy of the 3rd century, it was a Principate with Italia as the metropole of its "
    "provinces.\n\nRepeated paragraph: The Roman Empire",
    "Add type hints to this function without changing anything else.\n\n```python\ndef merge_counts(first, second):\n"
    "    merged = dict(first)\n    for key, value in second.items():\n        merged[key] = merged.get(key, 0) + value\n"
    "    return merged\n\n\ndef top_items(counts, n):\n    ranked = sorted(counts.items(), key=lambda item: item[1], "
    "reverse=True)\n    return ranked[:n]\n```\n\nWith type hints:\n\n```python\ndef merge_counts(",
    "Sort this table by population, largest first.\n\n| city | country | population |\n| --- | --- | --- |\n"
    "| Lyon | France | 522000 |\n| Porto | Portugal | 232000 |\n| Munich | Germany | 1512000 |\n"
    "| Milan | Italy | 1371000 |\n| Seville | Spain | 684000 |\n\nSorted:\n\n| city | country | population |\n| --- | --- | --- |\n|",
    "Document: The meeting of the garden committee is on Tuesday at 6 pm in the library. Members should bring "
    "their seed lists. The committee will vote on the new compost bins and on the spring planting schedule. "
    "Tea will be served after the vote.\n\nQuestion: When and where is the meeting, and what will the committee "
    "vote on?\nAnswer, quoting the document: The meeting of the garden committee is on",
    "Quote the first two sentences of this passage.\n\nPassage: Water boils at 100 degrees Celsius at sea level. "
    "At higher altitudes the air pressure is lower, so water boils at a lower temperature. This is why cooking "
    "pasta in the mountains takes longer.\n\nQuote: Water boils",
    "Continue the table with the next four rows in the same format.\n\n| n | square | cube |\n| --- | --- | --- |\n"
    "| 1 | 1 | 1 |\n| 2 | 4 | 8 |\n| 3 | 9 | 27 |\n| 4 | 16 | 64 |\n|",
]
# Prompts whose replies are JSON records (for `bench --json-schema`).
JSON_PROMPTS = [
    "Describe a person as a JSON object with their name, age and city.\n",
    "Give a JSON record of a book: title, author and year.\n",
    "Return the weather in Paris as JSON.\n",
    "A JSON object describing a cat:\n",
    "Write a JSON object for a new user account.\n",
    "Output JSON for an order of three apples.\n",
]
PROMPT_SETS = {"open": BENCH_PROMPTS, "grounded": GROUNDED_PROMPTS, "json": JSON_PROMPTS}
# Bench names for spec mode with a given proposer (the name is the --draft-source).
DRAFT_SOURCE_MODES = DRAFT_SOURCES


def verify_ratio(costs: dict, n_rows: float) -> float:
    """Measured verification cost of `n_rows` logit rows over one single-token target call
    (linear interpolation between the measured row counts)."""
    points = sorted((int(n), ms) for n, ms in costs["verify_ms_by_rows"].items())  # JSON keys are str
    rows, ms = zip(*points)
    return float(np.interp(n_rows, rows, ms)) / costs["target_call_ms"]


def _run(pair, config: GenerationConfig, prompts, max_tokens: int, grammar=None) -> dict:
    """Run every prompt once from a cold cache: the summed statistics and the outputs."""
    total, outputs = GenerationStats(), []
    for prompt in prompts:
        pair.engine.reset()  # every run starts cold: no KV reuse between modes
        r = pair.generate(prompt, config, grammar=grammar, max_tokens=max_tokens)
        total.add(r.stats)
        outputs.append(r.tokens)
    return {"stats": total, "outputs": outputs}


def bench_configs(base: GenerationConfig, modes: list[str] | None = None, sweep_k: list[int] | None = None,
                  baseline: str = "target", assists: list[str] | None = None) -> dict[str, GenerationConfig]:
    """The configs `run_bench` measures, by report name: each of `modes` (a draft source names spec
    mode with that source), fixed-k spec for `sweep_k`, and the baseline. With grammar `assists`,
    every mode runs once per assist ("spec/forced"), and the baseline masks verified rows only."""
    configs = {name: replace(base, mode="spec", draft_source=name) if name in DRAFT_SOURCE_MODES
               else replace(base, mode=name) for name in (modes or ["spec"])}
    for k in sweep_k or []:
        configs[f"spec_k{k}"] = replace(base, mode="spec", draft_max=k, adaptive=False)
    if assists:
        configs = {f"{name}/{assist}": replace(cfg, grammar_assist=assist) for name, cfg in configs.items() for assist in assists}
        configs[baseline] = replace(base, mode=baseline, grammar_assist="verify")
    else:
        configs[baseline] = replace(base, mode=baseline)
    return configs


def run_bench(
    pair,
    prompts=BENCH_PROMPTS,
    max_tokens: int = 128,
    repeats: int = 3,
    config: GenerationConfig | None = None,
    sweep_k: list[int] | None = None,
    progress: bool = True,
    modes: list[str] | None = None,
    baseline: str = "target",
    grammar=None,
    assists: list[str] | None = None,
) -> dict:
    """Interleaved runs of `modes` (default: spec, plus fixed-k spec for `sweep_k`) and the
    `baseline` mode; returns a JSON-ready report with speedups over the baseline."""
    from tqdm import tqdm

    base = config or GenerationConfig(temperature=0.0)
    configs = bench_configs(base, modes, sweep_k, baseline, assists)
    for cfg in configs.values():
        pair.engine.check(cfg)  # a mode these models cannot run fails now, not after minutes

    costs = measure_costs(pair, prompt=prompts[0])
    runs = {name: [] for name in configs}
    # Each mode keeps its own conversation (and draft-length policy): fixed-k runs must not teach
    # the adaptive one.
    conversations = {name: pair.engine.new_conversation() for name in configs}
    default_conversation = pair.conversation
    bar = tqdm(total=repeats * len(runs), desc="bench", disable=not progress)
    try:
        for rep in range(repeats):
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for name in order:
                pair.conversation = conversations[name]
                runs[name].append(_run(pair, configs[name], prompts, max_tokens, grammar))
                bar.update(1)
    finally:
        pair.conversation = default_conversation
        bar.close()

    report = {"costs": costs, "prompts": len(prompts), "max_tokens": max_tokens, "repeats": repeats,
              "baseline": baseline, "temperature": base.temperature, "modes": {}}
    base_runs = runs[baseline]
    report["modes"][baseline] = {
        "outside_llama_us_per_token": statistics.median(_outside_us(t) for t in base_runs),
        "tok_s_median": statistics.median(_tok_s(t) for t in base_runs),
        "tok_s": [_tok_s(t) for t in base_runs],
        "calls_per_token": statistics.median(_calls_per_token(t) for t in base_runs),
    }
    for name, cfg in configs.items():
        if name != baseline:
            report["modes"][name] = _mode_report(pair, cfg, runs[name], base_runs, report, costs)
    return report


def _tok_s(t: dict) -> float:
    return t["stats"].tokens_per_second


def _calls_per_token(t: dict) -> float:
    return t["stats"].model_calls_per_token


def _outside_us(t: dict) -> float:
    return 1e6 * t["stats"].outside_llama_per_token


def _mode_report(pair, cfg: GenerationConfig, mode_runs: list[dict], base_runs: list[dict], report: dict,
                 costs: dict) -> dict:
    """One mode's figures against the baseline's runs (same repetitions), with the mode's own
    prediction from the measured acceptance and costs."""
    baseline = report["baseline"]
    total = GenerationStats()  # every repetition summed: the derived figures come from it
    for t in mode_runs:
        total.add(t["stats"])
    speeds = [_tok_s(t) for t in mode_runs]
    ratios = [s / _tok_s(b) for s, b in zip(speeds, base_runs)]
    accepted, drafted = total.accepted_lengths, total.draft_lengths
    cycles = total.n_cycles
    # alpha: maximum-likelihood per-token acceptance; each cycle gives its accepted tokens as
    # successes and one failure if it stopped at a rejection.
    rejections = sum(1 for a, d in zip(accepted, drafted) if a < d)
    alpha = sum(accepted) / (sum(accepted) + rejections) if cycles else 0.0
    gamma = sum(drafted) / cycles if cycles else 0.0
    cpt = statistics.median(_calls_per_token(t) for t in mode_runs)
    m = {
        "tok_s_median": statistics.median(speeds),
        "tok_s": speeds,
        "speedup_median": statistics.median(ratios),
        "speedups": ratios,
        "calls_per_token": cpt,
        "calls_speedup": report["modes"][baseline]["calls_per_token"] / cpt if cpt else 0.0,
        "acceptance_rate": total.acceptance_rate,
        "alpha": alpha,
        "mean_draft_length": gamma,
        "mean_accepted_length": total.mean_accepted_length,
        "target_steps": total.n_target_steps,
        "cycles": cycles,
        "python_overhead_share": total.summary()["overhead_share"],
        "outside_llama_us_per_token": statistics.median(_outside_us(t) for t in mode_runs),
        "accepted_length_histogram": np.bincount(accepted).tolist() if accepted else [],
        "forced_share": total.n_forced / total.n_generated if total.n_generated else 0.0,
        "grammar_us_per_token": 1e6 * total.t_grammar / total.n_generated if total.n_generated else 0.0,
        f"greedy_output_identical_to_{baseline}": (all(t["outputs"] == b["outputs"] for t, b in zip(mode_runs, base_runs))
                                                   if report["temperature"] == 0 else None),
    }
    predicted = None
    if cycles:
        prediction = pair.engine.mode_for(cfg).predict(baseline, alpha, gamma, costs.get("c", 0.0),
                                                       lambda n_rows: verify_ratio(costs, n_rows))
        if prediction is not None:
            predicted = prediction.pop("predicted_speedup")
            m.update(prediction)
            m["achieved_over_predicted_with_verify_cost"] = m["speedup_median"] / m["predicted_speedup_with_verify_cost"]
    m["predicted_speedup"] = predicted
    m["achieved_over_predicted"] = m["speedup_median"] / predicted if predicted else None
    return m


def plot_report(report: dict, path: str) -> None:
    """Three panels: speedup against draft length (--sweep-k: measured, the formula, and the
    formula with the measured verification cost); every mode's measured speedup next to its
    prediction (the attainment is their ratio); the accepted-length histogram of adaptive spec."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'cospec-local[plot]'") from e
    modes = report["modes"]
    baseline = report.get("baseline", "target")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    ks = sorted(int(n[6:]) for n in modes if n.startswith("spec_k"))
    if ks:
        ax1.plot(ks, [modes[f"spec_k{k}"]["speedup_median"] for k in ks], "o-", label="measured")
        ax1.plot(ks, [modes[f"spec_k{k}"]["predicted_speedup"] for k in ks], "x--", label="formula")
        ax1.plot(ks, [modes[f"spec_k{k}"].get("predicted_speedup_with_verify_cost") for k in ks], "s:",
                 label="formula, measured verify cost")
    adaptive = modes.get("spec")  # the report's column of spec with the adaptive draft length
    if adaptive:
        ax1.axhline(adaptive["speedup_median"], color="gray", ls=":", label="adaptive k")
    ax1.axhline(1.0, color="black", lw=0.5)
    ax1.set_xlabel("draft length k")
    ax1.set_ylabel(f"speedup over {baseline}")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    names = [n for n in modes if n != baseline]
    x = np.arange(len(names))
    measured = [modes[n]["speedup_median"] for n in names]
    predicted = [modes[n].get("predicted_speedup_with_verify_cost") or 0.0 for n in names]
    ax2.bar(x - 0.2, measured, 0.4, label="measured")
    ax2.bar(x + 0.2, predicted, 0.4, label="predicted (measured costs)")
    for xi, m, pr in zip(x, measured, predicted):
        if pr:
            ax2.text(xi, max(m, pr) + 0.02, f"{m / pr:.0%}", ha="center", fontsize=8)
    ax2.axhline(1.0, color="black", lw=0.5)
    ax2.set_xticks(x, names, rotation=30, fontsize=8)
    ax2.set_ylabel(f"speedup over {baseline} (label: attainment)")
    ax2.legend(fontsize=8, loc="lower right")
    hist = modes.get("spec", {}).get("accepted_length_histogram", [])
    ax3.bar(range(len(hist)), hist)
    ax3.set_xlabel("draft tokens accepted per cycle (adaptive k)")
    ax3.set_ylabel("cycles")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
