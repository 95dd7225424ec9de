"""Verification rules: pure functions over rows of the draft's and the target's outputs.

Glossary (used across the package):
- draft tokens `x_1..x_k`: what the draft proposed, in TARGET ids;
- `draft_probs[j]`: the draft's processed distribution the j-th token was drawn from, indexed by
  target ids (a numpy row, or a `pair.MappedRow` for drafts with a trimmed vocabulary);
- `target_probs[j]` / `target_logits[j]`: the target's row at the position of `x_{j+1}`; there are
  k + 1 rows, the last one follows all k draft tokens;
- accepted tokens: the draft tokens kept, always a prefix `x_1..x_m` (m = `num_accepted`);
- next token: the one token every cycle adds after the accepted prefix. It is a *correction*
  (resampled from the residual, or the target's argmax) when a draft token was rejected, or a
  *bonus* (drawn from the last target row) when all k were accepted.

A `Verifier` turns one cycle's rows into a `Verdict`. Greedy and rejection sampling are here; the
collaborative modes plug in other verifiers (a combined distribution instead of the target's, or a
learned arbiter that may keep a mismatching draft token) without touching the decoding loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .sampling import SamplingParams, logits_to_probs, sample

# Where an emitted token came from.
DRAFT = "draft"  # a draft token the verifier accepted
TARGET = "target"  # a token the target chose: correction, bonus or a plain target step
ARBITRATED = "arbitrated"  # a mismatching draft token a verifier chose to keep (CoSpec)


@dataclass
class Verdict:
    """The outcome of verifying one proposal."""

    num_accepted: int
    next_token: int
    next_is_bonus: bool
    # Provenance of each accepted token; defaults to DRAFT for all of them.
    accepted_sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.accepted_sources:
            self.accepted_sources = [DRAFT] * self.num_accepted


class Verifier(Protocol):
    """Decides which draft tokens to keep and what comes next.

    `needs_draft_probs` tells the engine whether to build the draft's probability rows in greedy
    mode too (sampling always builds them): a combined or arbitrated rule reads them, plain greedy
    does not, and skipping them saves a softmax per drafted token.
    """

    needs_draft_probs: bool

    def verify(
        self,
        draft_tokens: list[int],
        draft_rows: list[np.ndarray],
        target_logits: np.ndarray,
        rng: np.random.Generator,
    ) -> Verdict:
        """`draft_rows[j]` is the draft's distribution for token j over target ids: the processed
        sampling distribution when sampling, the plain softmax of its logits when greedy and
        `needs_draft_probs` is set, else None. `target_logits` has len(draft_tokens) + 1 rows (a
        view into llama.cpp's buffer: do not keep it)."""
        ...


def verify_greedy(draft_tokens: list[int], target_logits: np.ndarray) -> Verdict:
    """Accept while the target's argmax equals the draft token; the first mismatch is replaced by
    the target's argmax; if all match, the bonus is the argmax of the last row."""
    target_choice = np.argmax(target_logits, axis=1)
    for j, token in enumerate(draft_tokens):
        if target_choice[j] != token:
            return Verdict(j, int(target_choice[j]), False)
    return Verdict(len(draft_tokens), int(target_choice[-1]), True)


def verify_rejection(
    draft_tokens: list[int],
    draft_probs: list[np.ndarray],
    target_probs: list[np.ndarray],
    rng: np.random.Generator,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023): accept x_j with probability
    min(1, p_j(x_j) / q_j(x_j)); on the first rejection draw from norm(max(0, p_j - q_j)); if all
    are accepted draw a bonus token from p_{k+1}. The emitted tokens follow p exactly."""
    for j, token in enumerate(draft_tokens):
        p = target_probs[j]
        q = draft_probs[j]
        # q[token] > 0 always: the draft sampled it from q.
        if rng.random() * q[token] <= p[token]:
            continue
        # Mapped draft rows (trimmed vocabularies) compute this without a target-wide copy of q.
        residual = q.residual_from(p) if hasattr(q, "residual_from") else np.maximum(p - q, 0.0)
        if residual.sum() <= 0.0:  # p == q up to rounding: any draw from p is right
            residual = p
        return Verdict(j, sample(residual, rng), False)
    return Verdict(len(draft_tokens), sample(target_probs[len(draft_tokens)], rng), True)


class GreedyVerifier:
    """Token-for-token identical to target-only greedy decoding."""

    needs_draft_probs = False

    def verify(self, draft_tokens, draft_rows, target_logits, rng) -> Verdict:
        return verify_greedy(draft_tokens, target_logits)


class LazyProbs:
    """Rows of logits turned into processed distributions only when first read: verification
    usually stops before the last row, and each 262k-wide row costs about a millisecond."""

    def __init__(self, logits: np.ndarray, params: SamplingParams):
        self.logits = logits
        self.params = params
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, j: int) -> np.ndarray:
        row = self._rows.get(j)
        if row is None:
            row = self._rows[j] = logits_to_probs(self.logits[j], self.params)
        return row


class RejectionVerifier:
    """Output distribution equal to target-only sampling with the same `SamplingParams`."""

    needs_draft_probs = True

    def __init__(self, params: SamplingParams):
        self.params = params

    def verify(self, draft_tokens, draft_rows, target_logits, rng) -> Verdict:
        return verify_rejection(draft_tokens, draft_rows, LazyProbs(target_logits, self.params), rng)
