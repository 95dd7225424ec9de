"""Turning a row of logits into the distribution we sample from: pure numpy, no model.

The same `SamplingParams` are applied to the draft's and the target's rows, so rejection sampling
is exact with respect to the target's *processed* distribution (what target-only sampling with these
settings would draw from). Filter order follows llama.cpp's default chain: top-k, top-p, min-p, then
temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; temperature <= 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    seed: int | None = None

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# When top-p is on, sort only this many of the largest logits first; fall back to a full sort when
# they do not hold the top-p mass (rare for language models, whose mass sits in a few tokens).
_TOP_P_CANDIDATES = 1024


def softmax(logits: np.ndarray) -> np.ndarray:
    """The plain (temperature 1, unfiltered) float64 distribution of a row of logits; zeros for a
    row a grammar masked entirely (a trimmed draft's vocabulary lacking every allowed token)."""
    top = logits.max()
    if top == -np.inf:
        return np.zeros(logits.shape, dtype=np.float64)
    e = np.exp(logits - top, dtype=np.float64)
    e /= e.sum()
    return e


def candidates(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Ids that survive top-k, top-p and min-p (computed at temperature 1, like llama.cpp)."""
    n = logits.shape[-1]
    ids = None
    if params.top_k and params.top_k < n:
        ids = np.argpartition(logits, n - params.top_k)[n - params.top_k :]
    if params.top_p < 1.0:
        pool = np.arange(n) if ids is None else ids
        pool_logits = logits[pool]
        with np.errstate(invalid="ignore"):  # a row a grammar masked entirely: softmax makes it zeros
            weights = np.exp(pool_logits - pool_logits.max())
        total = weights.sum()
        order = None
        if len(pool) > _TOP_P_CANDIDATES:
            part = np.argpartition(-pool_logits, _TOP_P_CANDIDATES)[:_TOP_P_CANDIDATES]
            order = part[np.argsort(-pool_logits[part], kind="stable")]
            if weights[order].sum() < params.top_p * total:
                order = None
        if order is None:
            order = np.argsort(-pool_logits, kind="stable")
        cum = np.cumsum(weights[order]) / total
        # The smallest head of the sorted list whose mass reaches top_p.
        cut = min(int(np.searchsorted(cum, params.top_p)) + 1, len(order))
        ids = pool[order[:cut]]
    if params.min_p > 0.0:
        pool = np.arange(n) if ids is None else ids
        vals = logits[pool]
        keep = vals >= vals.max() + np.log(params.min_p)
        ids = pool[keep]
    return ids


def _filtered_probs(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """(surviving ids or None for all, their float64 probabilities after temperature).

    Filters run on the float32 row; only the survivors go to float64 (262k-wide rows are common).
    """
    ids = candidates(logits, params)
    if ids is None:
        return None, softmax(np.asarray(logits, dtype=np.float64) / params.temperature)
    return ids, softmax(logits[ids].astype(np.float64) / params.temperature)


def logits_to_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Dense float64 distribution over the whole vocabulary after filters and temperature.

    Greedy params give a one-hot row at the argmax.
    """
    probs = np.zeros(logits.shape[-1], dtype=np.float64)
    if params.greedy:
        probs[int(np.argmax(logits))] = 1.0
        return probs
    ids, survivor_probs = _filtered_probs(logits, params)
    if ids is None:
        return survivor_probs
    probs[ids] = survivor_probs
    return probs


def sample_logits(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from a row of logits (argmax when greedy), without building a dense row."""
    if params.greedy:
        return int(np.argmax(logits))
    ids, survivor_probs = _filtered_probs(logits, params)
    choice = sample(survivor_probs, rng)
    return choice if ids is None else int(ids[choice])


def draw(row: np.ndarray, params: SamplingParams, rng: np.random.Generator, p_min: float = 0.0):
    """A proposer's choice from its row of logits: (id, top probability, q). Greedy: the argmax,
    q None (greedy verification needs no q) and the top probability computed only when `p_min` > 0
    asks for it (else 1.0); sampling: a draw from the processed distribution q, kept for the
    verifier's rejection rule."""
    if params.greedy:
        token = int(np.argmax(row))
        # Softmax of the top logit; only needed for a confidence cut-off.
        top_prob = 1.0 / float(np.exp(row - row[token]).sum()) if p_min > 0 else 1.0
        return token, top_prob, None
    probs = logits_to_probs(row, params)
    return sample(probs, rng), float(probs.max()), probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one id from a (not necessarily normalised) non-negative row."""
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(probs) - 1))
