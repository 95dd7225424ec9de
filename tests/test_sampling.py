"""Logit processing: top-k, top-p, min-p and temperature, as llama.cpp's default chain."""

import numpy as np
import pytest

from cospec_local.sampling import SamplingParams, candidates, logits_to_probs, sample


def test_greedy_is_one_hot():
    probs = logits_to_probs(np.array([0.1, 3.0, 2.0]), SamplingParams(temperature=0))
    assert probs.tolist() == [0.0, 1.0, 0.0]


def test_temperature_one_is_softmax():
    logits = np.array([1.0, 2.0, 3.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0))
    expected = np.exp(logits) / np.exp(logits).sum()
    assert np.allclose(probs, expected)


def test_top_k_keeps_k_largest():
    """top-k keeps the k largest logits and renormalises the softmax over them: the kept
    probabilities are e^5 : e^4, not their shares of the full softmax."""
    logits = np.array([5.0, 1.0, 4.0, 3.0, 0.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(np.flatnonzero(probs)) == {0, 2}
    e = np.exp([5.0, 4.0])
    np.testing.assert_allclose(probs[[0, 2]], e / e.sum(), rtol=1e-12)


def test_top_p_keeps_smallest_head_reaching_p():
    probs_in = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs_in)
    kept = set(candidates(logits, SamplingParams(temperature=1.0, top_p=0.79)).tolist())
    assert kept == {0, 1}
    kept = set(candidates(logits, SamplingParams(temperature=1.0, top_p=0.81)).tolist())
    assert kept == {0, 1, 2}


def test_top_p_on_a_wide_vocabulary_uses_the_fast_path_correctly():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50000) * 3
    params = SamplingParams(temperature=1.0, top_p=0.9)
    fast = set(candidates(logits, params).tolist())
    order = np.argsort(-logits, kind="stable")
    p = np.exp(logits - logits.max())
    cum = np.cumsum(p[order]) / p.sum()
    slow = set(order[: int(np.searchsorted(cum, 0.9)) + 1].tolist())
    assert fast == slow


def test_min_p_drops_tokens_below_fraction_of_top():
    probs_in = np.array([0.6, 0.3, 0.05, 0.05])
    kept = set(candidates(np.log(probs_in), SamplingParams(temperature=1.0, min_p=0.1)).tolist())
    assert kept == {0, 1}


def test_sample_follows_distribution():
    rng = np.random.default_rng(0)
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    draws = np.bincount([sample(probs, rng) for _ in range(20000)], minlength=4) / 20000
    assert draws[1] == 0
    assert np.allclose(draws, probs, atol=0.015)


def test_bad_params_rejected():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)
