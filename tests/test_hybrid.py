"""Hybrid targets and drafts (recurrent + attention layers): tiny seeded Qwen3.5-architecture models
with the real Qwen3.5 vocabulary (`tests/hybrid.py`). Their recurrent state cannot be cut back per
position, so a rejected proposal rolls back by llama.cpp's state snapshots or by our copies of the
state (`backend.model.RecurrentCheckpoints`); every mode must stay lossless."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.sampling import SamplingParams
from hybrid import build_llama_draft, build_qwen35
from server_load import ServerProcess
from stats_util import assert_matches, sampled_counts, two_token_law

PROMPTS = ["Hello, my name is", "The the the the the the the the", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def hybrid_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hybrid")
    return {
        "target": build_qwen35(d / "target.gguf", seed=1),  # layers 0-2 recurrent, layer 3 attention
        # A hybrid draft (one recurrent, one attention layer) and a plain one, both sharing the
        # target's token embedding, so they agree on some tokens and not on others.
        "hybrid": build_qwen35(d / "hybrid-draft.gguf", seed=1, n_layer=2, full_attention_interval=2),
        "llama": build_llama_draft(d / "llama-draft.gguf", seed=1),
    }


def open_pair(models, draft: str | None):
    return load_pair(None if draft is None else models[draft], models["target"], n_ctx=512, n_threads=1)


def greedy(pair, prompt, **overrides):
    settings = dict(temperature=0, max_tokens=40, adaptive=False, draft_p_min=0.0)
    return pair.generate(prompt, **{**settings, **overrides})


def test_the_memory_kind_is_known_at_load_and_info_says_it(hybrid_models):
    with LlamaModel(hybrid_models["target"], LoadOptions(n_ctx=256, n_threads=1)) as target:
        assert target.memory == "hybrid"
    with LlamaModel(hybrid_models["llama"], LoadOptions(n_ctx=256, n_threads=1)) as draft:
        assert draft.memory == "attention"
    out = CliRunner().invoke(cli, ["info", "--draft", str(hybrid_models["llama"]), "--target", str(hybrid_models["target"]),
                                   "--ctx-size", "256", "--threads", "1"])
    assert out.exit_code == 0, out.output
    assert "memory: hybrid (recurrent layers)" in out.output and "memory: attention KV cache" in out.output


@pytest.mark.parametrize("draft", ["llama", "hybrid"])
@pytest.mark.parametrize("source", ["model", "ngram+model"])
def test_greedy_spec_on_a_hybrid_target_equals_target_only(hybrid_models, draft, source):
    """Rejections roll the hybrid target (and a hybrid draft) back mid-reply; the output stays
    token for token target-only's, and the draft both agrees and disagrees."""
    with open_pair(hybrid_models, draft) as pair:
        accepted = drafted = 0
        for prompt in PROMPTS:
            ref = greedy(pair, prompt, mode="target")
            for k in (2, 6):
                out = greedy(pair, prompt, mode="spec", draft_source=source, draft_max=k)
                assert out.tokens == ref.tokens, (prompt, k)
                accepted += out.stats.n_accepted
                drafted += out.stats.n_drafted
        assert 0 < accepted < drafted


def test_ngram_drafts_and_cospec_on_a_hybrid_target(hybrid_models):
    """n-gram proposals without a draft model, and cospec with an arbiter that never keeps the
    draft's token (threshold 1), both equal target-only greedy decoding."""
    with open_pair(hybrid_models, None) as alone:
        prompt = "one two three one two three one two three one two"
        ref = greedy(alone, prompt, mode="target", max_tokens=60)
        out = greedy(alone, prompt, mode="spec", draft_source="ngram", max_tokens=60)
        assert out.tokens == ref.tokens and out.stats.n_drafted > 0
    with open_pair(hybrid_models, "llama") as pair:
        for prompt in PROMPTS:
            ref = greedy(pair, prompt, mode="target")
            out = greedy(pair, prompt, mode="cospec", threshold=1.0)
            assert out.tokens == ref.tokens
            assert out.stats.n_mismatches > 0


