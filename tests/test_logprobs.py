"""Log probabilities of emitted tokens (`GenerationConfig.logprobs`): the distribution the output
follows at each position, read from the rows verification already computed."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from cli.main import cli
from cospec_local import Grammar, load_pair
from cospec_local.backend import LlamaModel, LoadOptions
from cospec_local.sampling import SamplingParams, logits_to_probs, softmax


def test_greedy_logprobs_are_the_targets_softmax_in_every_speculative_mode(tiny_target, tiny_other):
    """Target-only: each token's logprob and its alternatives are the log softmax of a fresh
    model's row at that position; spec, cospec (an arbiter that never overrides) and n-gram
    drafts report the same values, bit for bit."""
    with load_pair(tiny_other, tiny_target, n_ctx=256, n_threads=1) as pair:
        prompt = pair.tokenize("hello world. hello world. hello")
        settings = dict(temperature=0, max_tokens=16, adaptive=False, logprobs=3)
        ref = pair.generate(prompt, mode="target", **settings)
        for overrides in (dict(mode="spec", draft_source="model"), dict(mode="spec", draft_source="ngram"),
                          dict(mode="cospec", threshold=1.0)):
            out = pair.generate(prompt, **settings, **overrides)
            assert out.tokens == ref.tokens
            assert [(lp.logprob, lp.top) for lp in out.logprobs] == [(lp.logprob, lp.top) for lp in ref.logprobs]
    with LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1)) as fresh:
        context = list(prompt)
        for token, lp in zip(ref.tokens, ref.logprobs):
            fresh.reset()
            logp = np.log(softmax(np.array(fresh.eval(context, 1)[0])))
            assert abs(lp.logprob - logp[token]) < 1e-9
            best = np.argsort(-logp, kind="stable")[:3]
            assert [t for t, _ in lp.top] == best.tolist() and lp.top[0][0] == token
            context.append(token)


def test_sampled_logprobs_follow_the_processed_distribution(tiny_target):
    """When sampling, the reported distribution is the processed one (temperature, top-k): a
    token outside the top-k has probability 0, the alternatives are the top-k's log probabilities."""
    settings = dict(temperature=0.7, top_k=3, top_p=1.0, min_p=0.0)
    with load_pair(None, tiny_target, n_ctx=256, n_threads=1) as pair:
        prompt = pair.tokenize("hello")
        out = pair.generate(prompt, mode="target", seed=1, max_tokens=1, logprobs=5, **settings)
        with LlamaModel(tiny_target, LoadOptions(n_ctx=256, n_threads=1)) as fresh:
            probs = logits_to_probs(np.array(fresh.eval(prompt, 1)[0], dtype=np.float64), SamplingParams(**settings))
    lp = out.logprobs[0]
    assert abs(lp.logprob - np.log(probs[out.tokens[0]])) < 1e-9
    finite = [(t, v) for t, v in lp.top if v > -np.inf]
    assert len(finite) == 3 and abs(sum(np.exp(v) for _, v in finite) - 1.0) < 1e-9


def test_logprobs_under_a_grammar_are_of_the_masked_distribution(tiny_target):
    """Tokens the grammar forces have logprob 0; elsewhere every alternative is an allowed token."""
    with load_pair(None, tiny_target, n_ctx=256, n_threads=1) as pair:
        out = pair.generate("hello", mode="target", temperature=0, max_tokens=8, logprobs=4,
                            grammar=Grammar.regex(r"ab[c-e]+"))
        texts = [pair.target.detokenize([t]) for t in out.tokens]
        assert "".join(texts).startswith("ab")
        assert out.logprobs[0].logprob == 0.0 and out.logprobs[1].logprob == 0.0  # "a", "b" are forced
        for lp in out.logprobs[2:]:
            allowed = [t for t, v in lp.top if v > -np.inf]
            assert allowed and all(pair.target.detokenize([t]) in "cde" or t in pair.target.eog_ids() for t in allowed)


def test_generate_json_prints_logprobs(tiny_target):
    out = CliRunner().invoke(cli, ["generate", "--target", str(tiny_target), "--ctx-size", "256", "--threads", "1",
                                   "--temperature", "0", "--max-tokens", "4", "--logprobs", "2", "--json", "hello"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert len(result["logprobs"]) == result["stats"]["n_generated"]
    assert all(len(e["top"]) == 2 and e["top"][0][0] == e["token"] for e in result["logprobs"])
