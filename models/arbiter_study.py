"""The CoSpec arbiter study behind the README's tables (issue 21): how the arbiter is best trained
on the test-world family, measured on validation problems (indices 200,000.., never trained on,
disjoint from `cospec-local eval`'s 0..).

    python -m models.arbiter_study supervised  --out study/supervised.json   # labels, fits, threshold sweep
    python -m models.arbiter_study efficiency  --out study/efficiency.json   # RL from random: group vs decision
    python -m models.arbiter_study frontier    --out study/frontier.json     # RL at several costs vs the sweep
    python -m models.arbiter_study transfer    --out study/transfer.json     # train on one family, test on the other
    python -m models.arbiter_study plot        --dir study                   # the two figures

Each run is seeded and single-threaded (one llama.cpp thread, one torch thread); run them one at
a time on a 2-core machine. Policies are written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cospec_local.api import load_pair
from cospec_local.arbiter import RulePolicy
from cospec_local.lab.training import (
    TaskSource,
    TrainSettings,
    assess,
    export_onnx,
    fit_rule,
    oracle_labels,
    train_policy,
    train_supervised,
)

FAMILY = Path(__file__).resolve().parent / "family"
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def open_pair():
    return load_pair(str(FAMILY / "draft.gguf"), str(FAMILY / "target.gguf"), n_ctx=512, n_threads=1)


def supervised_policy(pair, families, n_label: int, tokens: bool, seed: int = 0):
    """The supervised baseline on oracle labels from `n_label` training problems."""
    x, y = oracle_labels(pair, TaskSource(families).train_set(n_label))
    vocab = (pair.engine.n_vocab, pair.engine.vocabulary()) if tokens else (None, None)
    return train_supervised(x, y, seed=seed, n_vocab=vocab[0], vocabulary=vocab[1]), len(y)


def per_family(pair, policy, held: int, families=("add", "count"), threshold: float = 0.5) -> dict:
    """Validation accuracy and target calls per token, per family and overall."""
    out = {}
    for family in families:
        out[family] = assess(pair, policy, TaskSource((family,)).held_out(held), threshold)
    out["mean_accuracy"] = float(np.mean([out[f]["accuracy"] for f in families]))
    out["mean_target_calls_per_token"] = float(np.mean([out[f]["target_calls_per_token"] for f in families]))
    return out


def cmd_supervised(args, pair) -> dict:
    """Supervised with and without token features; the threshold sweep (the frontier's baseline)."""
    report = {}
    for tokens in (False, True):
        t0 = time.perf_counter()
        policy, n = supervised_policy(pair, ("add", "count"), args.label, tokens)
        name = "tokens" if tokens else "generic"
        export_onnx(policy, Path(args.out).with_name(f"supervised_{name}.onnx"), {"cospec.threshold": "0.5"})
        sweep = {str(t): per_family(pair, policy, args.held, threshold=t) for t in THRESHOLDS}
        report[name] = {"labels": n, "seconds": time.perf_counter() - t0, "sweep": sweep}
        print(name, n, {t: round(v["mean_accuracy"], 3) for t, v in sweep.items()}, flush=True)
    rule, _ = fit_rule(pair, TaskSource(("add", "count")).train_set(100), progress=False)
    report["rule"] = {"tau": rule.tau, "rho": rule.rho, **per_family(pair, rule, args.held)}
    report["defer"] = per_family(pair, RulePolicy(1.1, 0.0), args.held)  # plain SD: the target's answers
    report["keep"] = per_family(pair, RulePolicy(-1.0, 2.0), args.held)  # the draft's
    return report


def cmd_efficiency(args, pair) -> dict:
    """RL from random weights with each estimator, to about the same number of rollouts."""
    report = {}
    for estimator, epochs in (("group", args.group_epochs), ("decision", args.decision_epochs)):
        settings = TrainSettings(epochs=epochs, lr=args.lr, seed=args.seed, held_out=args.curve_held, estimator=estimator,
                                 batches_per_epoch=args.batches)
        out = Path(args.out).with_name(f"rl_random_{estimator}.onnx")
        result = train_policy(pair, out, settings, TaskSource(("add", "count")), progress=False)
        from cospec_local.arbiter import OnnxPolicy

        # The exported (best) epoch on the full validation set, comparable with the supervised run's.
        report[estimator] = {"history": result["settings"]["history"], "seconds": result["seconds"],
                             "exported_epoch": result["exported_epoch"], **per_family(pair, OnnxPolicy(out), args.held)}
        print(estimator, [(h["rollouts"], round(h["held_out_accuracy"], 3)) for h in result["settings"]["history"]], flush=True)
    return report


def cmd_frontier(args, pair) -> dict:
    """RL (from the supervised weights) at several costs per target call, each scored on validation."""
    from cospec_local.arbiter import OnnxPolicy

    init, _ = supervised_policy(pair, ("add", "count"), args.label, True)
    report = {"0": {"policy": "the shipped one (make policy, cost 0)", **per_family(pair, OnnxPolicy(FAMILY / "policy.onnx"), args.held)}}
    for cost in args.costs:
        settings = TrainSettings(epochs=args.epochs, lr=args.lr, seed=args.seed, held_out=args.held, cost=cost)
        out = Path(args.out).with_name(f"rl_cost_{cost:g}.onnx")
        result = train_policy(pair, out, settings, TaskSource(("add", "count")), progress=False, init=init)
        report[str(cost)] = {"history": result["settings"]["history"], "exported_epoch": result["exported_epoch"],
                             "seconds": result["seconds"], **per_family(pair, OnnxPolicy(out), args.held)}
        print(cost, round(report[str(cost)]["mean_accuracy"], 3), round(report[str(cost)]["mean_target_calls_per_token"], 4),
              flush=True)
    return report


def cmd_transfer(args, pair) -> dict:
    """Trained on one family (rule, supervised, RL from supervised, or from random weights when the
    family's oracle labels are all of one kind), scored on both."""
    from cospec_local.arbiter import OnnxPolicy

    report = {}
    for train in args.train_on:
        tasks = TaskSource((train,))
        rule, _ = fit_rule(pair, tasks.train_set(100), progress=False)
        entry = {"rule": {"tau": rule.tau, "rho": rule.rho, **per_family(pair, rule, args.held)}}
        try:
            sup, n = supervised_policy(pair, (train,), args.label, args.tokens)
            entry["supervised"] = {"labels": n, **per_family(pair, sup, args.held)}
        except ValueError as e:  # e.g. count: every oracle label is "keep"
            sup = None
            entry["supervised"] = {"error": str(e)}
        settings = TrainSettings(families=(train,), epochs=args.epochs, lr=args.lr, seed=args.seed, held_out=args.held,
                                 token_features=args.tokens)
        out = Path(args.out).with_name(f"rl_{train}_only.onnx")
        train_policy(pair, out, settings, tasks, progress=False, init=sup)
        entry["rl"] = {"start": "supervised" if sup is not None else "random", **per_family(pair, OnnxPolicy(out), args.held)}
        report[train] = entry
        print(train, json.dumps({k: {f: round(v[f]["accuracy"], 3) for f in ("add", "count")} if "add" in v else v
                                 for k, v in entry.items()}), flush=True)
    report["target"] = per_family(pair, RulePolicy(1.1, 0.0), args.held)
    return report


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(args.dir)
    eff = json.loads((d / "efficiency.json").read_text())
    sup = json.loads((d / "supervised.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for estimator, label in (("group", "group-relative (GRPO-style)"), ("decision", "per-decision Monte Carlo")):
        h = eff[estimator]["history"]
        ax.plot([e["rollouts"] for e in h], [e["held_out_accuracy"] for e in h], marker="o", ms=3, label=label)
    ax.axhline(sup["tokens"]["sweep"]["0.5"]["mean_accuracy"], color="grey", ls="--",
               label="supervised on oracle labels (150 per family)")
    ax.set_xlabel("training rollouts (branches included)")
    ax.set_ylabel("validation accuracy (50 problems per family)")
    ax.set_title("RL from random weights: sample efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(d / "efficiency.png", dpi=120)

    if not (d / "frontier.json").exists():
        return
    fro = json.loads((d / "frontier.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = sup["tokens"]["sweep"]
    xs = [sweep[t]["mean_target_calls_per_token"] for t in sweep]
    ys = [sweep[t]["mean_accuracy"] for t in sweep]
    ax.plot(xs, ys, marker="s", ms=4, label="supervised, threshold swept")
    costs = [c for c in fro if c not in ("seconds", "args")]
    ax.plot([fro[c]["mean_target_calls_per_token"] for c in costs], [fro[c]["mean_accuracy"] for c in costs], marker="o",
            ls="", ms=6, label="RL at cost " + ", ".join(costs) + " (0: the shipped policy)")
    for c in costs:
        ax.annotate(c, (fro[c]["mean_target_calls_per_token"], fro[c]["mean_accuracy"]), fontsize=8)
    for name in ("rule", "defer", "keep"):
        ax.plot(sup[name]["mean_target_calls_per_token"], sup[name]["mean_accuracy"], marker="x", ls="",
                label={"defer": "always defer (= target)", "keep": "always keep (= draft)"}.get(name, name))
    ax.set_xlabel("target calls per generated token")
    ax.set_ylabel("validation accuracy (add + count)")
    ax.set_title("Accuracy against target calls")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "frontier.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=("supervised", "efficiency", "frontier", "transfer", "plot"))
    parser.add_argument("--out", default="study/out.json")
    parser.add_argument("--dir", default="study")
    parser.add_argument("--held", type=int, default=150, help="validation problems per family")
    parser.add_argument("--curve-held", type=int, default=50, help="validation problems per family scored every epoch")
    parser.add_argument("--batches", type=int, default=2, help="batches per epoch")
    parser.add_argument("--label", type=int, default=200, help="training problems labelled for the supervised baseline")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--group-epochs", type=int, default=12)
    parser.add_argument("--decision-epochs", type=int, default=16)
    parser.add_argument("--costs", type=lambda s: [float(c) for c in s.split(",")], default=[3.0, 10.0, 30.0])
    parser.add_argument("--tokens", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-on", type=lambda s: s.split(","), default=["add", "count"], help="transfer: families to train on")
    args = parser.parse_args()
    if args.experiment == "plot":
        cmd_plot(args)
        return
    import torch

    torch.set_num_threads(1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open_pair() as pair:
        report = globals()[f"cmd_{args.experiment}"](args, pair)
    report["seconds"] = time.perf_counter() - t0
    report["args"] = {k: v for k, v in vars(args).items()}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