@pytest.mark.parametrize("native_snapshots", [True, False])
@pytest.mark.parametrize("draft", ["llama", "hybrid"])
def test_state_after_rejections_equals_a_fresh_run(hybrid_models, monkeypatch, native_snapshots, draft):
    """After a reply with rejections, the target's cache is what a fresh context computes for the
    committed text: the next token's logits match a fresh model's bit for bit. With llama.cpp's own
    state snapshots, and without them (every rollback then restores a copy of the recurrent state
    and re-evaluates the accepted tokens)."""
    if not native_snapshots:
        import cospec_local.backend.model as backend_model

        monkeypatch.setattr(backend_model, "RECURRENT_SNAPSHOTS", 0)
    with open_pair(hybrid_models, draft) as pair:
        assert (pair.target.native_snapshots > 0) == native_snapshots
        for prompt in PROMPTS:  # lossless with either way of rolling back
            assert greedy(pair, prompt, mode="spec", draft_max=6).tokens == greedy(pair, prompt, mode="target").tokens
        out = greedy(pair, PROMPTS[0], mode="spec", draft_source="model", draft_max=6)
        assert out.stats.n_accepted < out.stats.n_drafted  # there were rejections
        context = pair.conversation.context
        # Every model that decoded (the hybrid draft too) holds a prefix of the committed text whose
        # next logits are a fresh context's, bit for bit.
        for name, model in (("target", pair.target), ("draft", pair.draft)):
            cached = model.n_past
            assert 0 < cached < len(context)  # the last emitted token is never evaluated yet
            after = np.array(model.eval(context[cached:] if cached < len(context) else context[-1:], 1)[0])
            path = hybrid_models["target" if name == "target" else draft]
            with LlamaModel(path, LoadOptions(n_ctx=512, n_threads=1)) as fresh:
                fresh.eval(context[:-1], 0)
                expected = np.array(fresh.eval(context[-1:], 1)[0])
            np.testing.assert_array_equal(after, expected, err_msg=name)


def test_sampled_spec_on_a_hybrid_target_follows_the_target(hybrid_models):
    """The joint law of the first two sampled tokens (top-4 sampling, a 4-token draft that is often
    rejected, so the hybrid target rolls back between them) equals target-only's: chi-square over
    500 seeds, with the exact law computed by a fresh target context."""
    settings = dict(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0)
    params = SamplingParams(**settings)
    with open_pair(hybrid_models, "llama") as pair:
        prompt = pair.tokenize(PROMPTS[0])
        cells = two_token_law(hybrid_models["target"], prompt, params)
        counts, corrections = sampled_counts(
            lambda seed: pair.generate(prompt, mode="spec", draft_source="model", seed=seed, max_tokens=2, adaptive=False,
                                       draft_max=4, **settings), cells, 500)
    assert corrections > 50  # the target rolled back in many of the runs
    assert_matches(counts, np.array(list(cells.values())))


def test_a_reply_stopped_early_leaves_the_pair_ready(hybrid_models):
    """A consumer that stops mid-reply (Ctrl-C, a dropped client): the next call is exact."""
    with open_pair(hybrid_models, "llama") as pair:
        ref = greedy(pair, PROMPTS[2], mode="target")
        stream = pair.stream(PROMPTS[0], temperature=0, max_tokens=40, draft_max=6, adaptive=False)
        for _ in range(7):
            next(stream)
        stream.close()
        assert greedy(pair, PROMPTS[2], mode="spec", draft_max=6).tokens == ref.tokens


def test_chat_on_a_hybrid_target_reuses_its_cache_across_turns(hybrid_models):
    """Two chat turns through the Qwen3.5 template: the second turn reuses the cached first turn,
    and spec's replies equal target-only's in both turns."""
    replies = {}
    for mode in ("target", "spec"):
        with open_pair(hybrid_models, "llama") as pair:
            chat = pair.chat()
            first = chat.say("Hello there", mode=mode, temperature=0, max_tokens=24, adaptive=False)
            second = chat.say("Tell me more", mode=mode, temperature=0, max_tokens=24, adaptive=False)
            assert second.stats.n_prompt_cached > len(pair.tokenize("Hello there"))
            replies[mode] = (first.tokens, second.tokens)
    assert replies["spec"] == replies["target"]


