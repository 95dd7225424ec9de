"""Accuracy/speed evaluation of decoding modes on problems with checkable final answers.

`evaluate(pair, problems, modes)` runs every problem in every mode (interleaved per problem, so
drift hits all modes alike) and reports, per mode: accuracy with a 95% Wilson interval, tokens/s,
acceptance statistics. Problems come from `cospec_local.lab.testworld.tasks` (a task family, or a JSONL
file of {"prompt", "answer"} lines read by `load_jsonl_tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GenerationConfig
from ..stats import GenerationStats
from ..modes import mode_class
from .stats import wilson_interval
from .testworld.headroom import greedy_continue, swap_at_first_disagreement
from .testworld.tasks import TASK_STOP, check

@dataclass
class ModeResult:
    """Totals for one decoding mode over all problems: answers, and the generations' statistics
    summed (`GenerationStats.add`; the oracle has none)."""

    mode: str
    n: int = 0
    correct: int = 0
    per_problem: list[bool] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def add(self, problem, result) -> None:
        """Count one problem: a GenerationResult, or (the oracle) whether it was answered right."""
        if isinstance(result, bool):
            ok = result
        else:
            ok = check(problem.family, result.text, problem.answer)
            self.stats.add(result.stats)
        self.n += 1
        self.correct += ok
        self.per_problem.append(ok)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.n)
        s = self.stats
        return {
            "mode": self.mode,
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "ci95": [lo, hi],
            "tokens_per_second": s.tokens_per_second,
            "acceptance_rate": s.acceptance_rate if s.n_drafted else None,
            "mean_accepted_length": s.mean_accepted_length if s.n_cycles else None,
            "model_calls_per_token": s.model_calls_per_token,
            "target_calls_per_token": s.target_calls_per_token,
            "mismatches": s.n_mismatches,
            "arbiter_share_of_decode": s.t_arbiter / s.t_decode if s.t_decode else 0.0,
            "overrides": s.n_overrides,
            "tokens": s.n_generated,
            "per_problem": list(self.per_problem),
        }


def oracle_correct(pair, problem, max_tokens: int) -> bool:
    """The first-disagreement oracle (`testworld.headroom`), an arbiter that knows the answer but
    may swap only once: right when target-only greedy is right, or when keeping the draft's token
    at the first disagreement and continuing with the target is. (It is not an upper bound for a
    policy that arbitrates at every mismatch.)"""

    prompt_ids = pair.tokenize(problem.prompt)
    target_ids = greedy_continue(pair, prompt_ids, max_tokens)
    if check(problem.family, pair.target.detokenize(target_ids), problem.answer):
        return True
    swap = swap_at_first_disagreement(pair, prompt_ids, target_ids, max_tokens, eos_id=pair.target.eos_id)
    if swap is None:
        return False
    swapped = swap[2]
    return check(problem.family, pair.target.detokenize(swapped), problem.answer)


def evaluate(
    pair,
    problems,
    modes=("target", "draft", "spec"),
    config: GenerationConfig | None = None,
    progress: bool = True,
    rule: tuple[float, float] | None = None,
) -> dict:
    """Run each problem in each mode (greedy unless `config` says otherwise) and check answers.

    Besides the decoding modes, the `LAB_MODES`: `rule` (cospec with the fixed-threshold rule
    `rule` = (tau, rho)) and `oracle` (`oracle_correct`; it has no speed figures)."""
    from tqdm import tqdm

    base = config or GenerationConfig(temperature=0.0, max_tokens=160, stop=TASK_STOP)
    if "rule" in modes and rule is None:
        raise ValueError("mode 'rule' needs its thresholds (tau, rho)")
    results = {mode: ModeResult(mode) for mode in modes}
    for problem in tqdm(problems, desc="eval", disable=not progress):
        for mode in modes:
            lab_run = LAB_RUNS.get(mode)
            results[mode].add(problem, lab_run(pair, problem, base, rule) if lab_run else _run_mode(pair, problem, base.with_(mode=mode)))
    return {"modes": [results[m].as_dict() for m in modes], "n_problems": len(problems)}


def needs_draft(modes, config: GenerationConfig) -> bool:
    """Whether evaluating `modes` with `config` needs a draft model (the lab's modes arbitrate or
    swap in the draft's tokens)."""
    return any(mode in LAB_MODES or _needs_draft(config.with_(mode=mode)) for mode in modes)


def rule_thresholds(pair, config: GenerationConfig) -> tuple[float, float]:
    """The rule mode's (tau, rho) fitted on training problems, stored with `config`'s policy."""
    meta = pair.engine.load_policy(config.policy).metadata
    if "cospec.rule_tau" not in meta:
        raise ValueError("mode 'rule' needs --rule TAU,RHO (this policy stores no fitted rule)")
    return (float(meta["cospec.rule_tau"]), float(meta["cospec.rule_rho"]))


def run_evaluation(pair, problems, modes, config: GenerationConfig, rule: tuple[float, float] | None = None,
                   source: str | None = None, progress: bool = True) -> dict:
    """`cospec-local eval`: `evaluate` after checking, before the first problem, that the models run
    every decoding mode and that an arbitrating mode's policy loads. The tasks' stop string is
    added to `config`'s; the rule mode's thresholds are `rule`, else those stored with the policy.
    The report also names the thresholds used and the problems' `source`."""
    config = config.with_(stop=tuple(dict.fromkeys(config.stop + TASK_STOP)))
    if "rule" in modes and rule is None:
        rule = rule_thresholds(pair, config)
    elif "rule" not in modes:
        rule = None
    decoding = [config.with_(mode=mode) for mode in modes if mode not in LAB_MODES]
    for mode_config in decoding:
        pair.engine.check(mode_config)  # fail before the first problem
    if any(mode_class(mode_config).arbitrates for mode_config in decoding):
        pair.engine.load_policy(config.policy)
    report = evaluate(pair, problems, modes, config, progress=progress, rule=rule)
    report["rule"] = rule
    report["source"] = source
    return report


def _run_mode(pair, problem, config: GenerationConfig):
    """A decoding mode (`config.mode`) on one problem."""
    return pair.generate(problem.prompt, config)


def _run_rule(pair, problem, config: GenerationConfig, rule):
    """cospec with the fixed-threshold rule (tau, rho) as its arbiter."""
    from ..arbiter import ArbitratingVerifier, RulePolicy

    return pair.generate(problem.prompt, config, mode="cospec", verifier=ArbitratingVerifier(RulePolicy(*rule)))


def _run_oracle(pair, problem, config: GenerationConfig, rule) -> bool:
    """Whether the best single swap at a mismatch answers right (no speed figures)."""
    return oracle_correct(pair, problem, config.max_tokens)


# The lab's own modes besides the decoding modes, by name: cospec arbitrated by the
# fixed-threshold rule, and the first-disagreement oracle (`oracle_correct`).
LAB_RUNS = {"rule": _run_rule, "oracle": _run_oracle}
LAB_MODES = tuple(LAB_RUNS)


def _needs_draft(config: GenerationConfig) -> bool:
    return mode_class(config).needs_draft(config)
