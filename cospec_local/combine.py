"""Combination functions: the distribution r the output follows, built from the members' rows.

Every decoding mode names a combination (Fu et al., "Fast Large Language Model Collaborative
Decoding via Speculation", ICML 2025, for WE and CD):
- `Single(i)`: r is slot i's own processed distribution (target-only, draft-only and plain
  speculative decoding, where r = the target's p);
- `WeightedEnsemble(members, weights)`: r = sum_i w_i p_i over the members' processed
  distributions (sampling filters and temperature applied to each model first, as each would
  sample alone); at temperature 0 the p_i are plain softmaxes and the output is argmax r;
- `Contrastive(expert, amateur, mu)`: r = softmax((l_expert - mu * l_amateur) / T) on RAW logits,
  sampling filters applied to the combined logits (the paper's mu = 0.1); at T = 0, argmax.
  A trimmed-vocabulary amateur has no logit for target tokens it lacks: they get the amateur's
  lowest logit of that row (it can't propose them: they count as its least likely tokens), which
  gives them the largest contrastive bonus, mu x the row's logit range. Those tokens are the rare
  ones the trimming dropped, so the target's own low logit still decides.

A combination reads rows through a `verify.RowBundle` (`bundle.logits(i, j)`, `bundle.probs(i, j)`)
and offers `probs` (dense over shared ids), `argmax` and `sample` for position j. Other rules plug
in by implementing the same three methods and `members`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .sampling import logits_to_probs, sample, sample_logits


class Combination(Protocol):
    """The rule turning member rows into r. `members`: slot indices whose rows r needs."""

    members: tuple[int, ...]

    def probs(self, bundle, j: int) -> np.ndarray:
        """r at position j, dense over shared ids (float64)."""
        ...

    def argmax(self, bundle, j: int) -> int:
        """The greedy choice at position j."""
        ...

    def sample(self, bundle, j: int, rng: np.random.Generator) -> int:
        """One draw from r at position j."""
        ...


def dense(row, n_vocab: int) -> np.ndarray:
    """A row over shared ids as a dense float64 array (scatters a trimmed draft's `MappedRow`)."""
    if isinstance(row, np.ndarray):
        return row
    out = np.zeros(n_vocab, dtype=np.float64)
    out[row.map.draft_to_target] = row.draft_probs
    return out


class Single:
    """r = one model's own processed distribution."""

    def __init__(self, member: int):
        self.members = (member,)

    def probs(self, bundle, j):
        return dense(bundle.probs(self.members[0], j), bundle.n_vocab)

    def argmax(self, bundle, j):
        i = self.members[0]
        return bundle.slots[i].to_shared(int(np.argmax(bundle.logits(i, j))))

    def sample(self, bundle, j, rng):
        # Straight from the logits: no dense row for plain target (or draft) steps.
        i = self.members[0]
        return bundle.slots[i].to_shared(sample_logits(bundle.logits(i, j), bundle.params, rng))


class WeightedEnsemble:
    """r = sum_i w_i p_i (weights normalised to sum 1)."""

    def __init__(self, members: tuple[int, ...], weights: tuple[float, ...] | None = None):
        # Value checks (>= 0, not all 0) live in GenerationConfig; the count depends on the models.
        if weights is None:
            weights = (1.0,) * len(members)
        if len(weights) != len(members):
            raise ValueError(f"--weights has {len(weights)} values for {len(members)} models")
        self.members = tuple(members)
        total = float(sum(weights))
        self.weights = tuple(w / total for w in weights)

    def probs(self, bundle, j):
        out = np.zeros(bundle.n_vocab, dtype=np.float64)
        for i, w in zip(self.members, self.weights):
            row = bundle.probs(i, j)
            if isinstance(row, np.ndarray):
                out += w * row
            else:  # trimmed draft: add its mass at the target ids it has
                out[row.map.draft_to_target] += w * row.draft_probs
        # Under a grammar a member whose vocabulary has no allowed token contributes nothing (a
        # zero row): renormalise over the others.
        total = out.sum()
        return out / total if 0 < total < 1 - 1e-9 else out

    def argmax(self, bundle, j):
        # In greedy mode bundle.probs are plain softmaxes: argmax of their mixture.
        return int(np.argmax(self.probs(bundle, j)))

    def sample(self, bundle, j, rng):
        return sample(self.probs(bundle, j), rng)


class Contrastive:
    """r = softmax((l_expert - mu * l_amateur) / T), sampling filters on the combined logits."""

    def __init__(self, expert: int, amateur: int, mu: float = 0.1):
        self.members = (amateur, expert)
        self.expert, self.amateur, self.mu = expert, amateur, mu
        # A grammar masks r through the expert's logits alone (-inf there is -inf in r, whatever
        # the amateur says; masking the amateur too would give -inf + inf).
        self.constrained = (expert,)

    def logits(self, bundle, j) -> np.ndarray:
        expert = bundle.logits(self.expert, j).astype(np.float64)
        amateur = bundle.logits(self.amateur, j)
        token_map = bundle.slots[self.amateur].token_map
        if token_map is not None:  # see the module docstring: missing tokens take the row's minimum
            full = np.full(bundle.n_vocab, float(amateur.min()))
            full[token_map.draft_to_target] = amateur
            amateur = full
        combined = expert - self.mu * amateur
        # A token the grammar forbids is -inf in both rows when a proposer masked the amateur's: -inf.
        combined[np.isnan(combined)] = -np.inf
        return combined

    def probs(self, bundle, j):
        return logits_to_probs(self.logits(bundle, j), bundle.params)

    def argmax(self, bundle, j):
        return int(np.argmax(self.logits(bundle, j)))

    def sample(self, bundle, j, rng):
        return sample(self.probs(bundle, j), rng)