def test_parallel_server_slots_each_keep_their_own_recurrent_state(hybrid_models):
    """Two server slots decoding at once on a hybrid target: each reply equals target-only's."""
    with open_pair(hybrid_models, None) as alone:
        refs = [greedy(alone, p, mode="target", max_tokens=24).text for p in PROMPTS[:2]]
    with ServerProcess("--draft", hybrid_models["llama"], "--target", hybrid_models["target"], "--ctx-size", 512,
                       "--parallel", 2, "--threads", 1) as server:
        texts = [None, None]

        def ask(i):
            body = json.dumps({"prompt": PROMPTS[i], "max_tokens": 24, "temperature": 0, "adaptive": False,
                               "draft_p_min": 0.0}).encode()
            request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                texts[i] = json.load(response)["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert texts == refs


def test_a_model_that_cannot_take_back_tokens_is_refused_before_the_first_token(hybrid_models):
    """Where llama.cpp could not copy a recurrent state, every mode that verifies proposals is
    refused when the stream is created, saying why; target-only still decodes."""
    with open_pair(hybrid_models, "llama") as pair:
        pair.target.can_roll_back = False  # what a backend that cannot serialise the state reports
        for mode in ("spec", "cospec"):
            with pytest.raises(ValueError, match="cannot take back rejected tokens"):
                pair.stream(PROMPTS[0], mode=mode)
        assert greedy(pair, PROMPTS[0], mode="target").tokens


def test_llama_cpps_own_rollback_is_wrong_past_its_last_call_and_ours_is_exact(hybrid_models):
    """The premise of `LlamaModel.rollback`: llama.cpp's recurrent snapshots (n_rs_seq) hold the
    states inside its last decode call only, yet its seq_rm says yes to removing that whole call
    (or more) and leaves a wrong state; inside the call it is exact. Our rollback, in the case it
    gets wrong (a draft's one-token calls), gives a fresh context's logits bit for bit."""
    from hybrid import rs_rollback_check

    with LlamaModel(hybrid_models["target"], LoadOptions(n_ctx=256, n_threads=1)) as model:
        tokens = model.tokenize("The quick brown fox jumps over the lazy dog. " * 3)
        native = rs_rollback_check(model._model, tokens)
        assert native["calls [5] keep 1"] == {"seq_rm": True, "bit_identical": True}
        assert native["calls [1, 1, 1] keep 1"] == {"seq_rm": True, "bit_identical": False}
        assert native["calls [3] keep 0"] == {"seq_rm": True, "bit_identical": False}

        prefix, proposed = tokens[:24], tokens[24:27]
        model.eval(prefix, 0)
        for token in proposed:  # a draft proposing one token per call
            model.eval([token], 1)
        model.rollback(len(prefix) + 1)
        got = np.array(model.eval(tokens[25:26], 1)[0])
    with LlamaModel(hybrid_models["target"], LoadOptions(n_ctx=256, n_threads=1)) as fresh:
        fresh.eval(tokens[:25], 0)
        np.testing.assert_array_equal(got, np.array(fresh.eval(tokens[25:26], 1)[0]))


def test_copies_of_the_recurrent_state_are_taken_only_where_a_rollback_can_need_them(hybrid_models, monkeypatch):
    """Target-only decoding never rolls back: no copies. In spec the hybrid target's rollbacks stay
    inside its verification call (llama.cpp's snapshots serve them): no copies either, unless the
    architecture has no snapshots; a hybrid draft's one-token calls always keep copies."""
    with open_pair(hybrid_models, "hybrid") as pair:
        pair.engine.reset()
        alone = greedy(pair, PROMPTS[0], mode="target")
        assert not pair.target._checkpoints._saved and alone.stats.t_state_copies == 0
        pair.engine.reset()
        spec = greedy(pair, PROMPTS[0], mode="spec", draft_source="model", draft_max=4)
        assert not pair.target._checkpoints._saved and pair.draft._checkpoints._saved
        assert spec.stats.t_state_copies > 0  # reported with the generation's statistics
    import cospec_local.backend.model as backend_model

    monkeypatch.setattr(backend_model, "RECURRENT_SNAPSHOTS", 0)
    with open_pair(hybrid_models, "llama") as pair:
        greedy(pair, PROMPTS[0], mode="spec", draft_source="model", draft_max=4)
        assert pair.target._checkpoints._saved
