"""AdaptiveDraftLength: the draft-length policy, as pure arithmetic on fed measurements (no models)."""

import pytest

from cospec_local.draft_length import AdaptiveDraftLength


def reference_best_k(alpha: float, t_draft: float, verify, k_max: int) -> int:
    """The k in [1, k_max] minimising expected seconds per token, computed from the formula in
    the class docstring: a cycle drafting k tokens yields (1 - alpha^(k+1)) / (1 - alpha) tokens
    and costs k * t_draft + t_verify(k + 1)."""
    def per_token(k):
        tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
        return (k * t_draft + verify(k + 1)) / tokens

    return min(range(1, k_max + 1), key=per_token)


def policy_with(accept: tuple[int, int], n_accept_obs: int, t_draft: float, verify_line: tuple[float, float]):
    """A policy fed `n_accept_obs` identical acceptance observations, draft steps of `t_draft`
    seconds and target calls timed on the exact line t(n) = a + b * n for n = 1..8."""
    policy = AdaptiveDraftLength()
    for _ in range(n_accept_obs):
        policy.observe_acceptance(*accept)
    for _ in range(5):
        policy.observe_draft_step(t_draft)
    a, b = verify_line
    for n in range(1, 9):
        policy.observe_target(n, a + b * n)
    return policy


def drafting_loses_policy() -> AdaptiveDraftLength:
    """Measured: plain target steps take 0.1 s per token, drafting cycles 0.5 s per token."""
    policy = policy_with((4, 4), 50, t_draft=0.001, verify_line=(0.1, 0.0))
    policy.observe_cycle(0, 0.1, 1)
    policy.observe_cycle(4, 1.0, 2)
    assert policy.drafting_loses
    return policy


def drafting_wins_policy() -> AdaptiveDraftLength:
    """Measured: drafting cycles take 0.02 s per token, plain target steps 0.1 s per token."""
    policy = policy_with((4, 4), 50, t_draft=0.001, verify_line=(0.1, 0.0))
    policy.observe_cycle(0, 0.1, 1)
    policy.observe_cycle(4, 0.1, 5)
    assert not policy.drafting_loses
    return policy


def expected_probe_calls(n_calls: int) -> list[int]:
    """Probe schedule from the class constants: first after FIRST_PROBE calls, then each interval
    PROBE_GROWTH times the previous, capped at LAST_PROBE."""
    P = AdaptiveDraftLength
    out, at, interval = [], 0, P.FIRST_PROBE
    while at + interval <= n_calls:
        at += interval
        out.append(at)
        interval = min(interval * P.PROBE_GROWTH, P.LAST_PROBE)
    return out


def test_prior_acceptance_is_point_eight_and_a_fresh_policy_drafts_the_cap():
    """Before any measurement the policy assumes 80% acceptance and drafts as long as allowed:
    a fresh conversation starts by speculating."""
    policy = AdaptiveDraftLength()
    assert policy.alpha == pytest.approx(0.8)
    assert [policy.choose(k) for k in (1, 3, 7)] == [1, 3, 7]


def test_acceptance_estimate_follows_observations_with_decay():
    """observe_acceptance counts accepted tokens as successes and a rejection as one failure,
    forgetting old evidence at rate `decay`: all-rejected cycles drive alpha toward 0, one accepted
    token out of four per cycle toward 1/2."""
    policy = AdaptiveDraftLength()
    for _ in range(100):
        policy.observe_acceptance(4, 0)
    assert policy.alpha < 0.01
    for _ in range(200):
        policy.observe_acceptance(4, 1)
    assert policy.alpha == pytest.approx(0.5, abs=1e-3)
    # Fully accepted cycles add no failure: alpha climbs toward 1.
    for _ in range(100):
        policy.observe_acceptance(4, 4)
    assert policy.alpha > 0.99


def test_high_acceptance_and_cheap_drafts_pick_a_long_draft():
    """With nearly every draft token accepted and a draft step costing 1% of a target call, the
    longest allowed draft is the cheapest per token."""
    policy = policy_with((6, 6), 100, t_draft=0.001, verify_line=(0.1, 0.002))
    assert policy.alpha > 0.99
    assert policy.best_draft_length(8) == 8
    assert policy.choose(8) == 8


def test_low_acceptance_picks_a_short_draft():
    """With about one token in five accepted and a draft step costing 30% of a target call, each
    extra drafted token is mostly wasted: k = 1."""
    policy = policy_with((4, 0), 1, t_draft=0.03, verify_line=(0.1, 0.0))
    for _ in range(100):  # one accepted token per four rejections: alpha near 1/5
        for accepted in (0, 0, 0, 1):
            policy.observe_acceptance(4, accepted)
    assert 0.15 < policy.alpha < 0.3
    assert policy.best_draft_length(8) == 1
    assert policy.choose(8) == 1


