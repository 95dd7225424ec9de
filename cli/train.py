"""`cospec-local train-policy`: train the CoSpec arbitration policy (the lab runs it)."""

from __future__ import annotations

import click

from .options import family_problems, handle_errors, model_options


@click.command("train-policy")
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
@click.option("--estimator", type=click.Choice(["decision", "group"]), default="decision", show_default=True,
              help="Advantage of each decision: decision = per-decision Monte Carlo (branch rollouts at each mismatch, "
                   "as VinePPO); group = its rollout's reward minus the group's mean (as GRPO).")
@click.option("--branches", default=6, show_default=True, help="--estimator decision: most branch rollouts per problem.")
@click.option("--token-features/--no-token-features", default=True, show_default=True,
              help="Also read the candidate tokens' identities (binds the policy to this pair's vocabulary).")
@click.option("--seed", default=0, show_default=True)
@click.option("--held-out", default=100, show_default=True, help="Held-out problems per family, scored every epoch.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (--out + .ckpt).")
@click.option("--fit-rule/--no-fit-rule", default=True, show_default=True, help="Also fit the fixed-threshold rule baseline on training problems (stored in the policy's metadata).")
@click.option("--compare-supervised", default=0, show_default=True, help="Also train the supervised baseline on oracle labels from this many training problems and report both.")
@click.option("--init-supervised", is_flag=True, help="Start the RL run from that supervised baseline instead of random weights (needs --compare-supervised N).")
@handle_errors
def train_policy_cmd(models, family, tasks_path, out_path, epochs, batches_per_epoch, problems_per_batch, group_size, hidden, lr,
                     cost, estimator, branches, token_features, seed, held_out, resume, fit_rule, compare_supervised,
                     init_supervised):
    """Train the CoSpec arbitration policy by reinforcement learning (policy gradient on final-answer reward)."""
    from cospec_local.lab.training import TrainSettings, run_training, task_source

    families = tuple(f.strip() for f in family.split(",") if f.strip())
    for name in families:
        family_problems(name, 1, 0)  # unknown family: a clear error now
    if init_supervised and not compare_supervised:
        raise click.UsageError("--init-supervised needs --compare-supervised N (the problems to label)")
    settings = TrainSettings(families=() if tasks_path else families, tasks=str(tasks_path) if tasks_path else None, epochs=epochs,
                             batches_per_epoch=batches_per_epoch, problems_per_batch=problems_per_batch, group_size=group_size,
                             hidden=hidden, lr=lr, cost=cost, seed=seed, held_out=held_out,
                             estimator=estimator, branches=branches, token_features=token_features)
    tasks = task_source(settings)
    pair = models.open_pair()
    try:
        report = run_training(pair, out_path, settings, tasks, resume=resume, rule_baseline=fit_rule,
                              compare_supervised=compare_supervised, init_supervised=init_supervised, log=click.echo)
    finally:
        pair.close()
    history = report["settings"]["history"]
    click.echo(f"held-out accuracy {history[0]['held_out_accuracy']:.3f} -> {history[-1]['held_out_accuracy']:.3f} "
               f"(exported epoch {report['exported_epoch']}) in {report['seconds']:.0f} s; wrote {out_path}")
