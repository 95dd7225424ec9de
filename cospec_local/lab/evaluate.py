"""Accuracy/speed evaluation of decoding modes on problems with checkable final answers.

`evaluate(pair, problems, modes)` runs every problem in every mode (interleaved per problem, so
drift hits all modes alike) and reports, per mode: accuracy with a 95% Wilson interval, tokens/s,
acceptance statistics. Problems come from `cospec_local.lab.testworld.tasks` (a task family, or a JSONL
file of {"prompt", "answer"} lines read by `load_jsonl_tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GenerationConfig
from .stats import wilson_interval
from .testworld.headroom import first_disagreement, greedy_continue
from .testworld.tasks import TASK_STOP, check

@dataclass
class ModeResult:
    """Totals for one decoding mode over all problems."""

    mode: str
    n: int = 0
    correct: int = 0
    tokens: int = 0
    t_decode: float = 0.0
    drafted: int = 0
    accepted: int = 0
    cycles: int = 0
    model_calls: int = 0
    target_calls: int = 0
    mismatches: int = 0
    overrides: int = 0
    t_arbiter: float = 0.0
    per_problem: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.n)
        return {
            "mode": self.mode,
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "ci95": [lo, hi],
            "tokens_per_second": self.tokens / self.t_decode if self.t_decode else 0.0,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_length": self.accepted / self.cycles if self.cycles else None,
            "model_calls_per_token": self.model_calls / self.tokens if self.tokens else 0.0,
            "target_calls_per_token": self.target_calls / self.tokens if self.tokens else 0.0,
            "mismatches": self.mismatches,
            "arbiter_share_of_decode": self.t_arbiter / self.t_decode if self.t_decode else 0.0,
            "overrides": self.overrides,
            "tokens": self.tokens,
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
    eos = pair.target.eos_id
    found = first_disagreement(pair, prompt_ids, target_ids, eos_id=eos)
    if found is None:
        return False
    position, token = found
    if position >= min(max_tokens, len(target_ids) + 1) or position >= max_tokens:
        return False  # past the reply's budget: nothing left to swap
    if token == eos:
        swapped = target_ids[:position]
    else:
        forced = target_ids[:position] + [token]
        left = max_tokens - len(forced)
        swapped = forced + (greedy_continue(pair, prompt_ids + forced, left) if left > 0 else [])
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

    Besides the decoding modes: `rule` (cospec with the fixed-threshold rule `rule` = (tau, rho))
    and `oracle` (`oracle_correct`; it has no speed figures)."""
    from tqdm import tqdm

    from ..arbiter import ArbitratingVerifier, RulePolicy

    base = config or GenerationConfig(temperature=0.0, max_tokens=160, stop=TASK_STOP)
    if "rule" in modes and rule is None:
        raise ValueError("mode 'rule' needs its thresholds (tau, rho)")
    results = {mode: ModeResult(mode) for mode in modes}
    for problem in tqdm(problems, desc="eval", disable=not progress):
        for mode in modes:
            m = results[mode]
            if mode == "oracle":
                ok = oracle_correct(pair, problem, base.max_tokens)
                m.n += 1
                m.correct += ok
                m.per_problem.append(ok)
                continue
            if mode == "rule":
                r = pair.generate(problem.prompt, base, mode="cospec", verifier=ArbitratingVerifier(RulePolicy(*rule)))
            else:
                r = pair.generate(problem.prompt, base, mode=mode)
            ok = check(problem.family, r.text, problem.answer)
            m.n += 1
            m.correct += ok
            m.per_problem.append(ok)
            m.target_calls += r.stats.model_calls.get("target", 0)
            m.mismatches += r.stats.n_mismatches
            m.overrides += r.stats.n_overrides
            m.t_arbiter += r.stats.t_arbiter
            m.tokens += r.stats.n_generated
            m.t_decode += r.stats.t_decode
            m.drafted += r.stats.n_drafted
            m.accepted += r.stats.n_accepted
            m.cycles += r.stats.n_cycles
            m.model_calls += r.stats.total_model_calls
    return {"modes": [results[m].as_dict() for m in modes], "n_problems": len(problems)}


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
