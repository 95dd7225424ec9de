"""The collaborative modes on scripted fake models (tests/fake_backend.py): exact sampling from r,
greedy equivalence with collab, model-call counts and cache rollback.

r at a position is the mode's combination of the members' processed rows at that prefix:
WE r = sum_i w_i p_i, CD r = softmax((l_target - mu l_draft) / T). The references below are built
from the fake models' logits directly (a pure function of the prefix), never through the engine.
"""

import numpy as np
import pytest

from cospec_local.config import GenerationConfig
from cospec_local.sampling import SamplingParams, logits_to_probs
from cospec_local.verify import ACCEPTED, BONUS, CORRECTION, SAMPLED
from fake_backend import N_VOCAB, make_engine, run
from stats_util import assert_matches, chi2_critical

PROMPT = [1, 2, 3]
TRIALS = 3000
SEEDS_2 = (11, 22)  # draft, target
SEEDS_3 = (11, 22, 33)  # draft, target, model1
SAMPLING = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
UNFILTERED = dict(top_k=0, top_p=1.0, min_p=0.0, adaptive=False)


# -- the reference -----------------------------------------------------------------------------------
def reference_r(models, combine="we", weights=None, mu=0.1):
    """r(prefix) over the fake models, straight from their logits."""
    if combine == "cd":
        draft, target = models

        def r(prefix):
            contrast = target.logits_after(prefix).astype(np.float64) - mu * draft.logits_after(prefix)
            return logits_to_probs(contrast, SAMPLING)

        return r
    w = np.asarray(weights if weights is not None else [1.0] * len(models), dtype=np.float64)
    w = w / w.sum()

    def r(prefix):
        return sum(wi * logits_to_probs(m.logits_after(prefix), SAMPLING) for wi, m in zip(w, models))

    return r


def own_probs(model):
    """One model's own processed distribution, as an r (for power checks)."""
    return lambda prefix: logits_to_probs(model.logits_after(prefix), SAMPLING)


def exact_joint(r, prompt=PROMPT) -> np.ndarray:
    """P(t1, t2) = r(t1 | prompt) r(t2 | prompt + t1), flattened to N_VOCAB**2 cells."""
    first = r(prompt)
    return np.concatenate([first[a] * r(prompt + [a]) for a in range(N_VOCAB)])


# -- exact sampling from r ---------------------------------------------------------------------------------
CASES = []
for _combine, _extra in [("we", dict(weights=(0.3, 0.7))), ("cd", dict(mu=0.1)), ("cd", dict(mu=0.5))]:
    for _mode, _gamma in [("collab", None), ("cos-naive", (2, 1)), ("cos", (1, 1)), ("cos", (3, 1))]:
        CASES.append((SEEDS_2, _mode, _gamma, _combine, _extra))
for _mode, _gamma in [("collab", None), ("cos-naive", None), ("cos", None), ("cos", (1, 1, 1))]:
    CASES.append((SEEDS_3, _mode, _gamma, "we", {}))


def case_id(case):
    seeds, mode, gamma, combine, extra = case
    parts = [f"{len(seeds)}models", mode, combine] + [f"{k}={v}" for k, v in extra.items()]
    if gamma:
        parts.append("gamma=" + ",".join(map(str, gamma)))
    return "-".join(parts)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_first_two_tokens_follow_r_exactly(case):
    """The joint law of the first two generated tokens equals the exact joint under r (chi-square
    over 36 cells), for every collaborative mode and combination; the proposal machinery really ran
    (accepted proposals and residual corrections both occurred, and in CoS with gamma 1 the target's
    bonus-started proposals were accepted too)."""
    seeds, mode, gamma, combine, extra = case
    engine, models = make_engine(seeds)
    expected = exact_joint(reference_r(models, combine, **extra))
    counts = np.zeros(N_VOCAB * N_VOCAB)
    seen = set()
    for trial in range(TRIALS):
        config = GenerationConfig(mode=mode, combine=combine, gamma=gamma, temperature=1.0, seed=1000 + trial,
                                  max_tokens=2, **UNFILTERED, **extra)
        result, events, done = run(engine, PROMPT, config)
        assert result.tokens == [e.token for e in events] and len(result.tokens) == 2
        assert done.finish_reason == "length"
        counts[result.tokens[0] * N_VOCAB + result.tokens[1]] += 1
        seen.update((e.source, e.slot) for e in events)
    assert_matches(counts, expected)
    if mode == "collab":  # nothing proposed: every token is a draw from r over all models
        assert {slot for _, slot in seen} == {"combined"}
        assert {source for source, _ in seen} <= {SAMPLED, BONUS}
        return
    assert (CORRECTION, "combined") in seen  # the residual path
    assert (ACCEPTED, "draft") in seen  # accepted proposals
    if mode == "cos-naive":  # only the draft proposes
        assert {slot for source, slot in seen if source == ACCEPTED} == {"draft"}
    if mode == "cos" and gamma is not None and gamma[0] == 1:
        assert (ACCEPTED, "target") in seen  # a proposal started by the target's bonus sample


