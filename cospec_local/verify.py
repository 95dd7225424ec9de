"""Verification rules: pure functions over one bundle of rows.

Glossary (used across the package):
- *position j*: the j-th token after the committed context (j = 0 is the next token);
- *proposed tokens* `x_0..x_{t-1}`: tokens some model proposed for positions 0..t-1, in shared
  (target) ids; `proposers[j]` is the `proposers.Proposer` of x_j, and `q_j = bundle.proposal_probs(j)`
  the distribution it drew x_j from when sampling (when greedy, x_j is q_j's argmax and q_j is the
  proposer's plain softmax);
- *r_j*: the distribution the output must follow at position j, built from the member models'
  rows by the mode's `combine.Combination` (for plain speculative decoding r = the target's p);
- *accepted tokens*: the proposed tokens kept, always a prefix `x_0..x_{m-1}` (m = `num_accepted`);
- *next token*: the token emitted after the accepted prefix. A *correction* when x_m was rejected
  (drawn from the residual norm(max(0, r_m - q_m)), or argmax r_m when greedy); a *bonus* when all
  t were accepted and the members' rows for position t are in the bundle (drawn from r_t); or none
  when all were accepted and position t has no rows yet (the collaborative modes: a later call
  brings them).

A `Verifier` turns a `RowBundle` into a `Verdict`; the engine checks the verdict (counts within
the run, one provenance per emitted token) before acting on it. Greedy and rejection sampling
against r are here; a learned arbiter (CoSpec) plugs in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .sampling import SamplingParams, logits_to_probs, sample, softmax

# How an emitted token was produced (its provenance); the slot that produced it travels alongside.
ACCEPTED = "accepted"  # a proposed token the verifier accepted
CORRECTION = "correction"  # drawn from the residual (or r's argmax) after a rejection
BONUS = "bonus"  # drawn from r after every proposed token was accepted
SAMPLED = "sampled"  # drawn from r with nothing proposed (target-only, draft-only, collab steps)
ARBITRATED = "arbitrated"  # a mismatching proposed token a verifier chose to keep (CoSpec)
FORCED = "forced"  # the only token the grammar allowed: emitted with no model call
PROPOSED_KINDS = (ACCEPTED, ARBITRATED)  # tokens a proposer wrote
# Kinds a verdict may give its kept tokens: a proposer's, or BONUS for cospec's held bonus (a
# token the target chose in the previous round, kept pending until the draft had read it).
KEPT_KINDS = PROPOSED_KINDS + (BONUS,)



class RowBundle:
    """The rows of one verification: for every slot, raw logits (`logits(i, j)`, model ids) and
    processed distributions (`probs(i, j)`, shared ids, computed on first read) at each position
    it has scored; the proposed tokens and who proposed them; r through the mode's combination.

    `n_positions` = positions every member has scored; tokens at positions < n_positions can be
    verified; `has_bonus_row` says whether position len(tokens) is among them.
    """

    def __init__(self, slots, combination, params: SamplingParams, tokens, proposers, n_positions, n_vocab,
                 last_token: int = -1, n_generated: int = 0):
        self.slots = slots
        self.last_token = last_token  # the last committed token (-1: unknown)
        self.n_generated = n_generated  # the reply's tokens committed before position 0
        self.combination = combination
        self.params = params
        self.tokens = tokens
        self.proposers = proposers
        self.n_positions = n_positions
        self.n_vocab = n_vocab
        self._combined: dict[int, np.ndarray] = {}

    @property
    def has_bonus_row(self) -> bool:
        return self.n_positions > len(self.tokens)

    def logits(self, i: int, j: int) -> np.ndarray:
        """Slot i's raw logits at position j (model ids; a view: do not keep it)."""
        return self.slots[i].rows[j]

    def probs(self, i: int, j: int):
        """Slot i's processed distribution at position j over shared ids (a `pair.MappedRow` for a
        trimmed draft). Greedy decoding credits each model with its plain softmax."""
        slot = self.slots[i]
        row = slot.probs[j]
        if row is None:
            row = softmax(slot.rows[j]) if self.params.greedy else logits_to_probs(slot.rows[j], self.params)
            if slot.token_map is not None:
                row = slot.token_map.row(row)
            slot.probs[j] = row
        return row

    def previous_token(self, j: int) -> int:
        """The token before position j: a proposed one, or the last committed token."""
        return self.tokens[j - 1] if j else self.last_token

    def proposal_probs(self, j: int):
        """q_j: the distribution the proposed token x_j was drawn from (one-hot for an n-gram
        proposal, which is deterministic)."""
        return self.proposers[j].proposal_probs(self, j)

    def combined(self, j: int) -> np.ndarray:
        """r_j, dense over shared ids (cached)."""
        r = self._combined.get(j)
        if r is None:
            r = self._combined[j] = self.combination.probs(self, j)
        return r

    def combined_argmax(self, j: int) -> int:
        return self.combination.argmax(self, j)

    def sample_combined(self, j: int, rng: np.random.Generator) -> int:
        if j in self._combined:
            return sample(self._combined[j], rng)
        return self.combination.sample(self, j, rng)


