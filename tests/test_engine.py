"""The speculative engine on tiny llama.cpp models: greedy equivalence, rollback, sampling."""

import numpy as np
import pytest

from cospec_local import ContextOverflowError, GenerationConfig, load_pair
from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.verify import ACCEPTED, BONUS, CORRECTION, SAMPLED
from stats_util import assert_matches

PROMPTS = ["the cat sat on", "hello world, 12", "a"]


def greedy(pair, prompt, **kw):
    return pair.generate(prompt, temperature=0, **kw)


@pytest.fixture(scope="module")
def target_refs(tiny_target):
    """Target-only greedy outputs (40 tokens) of PROMPTS, computed once for every k below."""
    with load_pair(None, tiny_target, n_ctx=512, n_threads=1) as alone:
        return {prompt: greedy(alone, prompt, mode="target", max_tokens=40).tokens for prompt in PROMPTS}


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_self_draft_accepts_everything_and_matches_target(tiny_target, target_refs, k):
    with load_pair(tiny_target, tiny_target, n_ctx=512, n_threads=1) as pair:
        for prompt in PROMPTS:
            out = greedy(pair, prompt, mode="spec", draft_source="model", draft_max=k, adaptive=False, max_tokens=40)
            assert out.tokens == target_refs[prompt]
            assert out.stats.acceptance_rate == 1.0
            assert out.stats.n_drafted > 0
            assert ACCEPTED in out.sources


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_unrelated_draft_still_matches_target(tiny_target, tiny_other, target_refs, k):
    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        for prompt in PROMPTS:
            out = greedy(pair, prompt, mode="spec", draft_source="model", draft_max=k, adaptive=False, draft_p_min=0.0, max_tokens=40)
            assert out.tokens == target_refs[prompt]
            assert out.stats.n_drafted > 0
            assert out.stats.acceptance_rate < 0.5  # the premise: mostly rejected
            assert CORRECTION in out.sources


def test_adaptive_mode_matches_target_and_backs_off(tiny_target, tiny_other):
    with load_pair(tiny_other, tiny_target, n_ctx=1024, n_threads=1) as pair:
        ref = greedy(pair, PROMPTS[0], mode="target", max_tokens=200)
        out = greedy(pair, PROMPTS[0], mode="spec", draft_source="model", draft_p_min=0.0, max_tokens=200)
        assert out.tokens == ref.tokens
        # With a useless draft the policy falls back to plain target steps most of the time,
        # and its rare probes restart the draft on a short recent window instead of catching up.
        assert out.stats.n_target_steps > out.stats.n_cycles
        assert pair.engine.slot("draft").offset > 0
        # The next call reuses the cache and stays identical to the target alone.
        again = greedy(pair, PROMPTS[0], mode="spec", draft_source="model", draft_p_min=0.0, max_tokens=200)
        assert again.tokens == ref.tokens


def test_consecutive_calls_reuse_cache_and_stay_identical(tiny_target, tiny_other):
    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        first = greedy(pair, PROMPTS[0], mode="spec", draft_source="model", draft_max=4, max_tokens=30)
        # Continue from the committed context: a prompt that extends the previous one.
        cont_prompt = pair.tokenize(PROMPTS[0]) + first.tokens
        cached = pair.target.n_past
        cont = greedy(pair, cont_prompt, mode="spec", draft_source="model", draft_max=4, max_tokens=30)
        # Everything the target had cached is reused; only the uncached tail of the prompt is new.
        assert cached >= len(cont_prompt) - 2
        assert cont.stats.n_prompt_cached == cached
        pair.engine.reset()
        ref = greedy(pair, PROMPTS[0], mode="target", max_tokens=60)
        assert first.tokens + cont.tokens == ref.tokens


