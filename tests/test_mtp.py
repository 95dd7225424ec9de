"""A target's own multi-token-prediction (MTP) layer as the draft (`--draft-source mtp`): tiny
seeded Qwen3.5-architecture targets with one MTP block (`tests/hybrid.py`, `mtp=True`; its
eh_proj reads the next token's embedding, so it agrees with the trunk on some tokens). The head
runs in llama.cpp's MTP context and follows every target decode (`backend.mtp.MtpHead`)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from cospec_local import load_pair
from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.sampling import SamplingParams
from hybrid import build_qwen35
from stats_util import assert_matches, sampled_counts, two_token_law

PROMPTS = ["Hello, my name is", "The the the the the the the the", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp")
    return {
        "mtp": build_qwen35(d / "mtp-target.gguf", seed=1, mtp=True, tied_output=False, residual_scale=0.3),
        "plain": build_qwen35(d / "plain-target.gguf", seed=1),
    }


def open_target(path):
    return load_pair(None, path, n_ctx=512, n_threads=1)


def greedy(pair, prompt, **overrides):
    settings = dict(temperature=0, max_tokens=40, adaptive=False, draft_p_min=0.0)
    return pair.generate(prompt, **{**settings, **overrides})


@pytest.mark.parametrize("source", ["mtp", "ngram+mtp"])
def test_greedy_mtp_drafts_equal_target_only(mtp_models, source):
    """The MTP head proposes, the target verifies: token for token target-only's output, with
    accepted and rejected proposals, one MTP call per proposed token and fewer target calls than
    tokens."""
    with open_target(mtp_models["mtp"]) as pair:
        accepted = drafted = 0
        for prompt in PROMPTS:
            ref = greedy(pair, prompt, mode="target")
            for k in (1, 3, 6):
                out = greedy(pair, prompt, mode="spec", draft_source=source, draft_max=k)
                assert out.tokens == ref.tokens, (prompt, k)
                s = out.stats
                accepted, drafted = accepted + s.n_accepted, drafted + s.n_drafted
                if source == "mtp":
                    assert s.model_calls["mtp"] == s.n_drafted > 0
                    assert s.model_calls["target"] < s.n_generated
        assert 0 < accepted < drafted


def test_sampled_mtp_drafts_follow_the_target(mtp_models):
    """The joint law of the first two sampled tokens with MTP proposals (often rejected) equals
    target-only's: chi-square over 500 seeds against the law a fresh context computes."""
    settings = dict(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0)
    params = SamplingParams(**settings)
    with open_target(mtp_models["mtp"]) as pair:
        prompt = pair.tokenize(PROMPTS[0])
        cells = two_token_law(mtp_models["mtp"], prompt, params)
        counts, corrections = sampled_counts(
            lambda seed: pair.generate(prompt, mode="spec", draft_source="mtp", seed=seed, max_tokens=2, adaptive=False,
                                       draft_max=3, draft_p_min=0.0, **settings), cells, 500)
    assert corrections > 50
    assert_matches(counts, np.array(list(cells.values())))


def test_the_mtp_head_after_rejections_equals_a_fresh_run(mtp_models):
    """After a reply with rejections (the head drafted past the target, the target rolled back),
    the head's next row equals that of a fresh model that only prefilled the committed text."""
    with open_target(mtp_models["mtp"]) as pair:
        out = greedy(pair, PROMPTS[0], mode="spec", draft_source="mtp", draft_max=6)
        assert 0 < out.stats.n_accepted < out.stats.n_drafted
        context = pair.conversation.context
        pair.target.rollback(len(context) - 1)  # where a next reply's first cycle drafts from
        after = np.array(pair.target.mtp.first_step(context[-1], len(context) - 1))
    with LlamaModel(mtp_models["mtp"], LoadOptions(n_ctx=512, n_threads=1)) as fresh:
        fresh.enable_mtp()
        fresh.eval(context[:-1], 0)
        expected = np.array(fresh.enable_mtp().first_step(context[-1], len(context) - 1))
    np.testing.assert_array_equal(after, expected)


def test_mtp_is_refused_before_the_first_token_where_there_is_none(mtp_models):
    """A target without MTP layers, or loaded without them: a clear error when the stream is
    created, saying why; the same target still runs target-only."""
    with open_target(mtp_models["plain"]) as pair:
        assert pair.target.n_mtp_layers == 0
        with pytest.raises(ValueError, match="no MTP"):
            pair.stream(PROMPTS[0], mode="spec", draft_source="mtp")
        assert greedy(pair, PROMPTS[0], mode="target", max_tokens=4).tokens
    with LlamaModel(mtp_models["mtp"], LoadOptions(n_ctx=256, n_threads=1, load_mtp=False)) as model:
        assert model.n_mtp_layers == 1 and "loaded without its MTP layers" in model.mtp_unavailable
    out = CliRunner().invoke(cli, ["generate", "--target", str(mtp_models["plain"]), "--ctx-size", "256", "--threads", "1",
                                   "--draft-source", "mtp", "--max-tokens", "4", "Hello"])
    assert out.exit_code != 0 and "no MTP" in out.output


def test_cli_generates_and_info_reports_the_mtp_head(mtp_models):
    path = str(mtp_models["mtp"])
    out = CliRunner().invoke(cli, ["info", "--target", path, "--ctx-size", "256", "--threads", "1"])
    assert out.exit_code == 0, out.output
    assert "MTP: 1 multi-token-prediction layer" in out.output
    with open_target(mtp_models["mtp"]) as pair:
        ref = greedy(pair, PROMPTS[2], mode="target", max_tokens=16).text
    out = CliRunner().invoke(cli, ["generate", "--target", path, "--ctx-size", "512", "--threads", "1", "--draft-source",
                                   "mtp", "--temperature", "0", "--max-tokens", "16", "--no-adaptive", PROMPTS[2]])
    assert out.exit_code == 0, out.output
    assert ref in out.output


def test_a_chat_switching_to_mtp_mid_conversation_stays_exact(mtp_models):
    """The head is made at the first MTP reply, after a target-only turn filled the cache (the
    cache then starts over so the head sees every position); every turn equals target-only's, and
    the turn after the MTP turn reuses the cache as target-only's does."""
    replies, cached = {}, {}
    for second_mode in ("target", "mtp"):
        with open_target(mtp_models["mtp"]) as pair:
            chat = pair.chat()
            settings = dict(temperature=0, max_tokens=24, adaptive=False, draft_p_min=0.0)
            first = chat.say("Hello there", mode="target", **settings)
            assert pair.target.mtp is None
            overrides = dict(mode="spec", draft_source="mtp", draft_max=3) if second_mode == "mtp" else dict(mode="target")
            second = chat.say("Tell me more", **overrides, **settings)
            third = chat.say("And then?", **overrides, **settings)
            replies[second_mode] = (first.tokens, second.tokens, third.tokens)
            cached[second_mode] = (second.stats.n_prompt_cached, third.stats.n_prompt_cached)
    assert replies["mtp"] == replies["target"]
    assert cached["mtp"][0] == 0 < cached["target"][0]  # the head's first turn starts over
    assert cached["mtp"][1] == cached["target"][1] > 0