@pytest.mark.parametrize(
    "accepted, t_draft, slope, expected_k",
    [(2, 0.005, 0.0, 5), (2, 0.01, 0.01, 3), (3, 0.01, 0.0, 5), (6, 0.02, 0.01, 4), (2, 0.02, 0.0, 2)],
)
def test_best_draft_length_matches_the_cost_model(accepted, t_draft, slope, expected_k):
    """Intermediate cases (alpha = accepted / (accepted + 1), a 0.1 s target call plus `slope` per
    row): the chosen k is the argmin of the documented cost per token, strictly inside [1, 8].
    `expected_k` was checked by hand (e.g. alpha 2/3, 5 ms drafts, flat verify: k = 4, 5, 6 cost
    46.07, 45.68, 46.03 ms per token) and is recomputed here from the formula."""
    policy = AdaptiveDraftLength()
    for _ in range(300):
        policy.observe_acceptance(8, accepted)
    assert policy.alpha == pytest.approx(accepted / (accepted + 1), rel=1e-6)
    for _ in range(5):
        policy.observe_draft_step(t_draft)
    for n in range(1, 9):
        policy.observe_target(n, 0.1 + slope * n)
    assert reference_best_k(policy.alpha, t_draft, lambda n: 0.1 + slope * n, 8) == expected_k
    assert policy.best_draft_length(8) == expected_k


def test_verify_time_fits_a_line_through_target_samples():
    """Target calls timed exactly on t(n) = 0.05 + 0.01 n give back that line, also outside the
    measured row counts (the model extrapolates to longer drafts)."""
    policy = AdaptiveDraftLength()
    assert policy.verify_time(3) == 0.0  # nothing measured yet
    for n in (1, 2, 3, 5):
        policy.observe_target(n, 0.05 + 0.01 * n)
    for n in (1, 4, 9, 20):
        assert policy.verify_time(n) == pytest.approx(0.05 + 0.01 * n, rel=1e-9)


def test_verify_time_with_one_row_count_assumes_thirty_percent_per_row():
    """Until two row counts have been seen, each extra row is assumed to cost 30% of a call."""
    policy = AdaptiveDraftLength()
    for _ in range(3):
        policy.observe_target(1, 0.1)
    assert policy.verify_time(1) == pytest.approx(0.1)
    assert policy.verify_time(3) == pytest.approx(0.1 + 2 * 0.03)


def test_verify_time_never_decreases_with_rows_and_forgets_old_samples():
    """A measured negative slope (noise) is clamped to zero, and old samples fade with `decay`:
    after many fast calls the fit reflects the new speed."""
    policy = AdaptiveDraftLength()
    for n in (1, 2, 3, 4):
        policy.observe_target(n, 0.2 - 0.01 * n)
    assert policy.verify_time(8) == pytest.approx(policy.verify_time(1))
    for _ in range(200):
        policy.observe_target(1, 1.0)
        policy.observe_target(3, 1.0)
    for _ in range(200):
        policy.observe_target(1, 0.01)
        policy.observe_target(3, 0.01)
    assert policy.verify_time(1) == pytest.approx(0.01, rel=1e-6)
    assert policy.verify_time(3) == pytest.approx(0.01, rel=1e-6)


def test_verify_time_uses_the_measured_slope_once_rows_one_and_two_are_seen():
    """The docstring promises the 30%-per-row guess only "until two row counts have been seen".
    Plain target steps (1 row) and k = 1 cycles (2 rows) are two row counts, many times over; the
    fit must then follow the measured line t(n) = 0.05 + 0.01 n, not the guess (which would give
    a slope of about 0.0128 here and t(5) near 0.110 instead of 0.100)."""
    policy = AdaptiveDraftLength()
    for _ in range(50):
        policy.observe_target(1, 0.06)
        policy.observe_target(2, 0.07)
    for n in (1, 2, 5):
        assert policy.verify_time(n) == pytest.approx(0.05 + 0.01 * n, rel=1e-6)


def test_choose_respects_each_calls_cap():
    """Regression: the cap on k is per call. A policy first used with k_max=2 must draft up to 6
    when a later call allows 6 (the old code kept the first cap forever), and go back to 2 after."""
    fresh = AdaptiveDraftLength()
    assert fresh.choose(2) == 2
    assert fresh.choose(6) == 6
    assert fresh.choose(2) == 2

    measured = policy_with((6, 6), 100, t_draft=0.001, verify_line=(0.1, 0.002))
    measured.observe_cycle(0, 0.1, 1)
    measured.observe_cycle(6, 0.1, 7)  # drafting wins
    assert measured.choose(2) == 2
    assert measured.choose(6) == 6
    assert measured.best_draft_length(6) == 6
    # Never above the cap, also on probes of a drafting loser.
    loser = drafting_loses_policy()
    assert max(loser.choose(3) for _ in range(100)) == 3


