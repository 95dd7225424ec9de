"""Headroom of a draft/target pair on a task family: how much a perfect arbiter could gain.

For each held-out problem:
1. target-only greedy completion, draft-only greedy completion;
2. the FIRST position where the draft's greedy token differs from the target's (the draft reads the
   target's completion, so both saw the same prefix);
3. oracle arbiter: keep the draft's token there, then continue with target greedy decoding. The
   oracle is correct when the target-only answer or this swapped continuation is correct: an upper
   bound for a policy that arbitrates only the first disagreement.

Decoding goes through the engine (`Pair.generate` in target or draft mode); the draft's choices
along the target's completion come from `probes.first_disagreement` (its slot's `score`, one batch
of rows per run of tokens), and a model's per-token cost from `probes.decode_cost_ms`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cospec_local.api import Pair, load_pair
from cospec_local.lab.probes import first_disagreement
from cospec_local.lab.stats import wilson_interval
from cospec_local.lab.testworld.gguf_export import EOS_ID, CharVocab
from cospec_local.lab.testworld.tasks import Problem, check, problems

MAX_NEW_TOKENS = 200  # the longest reference solution is ~110 characters


def load_family_pair(target_path: str | Path, draft_path: str | Path, n_threads: int = 1, n_ctx: int = 512) -> Pair:
    """A test-world target and draft loaded as a pair (same character vocabulary)."""
    return load_pair(draft_path, target_path, n_ctx=n_ctx, n_threads=n_threads)


def greedy_continue(pair: Pair, prefix_ids: list[int], max_new: int = MAX_NEW_TOKENS, mode: str = "target") -> list[int]:
    """Greedy decoding by one model of the pair (`mode` 'target' or 'draft'): new tokens after
    `prefix_ids`, EOS excluded."""
    return pair.generate(prefix_ids, mode=mode, temperature=0, max_tokens=max_new).tokens


def swap_at_first_disagreement(pair: Pair, prompt_ids: list[int], target_ids: list[int], max_new: int,
                               eos_id: int = EOS_ID) -> tuple[int, int, list[int]] | None:
    """The oracle's one swap: keep the draft's token at the first position where its greedy choice
    differs from the target's greedy completion `target_ids`, then continue with target greedy
    decoding, `max_new` tokens in all. (position, draft token, swapped completion), or None when the
    two never disagree within that budget."""
    found = first_disagreement(pair, prompt_ids, target_ids, eos_id=eos_id)
    if found is None or found[0] >= max_new:
        return None
    position, token = found
    if token == eos_id:  # the draft would stop here: the completion ends at this position
        return position, token, target_ids[:position]
    forced = target_ids[:position] + [token]
    left = max_new - len(forced)
    return position, token, forced + (greedy_continue(pair, prompt_ids + forced, left) if left > 0 else [])


@dataclass
class ProblemOutcome:
    """What happened on one problem."""

    target_correct: bool
    draft_correct: bool
    disagreement_position: int | None
    swapped_correct: bool  # equals target_correct when the two never disagree

    @property
    def oracle_correct(self) -> bool:
        return self.target_correct or self.swapped_correct


def evaluate_problem(problem: Problem, pair: Pair, vocab: CharVocab) -> ProblemOutcome:
    """Run target-only, draft-only and the first-disagreement swap on one problem."""
    prompt_ids = vocab.encode(problem.prompt, add_bos=True)
    target_ids = greedy_continue(pair, prompt_ids)
    draft_ids = greedy_continue(pair, prompt_ids, mode="draft")
    target_correct = check(problem.family, vocab.decode(target_ids), problem.answer)
    draft_correct = check(problem.family, vocab.decode(draft_ids), problem.answer)
    swap = swap_at_first_disagreement(pair, prompt_ids, target_ids, MAX_NEW_TOKENS)
    if swap is None:
        return ProblemOutcome(target_correct, draft_correct, None, target_correct)
    position, _, swapped_ids = swap
    swapped_correct = check(problem.family, vocab.decode(swapped_ids), problem.answer)
    return ProblemOutcome(target_correct, draft_correct, position, swapped_correct)


@dataclass
class HeadroomReport:
    """Accuracies (fractions) and disagreement statistics on `n` problems of one family."""

    family: str
    n: int
    target_accuracy: float
    draft_accuracy: float
    oracle_accuracy: float
    oracle_gain_points: float
    disagreements: int
    swap_fixes: int  # target wrong, swapped continuation right
    swap_breaks: int  # target right, swapped continuation wrong
    target_interval: tuple[float, float]
    oracle_interval: tuple[float, float]

    def as_dict(self) -> dict:
        return asdict(self)


def measure_headroom(target_path: str | Path, draft_path: str | Path, family: str, n: int = 500,
                     start: int = 0, n_threads: int = 1, progress: bool = False) -> HeadroomReport:
    """Target-only, draft-only and oracle-arbiter accuracy on eval problems `start..start+n-1`."""
    vocab = CharVocab()
    pair = load_family_pair(target_path, draft_path, n_threads)
    items = problems(family, "eval", n, start=start)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"headroom {family}")
    with pair:
        outcomes = [evaluate_problem(problem, pair, vocab) for problem in items]
    target_hits = sum(o.target_correct for o in outcomes)
    oracle_hits = sum(o.oracle_correct for o in outcomes)
    return HeadroomReport(
        family=family, n=n,
        target_accuracy=target_hits / n,
        draft_accuracy=sum(o.draft_correct for o in outcomes) / n,
        oracle_accuracy=oracle_hits / n,
        oracle_gain_points=100.0 * (oracle_hits - target_hits) / n,
        disagreements=sum(o.disagreement_position is not None for o in outcomes),
        swap_fixes=sum((not o.target_correct) and o.swapped_correct for o in outcomes),
        swap_breaks=sum(o.target_correct and not o.swapped_correct for o in outcomes),
        target_interval=wilson_interval(target_hits, n),
        oracle_interval=wilson_interval(oracle_hits, n),
    )
