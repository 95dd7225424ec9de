"""`cospec-local bench`: target-only vs speculative decoding, interleaved, on a fixed prompt set.

Speed claims are ratios measured in one run: each repetition runs every prompt target-only and
speculative back to back (alternating which goes first), and we report medians over repetitions.
Alongside the measured speedup we report the one the standard formula predicts from the measured
acceptance alpha and cost ratio c (Leviathan et al.): (1 - a^(g+1)) / ((1 - a)(g c + 1)).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import numpy as np

from .config import GenerationConfig

# Disjoint from the prompts of models/make_corpus.py, whose outputs chose the default draft's vocabulary.
BENCH_PROMPTS = [
    "The industrial revolution changed",
    "User: What are the benefits of regular exercise?\nAssistant:",
    "def binary_search(arr, target):\n",
    "It was a cold winter morning when",
    "Here are some ideas for a birthday party:\n1.",
    "The solar system consists of",
]


def measure_costs(pair, repeats: int = 30, max_rows: int = 9) -> dict:
    """Median time of a one-token call of each model after a short prefix, and the target's
    verification call time for 1..max_rows logit rows (interleaved, so drift hits both alike)."""
    prefix = pair.tokenize(BENCH_PROMPTS[0])
    filler = pair.tokenize(" and the people of the city were very happy with", add_bos=False)
    draft_prefix = pair.engine._draft_ids(prefix)
    pair.engine.reset()
    pair.target.eval(prefix, 0)
    pair.draft.eval(draft_prefix, 0)
    t_target, t_draft = [], []
    t_rows = {n: [] for n in range(1, max_rows + 1)}
    for _ in range(repeats):
        for n in t_rows:
            t0 = time.perf_counter()
            pair.target.eval(filler[:n], n)
            t_rows[n].append(time.perf_counter() - t0)
            pair.target.rollback(len(prefix))
        t0 = time.perf_counter()
        pair.draft.eval(pair.engine._draft_ids(filler[:1]), 1)
        t_draft.append(time.perf_counter() - t0)
        pair.draft.rollback(len(prefix))
        t_target.append(t_rows[1][-1])
    pair.engine.reset()
    target_ms = statistics.median(t_target) * 1e3
    draft_ms = statistics.median(t_draft) * 1e3
    return {
        "target_call_ms": target_ms,
        "draft_call_ms": draft_ms,
        "c": draft_ms / target_ms,
        "verify_ms_by_rows": {n: statistics.median(v) * 1e3 for n, v in t_rows.items()},
    }


def predicted_speedup(alpha: float, gamma: float, c: float) -> float:
    """Expected wall-time speedup of speculative decoding (draft length gamma, cost ratio c)."""
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def predicted_speedup_with_verify_cost(alpha: float, gamma: float, c: float, verify_ratio: float) -> float:
    """The same expectation when verifying gamma + 1 tokens costs `verify_ratio` target calls
    instead of one (on CPUs every verified row pays the output head: Gemma's 262k-wide head
    makes a 6-row verification cost ~3.6 single-token calls here)."""
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + verify_ratio)


def verify_ratio(costs: dict, n_rows: float) -> float:
    """Measured verification cost of `n_rows` logit rows over one single-token target call
    (linear interpolation between the measured row counts)."""
    points = sorted((int(n), ms) for n, ms in costs["verify_ms_by_rows"].items())  # JSON keys are str
    rows, ms = zip(*points)
    return float(np.interp(n_rows, rows, ms)) / costs["target_call_ms"]


def _run(pair, config: GenerationConfig, prompts, max_tokens: int) -> dict:
    """Run every prompt once from a cold cache; sum the counts and times."""
    out = {"tokens": 0, "t_decode": 0.0, "t_overhead": 0.0, "target_steps": 0, "accepted": [], "drafted": [], "outputs": []}
    for prompt in prompts:
        pair.engine.reset()  # every run starts cold: no KV reuse between modes
        r = pair.generate(prompt, config, max_tokens=max_tokens)
        s = r.stats
        out["tokens"] += s.n_generated
        out["t_decode"] += s.t_decode
        out["t_overhead"] += s.t_overhead
        out["target_steps"] += s.n_target_steps
        out["accepted"] += s.accepted_lengths
        out["drafted"] += s.draft_lengths
        out["outputs"].append(r.tokens)
    return out


def run_bench(
    pair,
    prompts=BENCH_PROMPTS,
    max_tokens: int = 128,
    repeats: int = 3,
    config: GenerationConfig | None = None,
    sweep_k: list[int] | None = None,
    progress: bool = True,
) -> dict:
    """Interleaved target-only vs speculative runs; returns a JSON-ready report."""
    from tqdm import tqdm

    base = config or GenerationConfig(temperature=0.0)
    spec_configs = {"spec": replace(base, mode="spec")}
    for k in sweep_k or []:
        spec_configs[f"spec_k{k}"] = replace(base, mode="spec", draft_max=k, adaptive=False)
    target_config = replace(base, mode="target")

    costs = measure_costs(pair)
    runs = {name: [] for name in ["target", *spec_configs]}
    # Each mode keeps its own draft-length policy: fixed-k runs must not teach the adaptive one.
    policies = {name: None for name in runs}
    bar = tqdm(total=repeats * len(runs), desc="bench", disable=not progress)
    for rep in range(repeats):
        order = ["target", *spec_configs] if rep % 2 == 0 else [*spec_configs, "target"]
        for name in order:
            cfg = target_config if name == "target" else spec_configs[name]
            pair.engine.policy = policies[name]
            runs[name].append(_run(pair, cfg, prompts, max_tokens))
            policies[name] = pair.engine.policy
            bar.update(1)
    bar.close()

    def tok_s(t):
        return t["tokens"] / t["t_decode"]

    report = {"costs": costs, "prompts": len(prompts), "max_tokens": max_tokens, "repeats": repeats, "modes": {}}
    target_speeds = [tok_s(t) for t in runs["target"]]
    report["modes"]["target"] = {"tok_s_median": statistics.median(target_speeds), "tok_s": target_speeds}
    for name in spec_configs:
        speeds = [tok_s(t) for t in runs[name]]
        ratios = [tok_s(s) / tok_s(t) for s, t in zip(runs[name], runs["target"])]
        accepted = [n for t in runs[name] for n in t["accepted"]]
        drafted = [n for t in runs[name] for n in t["drafted"]]
        cycles = len(drafted)
        # alpha: maximum-likelihood per-token acceptance; each cycle gives its accepted tokens as
        # successes and one failure if it stopped at a rejection.
        rejections = sum(1 for a, d in zip(accepted, drafted) if a < d)
        alpha = sum(accepted) / (sum(accepted) + rejections) if cycles else 0.0
        gamma = sum(drafted) / cycles if cycles else 0.0
        t_decode = sum(t["t_decode"] for t in runs[name])
        same = all(a["outputs"] == b["outputs"] for a, b in zip(runs[name], runs["target"]))
        report["modes"][name] = {
            "tok_s_median": statistics.median(speeds),
            "tok_s": speeds,
            "speedup_median": statistics.median(ratios),
            "speedups": ratios,
            "acceptance_rate": sum(accepted) / sum(drafted) if cycles else 0.0,
            "alpha": alpha,
            "mean_draft_length": gamma,
            "mean_accepted_length": float(np.mean(accepted)) if accepted else 0.0,
            "target_steps": sum(t["target_steps"] for t in runs[name]),
            "cycles": cycles,
            "python_overhead_share": sum(t["t_overhead"] for t in runs[name]) / t_decode if t_decode else 0.0,
            "predicted_speedup": predicted_speedup(alpha, gamma, costs["c"]) if cycles else 1.0,
            "accepted_length_histogram": np.bincount(accepted).tolist() if accepted else [],
            "greedy_output_identical_to_target": same if base.temperature == 0 else None,
        }
        m = report["modes"][name]
        m["achieved_over_predicted"] = m["speedup_median"] / m["predicted_speedup"]
        m["predicted_speedup_with_verify_cost"] = (
            predicted_speedup_with_verify_cost(alpha, gamma, costs["c"], verify_ratio(costs, gamma + 1)) if cycles else 1.0
        )
        m["achieved_over_predicted_with_verify_cost"] = m["speedup_median"] / m["predicted_speedup_with_verify_cost"]
        # What a draft that costs nothing (c = 0) with the same acceptance would reach: the ceiling
        # that the target's verification cost alone sets on this machine.
        m["ceiling_free_draft"] = (
            predicted_speedup_with_verify_cost(alpha, gamma, 0.0, verify_ratio(costs, gamma + 1)) if cycles else 1.0
        )
    return report


def plot_report(report: dict, path: str) -> None:
    """Speedup against draft length (from --sweep-k) and the accepted-length histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'cospec-local[plot]'") from e
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ks = sorted(int(n[6:]) for n in report["modes"] if n.startswith("spec_k"))
    if ks:
        ax1.plot(ks, [report["modes"][f"spec_k{k}"]["speedup_median"] for k in ks], "o-", label="measured")
        ax1.plot(ks, [report["modes"][f"spec_k{k}"]["predicted_speedup"] for k in ks], "x--", label="formula")
    ax1.axhline(report["modes"]["spec"]["speedup_median"], color="gray", ls=":", label="adaptive k")
    ax1.axhline(1.0, color="black", lw=0.5)
    ax1.set_xlabel("draft length k")
    ax1.set_ylabel("speedup over target-only")
    ax1.legend()
    hist = report["modes"]["spec"]["accepted_length_histogram"]
    ax2.bar(range(len(hist)), hist)
    ax2.set_xlabel("draft tokens accepted per cycle (adaptive k)")
    ax2.set_ylabel("cycles")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