def test_rollback_gives_the_same_logits_as_a_fresh_context(tiny_target):
    prompt = [1] + list(range(260, 290))
    junk = list(range(270, 278))
    with LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1)) as model:
        model.eval(prompt, 0)
        model.eval(junk, len(junk))  # a rejected draft run
        model.rollback(len(prompt))
        after_rollback = model.eval([300], 1)[0].copy()
    with LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1)) as fresh:
        expected = fresh.eval(prompt + [300], 1)[0].copy()
    np.testing.assert_allclose(after_rollback, expected, rtol=1e-5, atol=1e-5)


def test_eval_returns_only_requested_rows_chunked_over_n_batch(tiny_target):
    tokens = [1] + [260 + (i % 30) for i in range(150)]
    with LlamaModel(tiny_target, LoadOptions(n_ctx=512, n_batch=64, n_threads=1)) as chunked:
        rows = chunked.eval(tokens, 3).copy()
        assert rows.shape == (3, chunked.n_vocab)
    with LlamaModel(tiny_target, LoadOptions(n_ctx=512, n_batch=256, n_threads=1)) as whole:
        expected = whole.eval(tokens, 3).copy()
    # Different batch shapes take different matmul paths: equal up to float32 rounding.
    np.testing.assert_allclose(rows, expected, rtol=0, atol=5e-3)


def test_multi_turn_chat_matches_target_only(tiny_target, tiny_other):
    turns = ["hi there", "what is 2 and 3?", "ok thanks"]
    replies = {}
    for mode, draft in (("target", None), ("spec", tiny_other), ("spec", tiny_target)):
        with load_pair(draft, tiny_target, n_ctx=1024, n_threads=1) as pair:
            chat = pair.chat()
            out = []
            previous_prompt = 0
            for turn in turns:
                reply = chat.say(turn, temperature=0, max_tokens=25, mode=mode)
                # Each turn reuses at least the previous turn's whole prompt from the cache (the
                # random model's reply may not survive the template's rendering byte for byte).
                assert reply.stats.n_prompt_cached >= previous_prompt - 1
                previous_prompt = reply.stats.n_prompt
                out.append(reply.tokens)
            replies[(mode, draft)] = out
    ref = replies[("target", None)]
    assert replies[("spec", tiny_other)] == ref
    assert replies[("spec", tiny_target)] == ref


def test_chat_reuses_kv_cache_across_turns():
    """A second chat turn evaluates only what the cache lacks: with a model whose replies survive
    the transcript template (the test-world pair writes plain ASCII), the whole first turn."""
    from pathlib import Path

    family = Path(__file__).resolve().parents[1] / "models" / "family"
    with load_pair(family / "draft.gguf", family / "target.gguf", n_ctx=1024, n_threads=1) as pair:
        chat = pair.chat()
        first = chat.say("Q: 12+34=?", temperature=0, max_tokens=12)
        first_context = list(chat.tokens)
        cached = pair.target.n_past
        assert cached >= len(first_context) - 2  # the cache holds the first turn (but its last tokens)
        events = list(chat.send("Q: 5+6=?", temperature=0, max_tokens=5))
        stats = events[-1].stats
        if chat.tokens[: len(first_context)] == first_context:  # the reply re-rendered identically
            assert stats.n_prompt_cached == cached
        else:  # the template normalised the reply: everything before it is still reused
            assert stats.n_prompt_cached >= first.stats.n_prompt - 1
        assert stats.n_prompt - stats.n_prompt_cached < stats.n_prompt // 2
        assert first.stats.n_prompt_cached == 0


def test_stopping_early_leaves_engine_consistent(tiny_target, tiny_other):
    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        stream = pair.stream(PROMPTS[1], temperature=0, max_tokens=50, draft_max=4)
        got = [next(stream).token for _ in range(7)]
        stream.close()  # like Ctrl-C / break in a consumer
        assert pair.target.n_past <= len(pair.conversation.context)
        assert pair.draft.n_past <= len(pair.conversation.context)
        cont = greedy(pair, pair.conversation.context, mode="spec", max_tokens=20).tokens
        pair.engine.reset()
        ref = greedy(pair, PROMPTS[1], mode="target", max_tokens=27).tokens
        assert got + cont == ref


