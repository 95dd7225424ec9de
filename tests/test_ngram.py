"""N-gram (prompt-lookup) drafts: the index, lossless greedy and sampled decoding, and the CLI."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.api import collect
from cospec_local.lab.bench import GROUNDED_PROMPTS
from cospec_local.config import GenerationConfig
from cospec_local.ngram import NgramIndex, OneHotProposal, SharedNgramPool
from cospec_local.sampling import SamplingParams, logits_to_probs
from cospec_local.lab.testworld.tasks import problems
from cospec_local.verify import ACCEPTED, CORRECTION
from fake_backend import N_VOCAB, make_engine, run
from stats_util import assert_matches

FAMILY = Path(__file__).resolve().parents[1] / "models" / "family"


# -- the index ------------------------------------------------------------------------------------------


def test_a_context_without_repetition_proposes_nothing():
    assert NgramIndex().propose(list(range(50)), 5) == []
    assert NgramIndex().propose([7], 5) == []


def test_the_longest_repeated_suffix_wins_and_its_latest_occurrence():
    index = NgramIndex(n_max=3, n_min=2)
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 9, 5, 1, 2, 3, 4, 7, 1, 2, 3]
    # Suffix (1, 2, 3) occurred at 4..6, followed by 4 7 1 ...; (2, 3) alone would say the same.
    assert index.propose(tokens, 3) == [4, 7, 1]
    tokens = [1, 2, 8, 1, 2, 9, 1, 2]  # (1, 2) occurred twice before: the latest (followed by 9) wins
    assert NgramIndex(n_max=3, n_min=2).propose(tokens, 2) == [9, 1]


def test_the_suffix_never_matches_itself_and_the_index_follows_growth_and_replacement():
    index = NgramIndex(n_max=2, n_min=2)
    tokens = [4, 5, 6]
    assert index.propose(tokens, 3) == []
    tokens += [4, 5]
    assert index.propose(tokens, 3) == [6, 4, 5]  # grows: only the new tokens are indexed
    assert index.propose([9, 8, 9, 8], 2) == [9, 8]  # another sequence: indexed afresh
    assert index.propose([4, 5, 6, 1, 2], 2) == []


def test_the_shared_pool_continues_from_earlier_generations_but_never_across_two():
    pool = SharedNgramPool(n_max=3, n_min=2)
    assert pool.propose([1, 2], 3) == []
    pool.add([1, 2, 3, 4, 5])
    pool.add([7, 8, 9])
    assert pool.propose([0, 1, 2], 3) == [3, 4, 5]
    assert pool.propose([6, 4, 5], 3) == []  # (4, 5) ended its generation: nothing of the next one follows
    assert pool.propose([7, 8], 5) == [9]
    small = SharedNgramPool(max_tokens=8, n_max=2, n_min=2)
    small.add([1, 2, 3, 4, 5])
    small.add([6, 7, 8, 9])  # over the limit: starts over with the newest
    assert small.propose([1, 2], 2) == [] and small.propose([6, 7], 2) == [8, 9]


def test_one_hot_proposal_residual_removes_the_token():
    r = np.array([0.1, 0.6, 0.3])
    q = OneHotProposal(1)
    assert q[1] == 1.0 and q[0] == 0.0
    np.testing.assert_array_equal(q.residual_from(r), [0.1, 0.0, 0.3])
    np.testing.assert_array_equal(r, [0.1, 0.6, 0.3])  # r untouched


# -- sampled decoding follows the target exactly ---------------------------------------------------------

SAMPLING = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
REPEATING_PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]


def test_sampled_output_with_one_hot_proposals_follows_the_target():
    """Rejection sampling with deterministic (one-hot) proposals: the joint law of the first two
    tokens equals the target's, p(t1 | prompt) p(t2 | prompt t1) (chi-square over 36 cells), and
    both accepted proposals and residual corrections occurred."""
    engine, (target,) = make_engine((22,))
    config = GenerationConfig(mode="spec", draft_source="ngram", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                              adaptive=False, draft_max=3, max_tokens=2)
    counts = np.zeros(N_VOCAB * N_VOCAB)
    kinds = set()
    rng_seeds = np.random.default_rng(0).integers(0, 2**31, size=3000)
    for seed in rng_seeds:
        result, events, _ = run(engine, REPEATING_PROMPT, config.with_(seed=int(seed)))
        counts[result.tokens[0] * N_VOCAB + result.tokens[1]] += 1
        kinds.update(e.source for e in events)
    p = lambda prefix: logits_to_probs(target.logits_after(prefix), SAMPLING)  # noqa: E731
    first = p(REPEATING_PROMPT)
    exact = np.concatenate([first[a] * p(REPEATING_PROMPT + [a]) for a in range(N_VOCAB)])
    assert_matches(counts, exact)
    assert {ACCEPTED, CORRECTION} <= kinds


def test_the_proposals_are_made_and_counted():
    engine, _ = make_engine((22,))
    config = GenerationConfig(mode="spec", draft_source="ngram", temperature=0, adaptive=False, draft_max=3, max_tokens=30)
    result, events, _ = run(engine, REPEATING_PROMPT, config)
    assert result.stats.n_drafted > 0
    assert {e.slot for e in events if e.source == ACCEPTED} == {"ngram"}  # accepted proposals came from the lookup
    no_repeats, _, _ = run(make_engine((22,))[0], [0, 1, 2, 3, 4, 5], config.with_(max_tokens=1))
    assert no_repeats.stats.n_drafted == 0 and no_repeats.stats.n_target_steps == 1


# -- greedy: token for token the target's output ----------------------------------------------------------


@pytest.fixture(scope="module")
def family_pair():
    with load_pair(FAMILY / "draft.gguf", FAMILY / "target.gguf", n_ctx=512, n_threads=1) as pair:
        yield pair


@pytest.mark.parametrize("source", ["ngram", "ngram+model"])
def test_greedy_ngram_equals_target_only_on_the_test_world(family_pair, source):
    drafted = 0
    for problem in problems("add", "eval", 3) + problems("count", "eval", 3):
        ref = family_pair.generate(problem.prompt, temperature=0, mode="target", max_tokens=80)
        out = family_pair.generate(problem.prompt, temperature=0, mode="spec", draft_source=source, max_tokens=80)
        assert out.tokens == ref.tokens
        drafted += out.stats.n_drafted
    assert drafted > 0


def test_a_shared_pool_speeds_a_repeated_request_and_leaks_nothing_into_another(family_pair):
    """Conversations sharing a pool (the server's --shared-ngrams): a request repeated in another
    conversation is proposed from the first one's reply (fewer target calls per token), and every
    output stays token for token target-only's, also for a request the pool knows nothing of."""
    pool = SharedNgramPool()
    first, second, other = (family_pair.engine.new_conversation() for _ in range(3))
    for conversation in (first, second, other):
        conversation.ngram_pool = pool
    config = GenerationConfig(mode="spec", draft_source="ngram", temperature=0, max_tokens=80, adaptive=False)
    prompt, unrelated = problems("add", "eval", 5)[4].prompt, problems("count", "eval", 5)[4].prompt
    outputs = {}
    for name, conversation, text in (("first", first, prompt), ("second", second, prompt), ("other", other, unrelated)):
        family_pair.engine.reset()
        outputs[name] = collect(family_pair.engine.stream(family_pair.tokenize(text), config, conversation=conversation))
    assert outputs["first"].tokens == outputs["second"].tokens == family_pair.generate(prompt, temperature=0, mode="target", max_tokens=80).tokens
    assert outputs["other"].tokens == family_pair.generate(unrelated, temperature=0, mode="target", max_tokens=80).tokens
    calls = {name: out.stats.model_calls["target"] / out.stats.n_generated for name, out in outputs.items()}
    assert calls["second"] < 0.5 * calls["first"], calls


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_chain_drafts_with_both_proposers_and_stays_lossless(family_pair, adaptive):
    """ngram+model: the chain picks a proposer per cycle (fixed lengths: the lookup when it has a
    match, else the draft). On a prompt that holds a solved problem before the next one, both the
    lookup and the draft model get accepted tokens, and greedy output is target-only's."""
    solved, asked = problems("add", "eval", 8)[6:8]
    prompt = solved.prompt + solved.solution + "\n" + asked.prompt
    ref = family_pair.generate(prompt, temperature=0, mode="target", max_tokens=120)
    events = list(family_pair.stream(prompt, temperature=0, mode="spec", draft_source="ngram+model", max_tokens=120,
                                     adaptive=adaptive))
    assert [e.token for e in events[:-1] if e.token >= 0] == ref.tokens
    if not adaptive:  # with adaptive lengths the choice follows timings: only the output is fixed
        assert {e.slot for e in events[:-1] if e.source == ACCEPTED} == {"ngram", "draft"}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["ngram", "ngram+model"])
