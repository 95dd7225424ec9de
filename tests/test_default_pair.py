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
    drafted = accepted = 0
    for prompt in PROMPTS:
        ref = pair.generate(prompt, temperature=0, mode="target", max_tokens=40)
        out = pair.generate(prompt, temperature=0, mode="spec", draft_source="model", draft_max=k, adaptive=False,
                            draft_p_min=0, max_tokens=40)
        assert out.tokens == ref.tokens
        drafted += out.stats.n_drafted
        accepted += out.stats.n_accepted
    # Same weights, trimmed head: the draft agrees whenever the target's token is in its
    # vocabulary (an unrelated draft scores ~0.05 here).
    assert accepted / drafted > 0.6


def test_long_context_past_the_sliding_window_stays_identical(pair):
    """Past 512 tokens Gemma's sliding window and llama.cpp's long-KV attention paths kick in;
    speculative greedy output must still equal target-only output token for token."""
    prompt = " ".join(f"Note {i}: the meeting is on day {i % 7}." for i in range(60))
    assert len(pair.tokenize(prompt)) > 600
    ref = pair.generate(prompt, temperature=0, mode="target", max_tokens=48)
    out = pair.generate(prompt, temperature=0, mode="spec", draft_max=6, adaptive=False, draft_p_min=0, max_tokens=48)
    assert out.tokens == ref.tokens


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


@pytest.mark.parametrize("prefix_len", [40, 700])
def test_verification_batches_give_bit_identical_logits(default_pair_paths, prefix_len):
    """What greedy equivalence rests on: with this build (no llamafile, no repacking, no flash
    attention) a batch of up to EXACT_CPU_BATCH tokens yields exactly the logits of feeding the
    tokens one at a time, also past the 512-token sliding window."""
    from cospec_local.backend import EXACT_CPU_BATCH

    _, target = default_pair_paths
    with LlamaModel(target, LoadOptions(n_ctx=2048, n_threads=2)) as model:
        text = " ".join(f"Item {i} is a red box." for i in range(150))
        prefix = model.tokenize(text)[:prefix_len]
        run = model.tokenize(" full of wars, emperors and great buildings", add_bos=False)[:EXACT_CPU_BATCH]
        model.eval(prefix, 0)
        single = np.stack([model.eval([t], 1)[0].copy() for t in run])
        model.rollback(len(prefix))
        batch = model.eval(run, len(run)).copy()
    assert np.array_equal(batch, single)


def test_trimmed_draft_is_measurably_cheaper_per_call(default_pair_paths):
    """The point of the trimmed draft: its output head is ~16k rows instead of 262k, which is most
    of Gemma 3 270M's per-token work on a CPU, so one single-token call of the draft must cost well
    under one of the target (about 0.4x when this test was written). Timings are interleaved
    (alternating which model goes first) and compared by their medians over 30 repetitions; the
    0.75 bound leaves a wide margin for noise yet fails for a draft that saves nothing."""
    import statistics
    import time

    from cospec_local.vocab import TokenMap, read_draft_map

    draft_path, target_path = default_pair_paths
    with LlamaModel(target_path, LoadOptions(n_ctx=256, n_threads=2)) as target, \
            LlamaModel(draft_path, LoadOptions(n_ctx=256, n_threads=2)) as draft:
        token_map = TokenMap.from_draft_ids(read_draft_map(draft_path), target.n_vocab, 0)
        prefix = target.tokenize("The history of the Roman Empire")
        step = target.tokenize(" and", add_bos=False)[:1]
        runs = {"target": (target, prefix, step), "draft": (draft, token_map.to_draft(prefix), token_map.to_draft(step))}
        for model, model_prefix, _ in runs.values():
            model.eval(model_prefix, 0)
        times = {name: [] for name in runs}
        for rep in range(32):
            order = ("target", "draft") if rep % 2 == 0 else ("draft", "target")
            for name in order:
                model, model_prefix, model_step = runs[name]
                started = time.perf_counter()
                model.eval(model_step, 1)
                elapsed = time.perf_counter() - started
                model.rollback(len(model_prefix))
                if rep >= 2:  # the first calls warm caches and allocate buffers
                    times[name].append(elapsed)
    ratio = statistics.median(times["draft"]) / statistics.median(times["target"])
    assert ratio < 0.75, f"draft/target cost per call = {ratio:.2f}"


def test_chat_replies_of_the_base_model_stop_at_turn_markers(pair):
    """Gemma 3 270M is a base model (no chat template): the fallback transcript with its preamble
    must give short replies that never contain a turn marker, over a multi-turn conversation whose
    user turns are fixed in advance (before the preamble and the stops, the first reply repeated
    the request as "Assistant: Write a very long essay ..." until max_tokens)."""
    chat = pair.chat()
    assert "fallback" in chat.template.name
    turns = ["Write a very long essay about the history of the Roman empire", "What is the capital of France?",
             "Thanks! And of Italy?"]
    for turn in turns:
        reply = chat.say(turn, temperature=0, max_tokens=150, mode="spec")
        assert reply.text.strip()
        for marker in ("User:", "Assistant:"):
            assert marker not in reply.text
        assert turn not in reply.text  # not an echo of the request
        assert reply.finish_reason == "stop"  # ended at a marker or EOS, not at max_tokens
    assert len(chat.messages) == 2 * len(turns)


@pytest.mark.parametrize("exact_prefill", [True, False])
def test_a_reused_cache_equals_a_fresh_one_only_with_exact_prefill(default_pair_paths, exact_prefill):
    """The next-token logits after a context must not depend on how the cache was filled (all at
    once, or a prompt and then a reply decoded token by token, as a chat's next turn or a server
    slot reuses them). With
    prefill batches of at most `exact_batch` tokens they are bit-identical; with llama.cpp's large
    prefill batches they are not on this CPU build (which is why exact prefill is the default)."""
    _, target = default_pair_paths
    tokens = None
    with LlamaModel(target, LoadOptions(n_ctx=512, n_threads=2, exact_prefill=exact_prefill)) as m:
        tokens = m.tokenize("A conversation between a User and an Assistant.\n\nUser: Tell me one fact about "
                            "the number 17, and why it matters to mathematicians.\nAssistant:")
        assert len(tokens) > 3 * m.exact_batch
        m.eval(tokens[:-1], 0)
        fresh = m.eval(tokens[-1:], 1)[0].copy()
        m.reset()
        m.eval(tokens[:20], 0)  # a cached prompt...
        for token in tokens[20:-1]:  # ...and a reply decoded one token at a time
            m.eval([token], 0)
        reused = m.eval(tokens[-1:], 1)[0].copy()
    assert np.array_equal(fresh, reused) == exact_prefill
