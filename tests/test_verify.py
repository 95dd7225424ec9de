"""Verification rules as pure functions: greedy verdicts and the exactness of rejection sampling."""

import numpy as np
import pytest

from cospec_local.combine import Single
from cospec_local.proposers import ModelProposer
from cospec_local.sampling import SamplingParams
from cospec_local.verify import ACCEPTED, BONUS, CORRECTION, RowBundle, verify_run
from stats_util import assert_matches, chi2_critical


class RowsOnly:
    """A slot reduced to what a RowBundle reads: queued rows and their processed distributions."""

    token_map = None
    name = "draft"

    def __init__(self, rows):
        self.rows = list(rows)
        self.probs = [None] * len(self.rows)

    def to_shared(self, model_id):
        return model_id


def bundle(tokens, draft_probs, target_probs, temperature=1.0):
    """Slot 0 proposed `tokens` from `draft_probs`; slot 1 (the target) scored len(target_probs) rows.
    Rows are log-probabilities, so the processed distribution at temperature 1 is the row itself."""
    slots = [RowsOnly(np.log(draft_probs)), RowsOnly(np.log(target_probs))]
    return RowBundle(slots, Single(1), SamplingParams(temperature=temperature), list(tokens), [ModelProposer(0, slots[0])] * len(tokens),
                     len(target_probs), len(target_probs[0]))


def verify_rejection(b, rng):
    return verify_run(b, rng)


def greedy_verdict(tokens, target_logits):
    """Greedy verification of `tokens` against rows of target logits (the draft's rows unused)."""
    target_logits = np.asarray(target_logits, dtype=np.float64)
    draft = np.full((max(len(tokens), 1), target_logits.shape[1]), 1.0 / target_logits.shape[1])
    slots = [RowsOnly(np.log(draft)), RowsOnly(target_logits)]
    b = RowBundle(slots, Single(1), SamplingParams(temperature=0.0), list(tokens), [ModelProposer(0, slots[0])] * len(tokens),
                  len(target_logits), target_logits.shape[1])
    return verify_run(b, np.random.default_rng(0))


def onehot_logits(ids, n=6):
    rows = np.zeros((len(ids), n), dtype=np.float32)
    rows[np.arange(len(ids)), ids] = 5.0
    return rows


def test_greedy_accepts_all_and_takes_bonus():
    v = greedy_verdict([1, 2, 3], onehot_logits([1, 2, 3, 4]))
    assert (v.num_accepted, v.next_token, v.next_kind) == (3, 4, BONUS)
    assert v.accepted_kinds == [ACCEPTED] * 3


def test_greedy_replaces_first_mismatch():
    v = greedy_verdict([1, 2, 3], onehot_logits([1, 5, 3, 4]))
    assert (v.num_accepted, v.next_token, v.next_kind) == (1, 5, CORRECTION)


def test_greedy_rejects_first_token():
    v = greedy_verdict([1], onehot_logits([0, 4]))
    assert (v.num_accepted, v.next_token) == (0, 0)


def test_greedy_without_a_bonus_row_emits_nothing_after_a_fully_accepted_run():
    v = greedy_verdict([1, 2], onehot_logits([1, 2]))
    assert (v.num_accepted, v.next_token) == (2, None)


def random_dist(rng, n):
    d = rng.random(n) ** 3
    return d / d.sum()


@pytest.mark.parametrize("k", [1, 2])
def test_rejection_sampling_matches_target_distribution(k):
    """The first emitted token follows p whatever q is; both the residual and bonus paths occur."""
    rng = np.random.default_rng(0)
    n = 6
    target = [random_dist(rng, n) for _ in range(k + 1)]
    draft = [random_dist(rng, n) for _ in range(k)]
    counts = np.zeros(n)
    paths = {"residual": 0, "bonus": 0}
    trials = 20000
    for _ in range(trials):
        tokens = [int(rng.choice(n, p=q)) for q in draft]
        v = verify_rejection(bundle(tokens, draft, target), rng)
        emitted = tokens[: v.num_accepted] + [v.next_token]
        counts[emitted[0]] += 1
        paths["bonus" if v.next_kind == BONUS else "residual"] += 1
    assert paths["residual"] > 1000 and paths["bonus"] > 1000
    assert_matches(counts, target[0])


def test_rejection_sampling_second_position_is_target_conditional():
    """With context-free rows, the token emitted at position 2 (when position 1 was accepted)
    follows p_2: accepted draft tokens do not bias what comes after them."""
    rng = np.random.default_rng(1)
    n = 5
    target = [random_dist(rng, n) for _ in range(3)]
    draft = [random_dist(rng, n) for _ in range(2)]
    counts = np.zeros(n)
    for _ in range(30000):
        tokens = [int(rng.choice(n, p=q)) for q in draft]
        v = verify_rejection(bundle(tokens, draft, target), rng)
        emitted = tokens[: v.num_accepted] + [v.next_token]
        if len(emitted) >= 2:
            counts[emitted[1]] += 1
    assert_matches(counts, target[1])


def test_identical_distributions_accept_everything():
    rng = np.random.default_rng(2)
    p = random_dist(rng, 8)
    for _ in range(200):
        tokens = [int(rng.choice(8, p=p)) for _ in range(3)]
        v = verify_rejection(bundle(tokens, [p] * 3, [p] * 4), rng)
        assert v.num_accepted == 3 and v.next_kind == BONUS


def test_chi2_helper_rejects_a_wrong_distribution():
    # The helper must be able to fail: counts from a different distribution.
    with pytest.raises(AssertionError):
        assert_matches(np.array([500, 300, 200]), np.array([0.2, 0.3, 0.5]))
    assert 20 < chi2_critical(5) < 22  # true value 20.52


def test_an_arbiter_keeps_mismatching_tokens_and_verification_goes_on():
    """The CoSpec hook: at each mismatch the arbiter is asked (with the greedy choice); a kept token
    is ARBITRATED and the next one is still verified; a refusal ends the run with the correction."""
    from cospec_local.verify import ARBITRATED

    logits = onehot_logits([1, 5, 3, 0, 4])
    asked = []

    def keep_first(j, choice):
        asked.append((j, choice))
        return len(asked) == 1

    b = bundle([1, 2, 3, 4], np.full((4, 6), 1 / 6), np.exp(logits) / np.exp(logits).sum(1, keepdims=True), temperature=0.0)
    b.slots[1].rows = list(logits)
    v = verify_run(b, np.random.default_rng(0), keep_first)
    assert asked == [(1, 5), (3, 0)]
    assert (v.num_accepted, v.next_token, v.next_kind) == (3, 0, CORRECTION)
    assert v.accepted_kinds == [ACCEPTED, ARBITRATED, ACCEPTED]
    assert (v.mismatches, v.overrides) == (2, 1)