def test_greedy_ngram_equals_target_only_on_the_default_pair(default_pair_paths, source):
    draft, target = default_pair_paths
    with load_pair(draft, target, n_ctx=1024, n_threads=2) as pair:
        for prompt in GROUNDED_PROMPTS[:2] + ["The history of the Roman Empire"]:
            ref = pair.generate(prompt, temperature=0, mode="target", max_tokens=64)
            out = pair.generate(prompt, temperature=0, mode="spec", draft_source=source, max_tokens=64)
            assert out.tokens == ref.tokens
        grounded = pair.generate(GROUNDED_PROMPTS[0], temperature=0, mode="spec", draft_source=source, max_tokens=64)
        assert grounded.stats.acceptance_rate > 0.6  # the quoted paragraph is found in the prompt


def test_cli_ngram_needs_no_draft(tmp_path):
    out = CliRunner().invoke(cli, ["generate", problems("add", "eval", 1)[0].prompt, "--target", str(FAMILY / "target.gguf"),
                                   "--ctx-size", "512", "--threads", "1", "--draft-source", "ngram", "--temperature", "0",
                                   "--max-tokens", "40"])
    assert out.exit_code == 0, out.output
    ref = CliRunner().invoke(cli, ["generate", problems("add", "eval", 1)[0].prompt, "--target", str(FAMILY / "target.gguf"),
                                   "--ctx-size", "512", "--threads", "1", "--mode", "target", "--temperature", "0",
                                   "--max-tokens", "40"])
    assert out.stdout == ref.stdout
    # Other modes ignore the draft source (a server's default must not refuse them).
    ignored = CliRunner().invoke(cli, ["generate", problems("add", "eval", 1)[0].prompt, "--target", str(FAMILY / "target.gguf"),
                                       "--ctx-size", "512", "--threads", "1", "--mode", "target", "--draft-source", "ngram",
                                       "--temperature", "0", "--max-tokens", "40"])
    assert ignored.exit_code == 0 and ignored.stdout == ref.stdout