def test_stop_strings_and_max_tokens(tiny_target):
    with load_pair(tiny_target, tiny_target, n_ctx=512, n_threads=1) as pair:
        full = greedy(pair, PROMPTS[0], max_tokens=60)
        assert len(full.tokens) == 60 and full.finish_reason == "length"
        stop = full.text[20:23]
        cut = greedy(pair, PROMPTS[0], max_tokens=60, stop=(stop,))
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(stop)]


def test_draft_only_mode_follows_the_draft(tiny_target, tiny_other):
    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        draft_alone = greedy(pair, PROMPTS[0], mode="draft", max_tokens=20)
    with load_pair(None, tiny_other, n_ctx=512, n_threads=1) as other:
        ref = greedy(other, PROMPTS[0], mode="target", max_tokens=20)
    assert draft_alone.tokens == ref.tokens


def test_speculative_sampling_matches_target_distribution(tiny_target, tiny_other):
    """Two-token outputs of speculative sampling follow the target's (top-k processed) distribution,
    computed exactly from the target's logits; rejections (residual) and bonus tokens both occur."""
    from cospec_local.sampling import SamplingParams, logits_to_probs

    params = dict(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    sp = SamplingParams(**params)
    with load_pair(tiny_other, tiny_target, n_ctx=256, n_threads=1) as pair:
        prompt = pair.tokenize("the")
        # Exact distribution of (t1, t2) under target-only sampling.
        model = pair.target
        pair.engine.reset()
        p1 = logits_to_probs(model.eval(prompt, 1)[0], sp)
        joint = {}
        for t1 in np.flatnonzero(p1):
            model.rollback(len(prompt))
            p2 = logits_to_probs(model.eval([int(t1)], 1)[0], sp)
            for t2 in np.flatnonzero(p2):
                joint[(int(t1), int(t2))] = p1[t1] * p2[t2]
        model.reset()
        pair.engine.reset()
        keys = sorted(joint)
        counts = np.zeros(len(keys))
        drafted = accepted = bonus_cycles = 0
        for seed in range(2500):
            r = pair.generate(prompt, mode="spec", max_tokens=2, seed=seed, draft_max=2, adaptive=False, draft_p_min=0.0, **params)
            counts[keys.index(tuple(r.tokens))] += 1
            drafted += r.stats.n_drafted
            accepted += r.stats.n_accepted
            bonus_cycles += sum(a == d for a, d in zip(r.stats.accepted_lengths, r.stats.draft_lengths))
        assert 0 < accepted < drafted  # some rejections: the residual path ran
        assert bonus_cycles > 0
        assert_matches(counts, np.array([joint[k] for k in keys]))


def test_sampling_with_seed_is_reproducible_at_fixed_draft_length(tiny_target, tiny_other):
    # The adaptive draft length reacts to measured timings, which changes where cycles end and so
    # which random numbers go where; with a fixed k a seed reproduces the tokens exactly.
    with load_pair(tiny_other, tiny_target, n_ctx=256, n_threads=1) as pair:
        a = pair.generate("the", temperature=0.9, seed=7, max_tokens=30, adaptive=False)
        b = pair.generate("the", temperature=0.9, seed=7, max_tokens=30, adaptive=False)
        c = pair.generate("the", temperature=0.9, seed=8, max_tokens=30, adaptive=False)
        assert a.tokens == b.tokens
        assert a.tokens != c.tokens


def test_context_overflow_is_a_clear_error(tiny_target):
    with load_pair(tiny_target, tiny_target, n_ctx=256, n_threads=1) as pair:
        n_ctx = pair.engine.n_ctx  # llama.cpp may round the size up
        with pytest.raises(ContextOverflowError, match="context"):
            pair.generate("a" * (n_ctx + 10), temperature=0)
        # Generation that reaches the end of the context stops cleanly.
        prompt = "a" * (n_ctx - 40)
        r = pair.generate(prompt, temperature=0, max_tokens=100)
        assert r.finish_reason == "context"
        assert len(r.tokens) + len(pair.tokenize(prompt)) == n_ctx


def test_empty_prompt_is_rejected(tiny_target):
    with load_pair(tiny_target, tiny_target, n_ctx=64, n_threads=1) as pair:
        with pytest.raises(ValueError, match="empty"):
            pair.generate("")
        with pytest.raises(ValueError, match="empty"):
            pair.generate([])


def test_bad_generation_config_is_rejected():
    with pytest.raises(ValueError):
        GenerationConfig(mode="bogus")
    with pytest.raises(ValueError):
        GenerationConfig(max_tokens=0)


def test_verification_batch_never_exceeds_the_exact_size(tiny_target):
    from cospec_local.backend import EXACT_CPU_BATCH

    with load_pair(tiny_target, tiny_target, n_ctx=512, n_threads=1) as pair:
        out = greedy(pair, PROMPTS[0], draft_max=20, adaptive=False, max_tokens=60)
        assert max(out.stats.draft_lengths) == EXACT_CPU_BATCH - 1


def test_modes_interleaved_on_one_engine_match_fresh_runs(tiny_target, tiny_other):
    """What `eval` does: target, draft and spec calls back to back on one engine. A draft left on
    a short window by a probe must still see the whole context in draft mode; the target must be
    caught up after draft-only calls without breaking exactness."""
    with load_pair(None, tiny_other, n_ctx=1024, n_threads=1) as alone:
        draft_ref = [greedy(alone, p, mode="target", max_tokens=30).tokens for p in PROMPTS]
    with load_pair(None, tiny_target, n_ctx=1024, n_threads=1) as alone:
        target_ref = [greedy(alone, p, mode="target", max_tokens=30).tokens for p in PROMPTS]
    with load_pair(tiny_other, tiny_target, n_ctx=1024, n_threads=1) as pair:
        greedy(pair, PROMPTS[0], mode="spec", draft_p_min=0.0, max_tokens=200)  # backs off, probes
        for i, prompt in enumerate(PROMPTS):
            assert greedy(pair, prompt, mode="draft", max_tokens=30).tokens == draft_ref[i]
            assert greedy(pair, prompt, mode="spec", max_tokens=30).tokens == target_ref[i]
            assert greedy(pair, prompt, mode="target", max_tokens=30).tokens == target_ref[i]
        # Continue a draft-only context in spec mode: the target catches up first.
        ctx = pair.tokenize(PROMPTS[1]) + greedy(pair, PROMPTS[1], mode="draft", max_tokens=20).tokens
        spec = greedy(pair, ctx, mode="spec", draft_max=6, adaptive=False, max_tokens=20)
        pair.engine.reset()
        assert spec.tokens == greedy(pair, ctx, mode="target", max_tokens=20).tokens


def test_speculative_sampling_with_a_trimmed_draft_matches_target_distribution(tmp_path, tiny_target):
    """Rejection sampling through the draft->target token map (MappedRow): first-token
    distribution equals the target's, including target tokens the draft cannot propose."""
    from cospec_local.draft_maker import make_draft
    from cospec_local.sampling import SamplingParams, logits_to_probs

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n\n" * 5)
    draft = make_draft(tiny_target, tmp_path / "d.gguf", [corpus], vocab_size=4, progress=False).path
    params = dict(temperature=1.5, top_k=6, top_p=1.0, min_p=0.0)
    with load_pair(draft, tiny_target, n_ctx=256, n_threads=1) as pair:
        prompt = pair.tokenize("the")
        p1 = logits_to_probs(pair.target.eval(prompt, 1)[0].copy(), SamplingParams(**params))
        pair.engine.reset()
        counts = np.zeros(len(p1))
        for seed in range(3000):
            r = pair.generate(prompt, mode="spec", max_tokens=1, seed=seed, draft_max=1, adaptive=False, draft_p_min=0.0, **params)
            counts[r.tokens[0]] += 1
        support = np.flatnonzero(p1)
        assert_matches(counts[support], p1[support])
        assert counts.sum() == counts[support].sum()


def test_interrupting_a_chat_reply_keeps_the_session_usable(tiny_target, tiny_other):
    """Ctrl-C mid-reply: the partial reply stays in the conversation, caches stay consistent,
    and the next turn equals what a session that saw the same partial reply produces."""
    with load_pair(tiny_other, tiny_target, n_ctx=1024, n_threads=1) as pair:
        chat = pair.chat()
        stream = chat.send("hello there", temperature=0, max_tokens=40)
        shown = "".join(next(stream).text for _ in range(6))
        with pytest.raises(KeyboardInterrupt):
            stream.throw(KeyboardInterrupt)
        assert chat.messages[-1] == {"role": "assistant", "content": shown.strip()}
        assert pair.target.n_past <= len(chat.conversation.context)
        after = chat.say("and then?", temperature=0, max_tokens=20).tokens
        context = list(chat.conversation.context)
    with load_pair(None, tiny_target, n_ctx=1024, n_threads=1) as alone:
        ref = greedy(alone, context[: len(context) - len(after)], mode="target", max_tokens=20).tokens
    assert after == ref


class RecordingGreedyVerifier:
    """Greedy verification that also reads, and records, every slot's rows in the bundle."""

    def __init__(self):
        self.seen = []  # (draft token, its probability, the row's top probability, row total)
        self.target_argmax_matches = []  # the target's raw logits row gives the greedy choice

    def verify(self, bundle, rng):
        from cospec_local.verify import StandardVerifier

        draft, target = bundle.slots[0], bundle.slots[1]
        assert (draft.name, target.name) == ("draft", "target")
        for j, token in enumerate(bundle.tokens):
            row = bundle.probs(0, j)
            dense = row.draft_probs if hasattr(row, "draft_probs") else row
            self.seen.append((token, row[token], float(dense.max()), float(dense.sum())))
        for j in range(bundle.n_positions):
            self.target_argmax_matches.append(int(np.argmax(bundle.logits(1, j))) == bundle.combined_argmax(j))
        return StandardVerifier().verify(bundle, rng)


@pytest.mark.parametrize("trimmed", [False, True])
def test_a_verifier_reads_every_slots_rows_in_greedy_mode(tmp_path, tiny_target, tiny_other, trimmed):
    """The CoS/CoSpec hook: in greedy mode a verifier reads the draft's distributions (its plain
    softmax, in target ids through the token map for a trimmed draft; the draft token is each
    row's argmax) and the target's raw logits at every position; output equals target-only."""
    from cospec_local.draft_maker import make_draft

    draft = tiny_other
    if trimmed:
        corpus = tmp_path / "c.txt"
        corpus.write_text("the cat sat on the mat\n\n" * 5)
        draft = make_draft(tiny_target, tmp_path / "d.gguf", [corpus], vocab_size=8, progress=False).path
    with load_pair(draft, tiny_target, n_ctx=512, n_threads=1) as pair:
        ref = greedy(pair, PROMPTS[0], mode="target", max_tokens=30)
        recorder = RecordingGreedyVerifier()
        out = pair.generate(
            PROMPTS[0], verifier=recorder, temperature=0, draft_max=4, adaptive=False, draft_p_min=0.0, max_tokens=30,
            draft_source="model",
        )
        assert out.tokens == ref.tokens
        assert len(recorder.seen) == out.stats.n_drafted > 0
        for token, token_prob, top_prob, total in recorder.seen:
            assert token_prob == top_prob > 0.0
            assert total == pytest.approx(1.0)
        assert recorder.target_argmax_matches and all(recorder.target_argmax_matches)


def test_bad_input_raises_when_the_stream_is_created(tiny_target, tiny_other):
    """Validation happens in `stream()`, before the first event: nothing is consumed lazily."""
    from cospec_local import ContextOverflowError

    with load_pair(tiny_other, tiny_target, n_ctx=256, n_threads=1) as pair:
        with pytest.raises(ValueError, match="empty"):
            pair.stream([])
        with pytest.raises(ContextOverflowError):
            pair.stream("a" * 400)
        with pytest.raises(ValueError, match="gamma"):
            pair.stream("hello", mode="cos", gamma=(1, 1, 1))
        with pytest.raises(ValueError, match="mode"):
            pair.stream("hello", mode="bogus")
    with load_pair(None, tiny_target, n_ctx=256, n_threads=1) as alone:
        with pytest.raises(ValueError, match="needs a draft"):
            alone.stream("hello", mode="spec", draft_source="model")
        with pytest.raises(ValueError, match="needs a draft"):
            alone.stream("hello", mode="cospec")
        # The default proposer chain runs its n-gram half alone, token for token target-only.
        chained = alone.generate("hello hello hello", temperature=0, max_tokens=40)
        assert chained.tokens == alone.generate("hello hello hello", temperature=0, max_tokens=40, mode="target").tokens


def test_a_second_concurrent_stream_is_refused_and_the_first_survives(tiny_target, tiny_other):
    """One engine decodes one conversation at a time: a second stream on the same models raises
    EngineBusyError instead of corrupting a KV cache, and the first stream finishes correctly."""
    from cospec_local import EngineBusyError

    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        ref = greedy(pair, PROMPTS[0], mode="target", max_tokens=20).tokens
        first = pair.stream(PROMPTS[0], temperature=0, max_tokens=20)
        tokens = [next(first).token for _ in range(3)]
        with pytest.raises(EngineBusyError):
            pair.stream(PROMPTS[1], temperature=0)
        other_chat = pair.chat()
        with pytest.raises(EngineBusyError):
            other_chat.say("hello", temperature=0)
        tokens += [e.token for e in first if getattr(e, "token", -1) >= 0]
        assert tokens == ref
        # A stream created while idle but started while another runs is refused at its first event.
        waiting = pair.stream(PROMPTS[2], temperature=0, max_tokens=5)
        running = pair.stream(PROMPTS[1], temperature=0, max_tokens=5)
        next(running)
        with pytest.raises(EngineBusyError):
            next(waiting)
        assert len(list(running)) > 1  # the running stream is unharmed


def test_conversations_interleaved_on_one_engine_match_each_alone(tiny_target, tiny_other):
    """Per-conversation state: two chats alternating turns on one engine reply exactly as each
    does alone (the engine reconciles its caches with whichever conversation runs)."""
    turns_a, turns_b = ["hi there", "tell me more"], ["what is 12", "and 13"]
    alone = {}
    for name, turns in (("a", turns_a), ("b", turns_b)):
        with load_pair(tiny_other, tiny_target, n_ctx=1024, n_threads=1) as pair:
            chat = pair.chat()
            alone[name] = [chat.say(t, temperature=0, max_tokens=15).tokens for t in turns]
    with load_pair(tiny_other, tiny_target, n_ctx=1024, n_threads=1) as pair:
        chat_a, chat_b = pair.chat(), pair.chat()
        got = {"a": [], "b": []}
        for t_a, t_b in zip(turns_a, turns_b):
            got["a"].append(chat_a.say(t_a, temperature=0, max_tokens=15).tokens)
            got["b"].append(chat_b.say(t_b, temperature=0, max_tokens=15).tokens)
        assert chat_a.conversation is not chat_b.conversation
    assert got == alone


def test_provenance_names_the_slot_and_how(tiny_target, tiny_other):
    """spec: accepted tokens come from the draft, corrections and bonuses from the target;
    collab: every token is sampled from r over both models."""
    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        events = [e for e in pair.stream(PROMPTS[0], temperature=0, max_tokens=40, draft_max=4, adaptive=False,
                                         draft_p_min=0.0, draft_source="model") if getattr(e, "token", -1) >= 0]
        kinds = {(e.source, e.slot) for e in events}
        assert kinds <= {(ACCEPTED, "draft"), (CORRECTION, "target"), (BONUS, "target")}
        assert (CORRECTION, "target") in kinds
        assert all(e.proposed == (e.source == ACCEPTED) for e in events)
        collab = [e for e in pair.stream(PROMPTS[0], mode="collab", temperature=0, max_tokens=10) if getattr(e, "token", -1) >= 0]
        assert {(e.source, e.slot) for e in collab} == {(SAMPLED, "combined")}
        alone = [e for e in pair.stream(PROMPTS[0], mode="target", temperature=0, max_tokens=10) if getattr(e, "token", -1) >= 0]
        assert {(e.source, e.slot) for e in alone} == {(SAMPLED, "target")}


def test_a_chat_turn_refused_by_a_busy_engine_leaves_the_conversation_unchanged(tiny_target):
    """A turn whose stream was created while the engine was idle but started while another
    stream ran is refused (EngineBusyError) and does not join the conversation."""
    from cospec_local import EngineBusyError

    with load_pair(tiny_target, tiny_target, n_ctx=1024, n_threads=1) as pair:
        chat = pair.chat()
        chat.say("hello", temperature=0, max_tokens=5)
        messages, tokens = list(chat.messages), list(chat.tokens)
        waiting = chat.send("second question", temperature=0, max_tokens=5)
        running = pair.stream(PROMPTS[0], temperature=0, max_tokens=5)
        next(running)
        with pytest.raises(EngineBusyError):
            next(waiting)
        list(running)
        assert chat.messages == messages and chat.tokens == tokens
        reply = chat.say("second question", temperature=0, max_tokens=5)
        assert chat.messages[-2:] == [{"role": "user", "content": "second question"},
                                      {"role": "assistant", "content": reply.text.strip()}]


def test_cancel_from_outside_stops_the_generation_and_leaves_a_consistent_cache():
    """Conversation.cancel() (a server's client gone): the stream ends at the next round with
    finish reason 'cancelled', the committed context is what was emitted, and the next
    generation from that context equals a fresh engine's."""
    from fake_backend import make_engine, run

    engine, _ = make_engine((11, 22))
    conv = engine.new_conversation()
    config = GenerationConfig(mode="spec", temperature=0, max_tokens=60, adaptive=False, draft_max=3)
    events = engine.stream([1, 2, 3], config, conversation=conv)
    emitted = []
    for event in events:
        if hasattr(event, "token"):
            emitted.append(event.token)
            if len(emitted) == 5:
                conv.cancel()
        else:
            done = event
    assert done.finish_reason == "cancelled" and 5 <= len(emitted) < 60
    assert conv.context == [1, 2, 3] + emitted
    follow = engine.stream(list(conv.context), config.with_(max_tokens=10), conversation=conv)
    assert not conv.cancelled  # a new stream clears the flag
    cached = [e.token for e in follow if hasattr(e, "token")]
    fresh_engine, _ = make_engine((11, 22))
    result, _, _ = run(fresh_engine, [1, 2, 3] + emitted, config.with_(max_tokens=10))
    assert cached == result.tokens


def test_a_negative_seed_is_refused_before_the_engine_is_claimed():
    with pytest.raises(ValueError, match="seed"):
        GenerationConfig(seed=-1)


def test_time_inside_llama_decode_is_counted_and_bounded_by_the_wall_time(tiny_target, tiny_other):
    """stats.t_llama sums llama_decode time over every model (prefill and decode); the rest of the
    call's wall time, per generated token, is the loop's own cost that bench reports."""
    with load_pair(tiny_other, tiny_target, n_ctx=512, n_threads=1) as pair:
        r = pair.generate("the cat sat on the mat", temperature=0, max_tokens=30, mode="spec", adaptive=False)
        s = r.stats
        decode_total = pair.target.decode_seconds + pair.draft.decode_seconds
    assert 0 < s.t_llama <= decode_total
    assert s.t_llama <= s.t_prefill + s.t_decode
    assert s.outside_llama_per_token == pytest.approx((s.t_prefill + s.t_decode - s.t_llama) / s.n_generated)