def test_no_room_for_a_draft_means_a_target_step():
    """choose(k_max < 1) is always a plain target step, whatever the measurements say."""
    assert AdaptiveDraftLength().choose(0) == 0
    assert drafting_wins_policy().choose(0) == 0


def test_after_a_drafting_measurement_a_target_step_is_measured():
    """Once drafting cycles are timed but target steps are not, the next cycle is a target step,
    so both options get a measurement to compare."""
    policy = policy_with((4, 4), 50, t_draft=0.001, verify_line=(0.1, 0.0))
    policy.observe_cycle(4, 0.1, 5)
    assert policy.choose(4) == 0


def test_when_target_steps_are_faster_choose_returns_zero_except_on_growing_probes():
    """Measured target steps cheaper per token than drafting: choose returns 0, except for probes
    of drafting at the FIRST_PROBE, then x PROBE_GROWTH, intervals (capped at LAST_PROBE)."""
    policy = drafting_loses_policy()
    k = policy.best_draft_length(4)
    results = [policy.choose(4) for _ in range(1000)]
    probes = [i + 1 for i, r in enumerate(results) if r != 0]
    assert probes == expected_probe_calls(1000)
    assert probes[:6] == [8, 40, 168, 424, 680, 936]  # intervals 8, 32, 128, 256, 256, 256
    assert all(results[i - 1] == k for i in probes)  # a probe drafts the modelled best length


def test_when_drafting_is_faster_the_probes_are_target_steps():
    """The mirror case: drafting wins, so choose drafts, and the probes are plain target steps on
    the same growing schedule."""
    policy = drafting_wins_policy()
    results = [policy.choose(4) for _ in range(1000)]
    probes = [i + 1 for i, r in enumerate(results) if r == 0]
    assert probes == expected_probe_calls(1000)
    assert all(r == 4 for i, r in enumerate(results) if i + 1 not in probes)


def test_winner_change_resets_the_probe_interval():
    """When new measurements flip which option is faster, probing goes back to every FIRST_PROBE
    calls; a measurement that keeps the same winner leaves the grown interval alone."""
    policy = drafting_loses_policy()
    for _ in range(200):
        policy.choose(4)
    grown = policy.probe_every
    assert grown == AdaptiveDraftLength.LAST_PROBE  # probes at calls 8, 40 and 168 grew it
    policy.observe_cycle(0, 0.1, 1)  # target steps still faster: no reset
    assert policy.probe_every == grown
    for _ in range(20):  # drafting cycles become fast: the EMA crosses below the target's
        policy.observe_cycle(4, 0.1, 5)
    assert not policy.drafting_loses
    assert policy.probe_every == AdaptiveDraftLength.FIRST_PROBE
    # Behaviour after the reset: the new winner (drafting) is chosen, and a probe of the new loser
    # comes within FIRST_PROBE calls rather than after the grown interval.
    results = [policy.choose(4) for _ in range(AdaptiveDraftLength.FIRST_PROBE)]
    assert 0 in results
    assert results.count(4) >= AdaptiveDraftLength.FIRST_PROBE - 1


def test_a_free_proposer_keeps_proposing_before_any_target_step_and_keeps_target_costs_per_input():
    """The n-gram policy (full_length): with no plain target step measured it goes on proposing (in
    ngram+model mode target steps may not come for long), and a new input forgets acceptance and
    drafting's time per token but not the target step's."""
    policy = AdaptiveDraftLength(full_length=True)
    policy.observe_cycle(6, 0.010, 7)
    assert [policy.choose(6) for _ in range(10)] == [6] * 10
    policy.observe_cycle(0, 0.004, 1)
    policy.new_input()
    assert policy.spec_tpt is None and policy.target_tpt == pytest.approx(0.004)
    assert policy.alpha == pytest.approx(0.8)
    model_draft = AdaptiveDraftLength()
    model_draft.observe_cycle(3, 0.010, 4)
    assert model_draft.choose(6) == 0  # a model draft still measures a target step first


def test_expected_tokens_per_second_charges_draft_steps_and_verification_rows():
    """The proposer chain's yardstick: with the same acceptance and target costs, a proposal that
    costs draft steps is worth less per second than a free one of the same length, and a free
    one is worth more when longer only while rows are cheap."""
    free, model = AdaptiveDraftLength(), AdaptiveDraftLength()
    for policy in (free, model):
        for n_rows, seconds in ((1, 1.0), (5, 1.4)):  # 0.1 s per extra row
            policy.observe_target(n_rows, seconds)
    model.observe_draft_step(0.5)
    assert free.expected_tokens_per_second(3) > model.expected_tokens_per_second(3)
    assert free.expected_tokens_per_second(4) > free.expected_tokens_per_second(1)
    for n_rows, seconds in ((1, 1.0), (5, 9.0)):  # now 2 s per extra row: long proposals lose
        free.observe_target(n_rows, seconds)
    assert free.expected_tokens_per_second(4) < free.expected_tokens_per_second(1)
