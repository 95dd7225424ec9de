"""The embedded default pair (Gemma 3 270M and its vocabulary-trimmed draft), end to end."""

import numpy as np
import pytest

from cospec_local import load_pair
from cospec_local.backend import LlamaModel, LoadOptions

PROMPTS = ["The history of the Roman Empire", "User: How do I boil an egg?\nAssistant:"]


@pytest.fixture(scope="module")
def pair(default_pair_paths):
    draft, target = default_pair_paths
    with load_pair(draft, target, n_ctx=2048, n_threads=2) as p:
        yield p


def test_default_pair_is_a_trimmed_gemma(pair):
    assert pair.target.n_vocab == 262144
    assert pair.report.trimmed
    assert 16384 < pair.draft.n_vocab < 20000


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculative_equals_target_only(pair, k):
    for prompt in PROMPTS:
        ref = pair.generate(prompt, temperature=0, mode="target", max_tokens=40)
        out = pair.generate(prompt, temperature=0, mode="spec", draft_max=k, adaptive=False, draft_p_min=0, max_tokens=40)
        assert out.tokens == ref.tokens
        assert out.stats.acceptance_rate > 0.5  # same weights, trimmed head: mostly agrees


def test_adaptive_speculative_equals_target_only(pair):
    ref = pair.generate(PROMPTS[0], temperature=0, mode="target", max_tokens=64)
    out = pair.generate(PROMPTS[0], temperature=0, max_tokens=64)
    assert out.tokens == ref.tokens


def test_multi_turn_chat_equals_target_only(pair):
    turns = ["Hello! Who are you?", "What is the capital of Italy?"]
    replies = {}
    for mode in ("target", "spec"):
        chat = pair.chat()
        replies[mode] = [chat.say(t, temperature=0, max_tokens=24, mode=mode).tokens for t in turns]
    assert replies["spec"] == replies["target"]


def test_rollback_past_the_sliding_window_matches_a_fresh_context(default_pair_paths):
    """Gemma 3 uses a 512-token sliding window on most layers; after rolling back a rejected run
    far past it, the next logits must equal a fresh context's (the cache must not have evicted
    positions the rolled-back token still attends to)."""
    _, target = default_pair_paths
    text = " ".join(f"item {i} is red." for i in range(200))
    with LlamaModel(target, LoadOptions(n_ctx=2048, n_threads=2)) as model:
        prompt = model.tokenize(text)[:700]
        model.eval(prompt, 0)
        model.eval(model.tokenize(" blue green yellow orange purple", add_bos=False), 5)  # rejected run
        model.rollback(len(prompt))
        after = model.eval([1800], 1)[0].copy()
        model.reset()
        fresh = model.eval(prompt + [1800], 1)[0].copy()
    assert int(np.argmax(after)) == int(np.argmax(fresh))
    np.testing.assert_allclose(after, fresh, atol=0.05)