@dataclass
class Verdict:
    """The outcome of verifying a bundle: keep `num_accepted` proposed tokens, then emit
    `next_token` (None: nothing more this round) produced as `next_kind`."""

    num_accepted: int
    next_token: int | None
    next_kind: str
    # Provenance of each accepted token; defaults to ACCEPTED for all of them.
    accepted_kinds: list[str] = field(default_factory=list)
    # Mismatches met (rejections), proposed tokens an arbiter kept there, seconds it spent.
    mismatches: int = 0
    overrides: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        if not self.accepted_kinds:
            self.accepted_kinds = [ACCEPTED] * self.num_accepted


class Verifier(Protocol):
    """Decides which proposed tokens to keep and what comes next."""

    def verify(self, bundle: RowBundle, rng: np.random.Generator) -> Verdict: ...


def residual(target_probs: np.ndarray, proposal_probs) -> np.ndarray:
    """norm(max(0, r - q)) up to normalisation; `r` itself when r == q up to rounding."""
    if isinstance(proposal_probs, np.ndarray):
        out = np.maximum(target_probs - proposal_probs, 0.0)
    else:  # a trimmed draft's MappedRow: no target-wide copy of q
        out = proposal_probs.residual_from(target_probs)
    return out if out.sum() > 0.0 else target_probs


def verify_run(bundle: RowBundle, rng: np.random.Generator, arbitrate: Callable[[int, int], bool] | None = None,
               first: int = 0) -> Verdict:
    """Verify the bundle's proposed tokens against r, in order.

    Greedy: x_j is accepted when it is r_j's argmax. Sampled (Leviathan et al. 2023): accepted with
    probability min(1, r_j(x_j) / q_j(x_j)). At the first mismatch, `arbitrate(j, choice)` (CoSpec;
    `choice` = argmax r_j) may keep x_j and go on; otherwise the next token is the correction:
    argmax r_j, or a draw from norm(max(0, r_j - q_j)). When every token is kept and position t is
    scored, a bonus comes from r_t. Without an arbiter the output follows r exactly. Tokens before
    position `first` were already decided (cospec's held bonus): kept as BONUS.
    """
    greedy = bundle.params.greedy
    kinds: list[str] = [BONUS] * first
    mismatches = 0
    for j in range(first, len(bundle.tokens)):
        token = bundle.tokens[j]
        if greedy:
            choice = bundle.combined_argmax(j)
            if choice == token:
                kinds.append(ACCEPTED)
                continue
        else:
            r, q = bundle.combined(j), bundle.proposal_probs(j)
            # q[token] > 0 always: the proposer sampled it from q.
            if rng.random() * q[token] <= r[token]:
                kinds.append(ACCEPTED)
                continue
            choice = int(np.argmax(r)) if arbitrate is not None else -1
        mismatches += 1
        if arbitrate is not None and arbitrate(j, choice):
            kinds.append(ARBITRATED)
            continue
        correction = choice if greedy else sample(residual(r, q), rng)
        return Verdict(j, correction, CORRECTION, kinds, mismatches, mismatches - 1)
    t = len(bundle.tokens)
    kind = BONUS if t else SAMPLED
    bonus = None
    if bundle.has_bonus_row:
        bonus = bundle.combined_argmax(t) if greedy else bundle.sample_combined(t, rng)
    return Verdict(t, bonus, kind, kinds, mismatches, mismatches)


class StandardVerifier:
    """Greedy: output token-for-token equal to greedy decoding of r (target-only greedy for
    `spec`); sampled: output distributed exactly as sampling from r with the same settings."""

    def verify(self, bundle: RowBundle, rng) -> Verdict:
        return verify_run(bundle, rng)