def test_the_sampling_tests_have_power():
    """At TRIALS generations the chi-square test above would reject the wrong laws a broken engine
    is most likely to follow: the target alone (r ignored) or the first proposer's own distribution
    (proposals never corrected). The chi-square statistic under a wrong law is about noncentrality + df;
    we ask the noncentrality alone to exceed the critical value (computed for all 36 cells: conservative)."""
    critical = chi2_critical(N_VOCAB * N_VOCAB - 1)
    _, models = make_engine(SEEDS_2)
    draft, target = models
    for combine, extra in [("we", dict(weights=(0.3, 0.7))), ("cd", dict(mu=0.1)), ("cd", dict(mu=0.5))]:
        r_joint = exact_joint(reference_r(models, combine, **extra))
        for wrong in (own_probs(target), own_probs(draft)):
            wrong_joint = exact_joint(wrong)
            noncentrality = TRIALS * float(((wrong_joint - r_joint) ** 2 / r_joint).sum())
            assert noncentrality > critical, (combine, extra, noncentrality)


def test_cos_proposals_start_from_every_models_bonus():
    """Over longer generations CoS hands the proposal to whichever model's bonus sample survived:
    accepted tokens come from every model, not just the first proposer. (With the default gamma the
    draft's 6 tokens fill the 7-token exact batch, leaving no room for bonus samples, so the
    three-model cases use shorter first proposals.)"""
    for seeds, gamma in [(SEEDS_2, (3, 1)), (SEEDS_3, (3, 1, 1)), (SEEDS_3, (1, 1, 1)), (SEEDS_3, (1, 1, 3))]:
        engine, _ = make_engine(seeds)
        proposers = set()
        for seed in range(30):
            config = GenerationConfig(mode="cos", gamma=gamma, temperature=1.0, seed=seed, max_tokens=30, **UNFILTERED)
            _, events, _ = run(engine, PROMPT, config)
            proposers.update(e.slot for e in events if e.source == ACCEPTED)
        assert proposers == set(slot.name for slot in engine.slots), (seeds, gamma)


# -- greedy equivalence ----------------------------------------------------------------------------------
GREEDY_PROMPTS = [[1, 2, 3], [0], [5, 4, 3, 2, 1, 0, 1], [2, 2]]
GREEDY_SETUPS = [
    (SEEDS_2, "we", dict(weights=(0.3, 0.7))),
    (SEEDS_2, "we", {}),
    (SEEDS_2, "cd", dict(mu=0.1)),
    (SEEDS_2, "cd", dict(mu=0.5)),
    (SEEDS_3, "we", {}),
    (SEEDS_3, "we", dict(weights=(0.2, 0.5, 0.3))),
]


@pytest.mark.parametrize("seeds,combine,extra", GREEDY_SETUPS,
                         ids=[f"{len(s)}models-{c}-" + ",".join(f"{k}={v}" for k, v in e.items()) for s, c, e in GREEDY_SETUPS])
def test_fast_modes_match_collab_greedily(seeds, combine, extra):
    """At temperature 0, cos and cos-naive (several gammas) emit token-for-token what collab emits
    (argmax r at every step) for 40 tokens, while proposals are both accepted and corrected."""
    engine, _ = make_engine(seeds)
    n = len(seeds)
    gammas = [None, (1,) * n, (3,) + (1,) * (n - 1), (1,) * (n - 1) + (2,)]
    sources = set()
    for prompt in GREEDY_PROMPTS:
        base = dict(combine=combine, temperature=0.0, max_tokens=40, **UNFILTERED, **extra)
        reference, _, _ = run(engine, prompt, GenerationConfig(mode="collab", **base))
        assert len(reference.tokens) == 40
        for mode in ("cos", "cos-naive"):
            for gamma in gammas:
                out, _, _ = run(engine, prompt, GenerationConfig(mode=mode, gamma=gamma, **base))
                assert out.tokens == reference.tokens, (prompt, mode, gamma)
                sources.update(out.sources)
    assert {ACCEPTED, CORRECTION} <= sources


# -- model calls -----------------------------------------------------------------------------------
def counted_run(engine, models, prompt, config):
    """Run once; check the fake's own call counters against the engine's stats; return (tokens, calls)."""
    before = [m.calls for m in models]
    result, _, done = run(engine, prompt, config)
    calls = {slot.name: m.calls - b for slot, m, b in zip(engine.slots, models, before)}
    assert {k: v for k, v in calls.items() if v} == done.stats.model_calls
    assert sum(calls.values()) == done.stats.total_model_calls
    return result.tokens, sum(calls.values())


@pytest.mark.parametrize("combine,extra", [("we", {}), ("cd", dict(mu=0.5))])
def test_cos_never_calls_the_models_more_than_collab(combine, extra):
    """CoS with gamma (1,1) reaches the same greedy output as collab with at most as many model calls
    (every call scores the pending proposal and proposes the next token), and fewer in total; collab
    costs exactly one call per model per token. Calls are counted by the fake and by the engine."""
    engine, models = make_engine(SEEDS_2)
    max_tokens = 30
    total_cos = total_collab = 0
    for prompt in GREEDY_PROMPTS + [[3], [4, 0, 4], [1, 1, 1, 1, 1]]:
        base = dict(combine=combine, temperature=0.0, max_tokens=max_tokens, **UNFILTERED, **extra)
        ref_tokens, collab_calls = counted_run(engine, models, prompt, GenerationConfig(mode="collab", **base))
        cos_tokens, cos_calls = counted_run(engine, models, prompt, GenerationConfig(mode="cos", gamma=(1, 1), **base))
        assert cos_tokens == ref_tokens
        assert collab_calls == len(models) * max_tokens
        assert cos_calls <= collab_calls, (prompt, cos_calls, collab_calls)
        total_cos += cos_calls
        total_collab += collab_calls
    assert total_cos < total_collab


# -- rollback ---------------------------------------------------------------------------------------
def assert_cache_matches(slot, context):
    """The fake's cache is what the slot believes it is, and a prefix of the committed context."""
    assert slot.model.tokens == slot.history[slot.offset :]
    assert slot.model.n_past == len(slot.history) - slot.offset
    assert slot.history == context[: len(slot.history)]
    assert len(slot.history) <= len(context)


@pytest.mark.parametrize(
    "seeds,mode,gamma",
    [(SEEDS_2, "cos-naive", (4, 1)), (SEEDS_2, "cos", (3, 1)), (SEEDS_2, "cos", (1, 1)), (SEEDS_3, "cos", None),
     (SEEDS_2, "spec", None)],
)
def test_rejections_roll_every_cache_back_to_the_committed_context(seeds, mode, gamma):
    """After a rejection every model's cache holds exactly what a fresh run over the committed
    context would (the context minus its last token, whose row starts the next proposal), so the
    rows it computes next are for the right prefix; at the end, and after a consumer stops early,
    every cache is a prefix of the committed context."""
    engine, models = make_engine(seeds)
    n_checked = 0
    for seed in range(12):
        conversation = engine.new_conversation()
        # spec's model draft: an n-gram proposal leaves the draft's cache behind (it catches up later)
        config = GenerationConfig(mode=mode, gamma=gamma, temperature=1.0, seed=seed, max_tokens=25, draft_source="model",
                                  draft_max=4, draft_p_min=0.0, **UNFILTERED)
        stream = engine.stream(PROMPT, config, conversation=conversation)
        for event in stream:
            if getattr(event, "source", None) == CORRECTION:
                context = conversation.context
                for slot in engine.slots:
                    assert slot.model.tokens == context[:-1], (slot.name, seed)
                    assert_cache_matches(slot, context)
                n_checked += 1
                if seed % 3 == 0:  # a consumer that stops right after a correction
                    stream.close()
                    break
        for slot in engine.slots:
            assert_cache_matches(slot, conversation.context)
    assert n_checked >= 20


def test_a_model_that_cannot_roll_back_never_leaves_the_engine_busy():
    """A target whose memory refuses partial removal fails the first rejection with RollbackError;
    the engine cleans up (that cache starts over) and the next call runs instead of raising
    EngineBusyError."""
    from cospec_local import EngineBusyError, RollbackError

    engine, models = make_engine((11, 22))
    target = models[1]
    real_rollback = target.rollback

    def refuse_partial(n_keep):
        if n_keep < target.n_past:
            raise RollbackError("partial removal refused")
        real_rollback(n_keep)

    target.rollback = refuse_partial
    with pytest.raises(RollbackError):
        run(engine, [1, 2, 3], GenerationConfig(mode="spec", temperature=0, max_tokens=40, adaptive=False, draft_p_min=0.0))
    target.rollback = real_rollback
    try:
        result, _, _ = run(engine, [1, 2, 3], GenerationConfig(mode="target", temperature=0, max_tokens=5))
    except EngineBusyError:  # pragma: no cover - the failure this test guards against
        pytest.fail("the engine stayed busy after a failed rollback")
    fresh, _ = make_engine((11, 22))
    assert result.tokens == run(fresh, [1, 2, 3], GenerationConfig(mode="target", temperature=0, max_tokens=5))[0].tokens
