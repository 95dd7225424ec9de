"""Prompt-lookup (n-gram) drafts: propose what followed the context's latest suffix the last time
it occurred earlier in the context. No model, ~zero cost; pays off where the output repeats its
input (quoting, code edits, answers from a document, tables).

The same idea as llama.cpp's `llama-lookup` / `--spec-type ngram-*`, transformers'
`prompt_lookup_num_tokens` and vLLM's ngram proposer. A proposal is deterministic, i.e. a one-hot
q: rejection sampling then accepts x with probability r(x) and, on rejection, draws from r with x
removed (`OneHotProposal`), so sampled output still follows the target exactly.
"""

from __future__ import annotations

import numpy as np

DEFAULT_NGRAM_MAX = 4  # longest suffix looked up
DEFAULT_NGRAM_MIN = 2  # shortest: a single repeated token predicts too little to pay a verify row


class NgramIndex:
    """For every n-gram (n_min <= n <= n_max) of a token sequence, where it last ended; kept up to
    date as the sequence grows (`sync`), so a lookup is a few dict reads.

    The n-grams ending at the last token are indexed only once a token follows them, so the
    context's own suffix never matches itself.
    """

    def __init__(self, n_max: int = DEFAULT_NGRAM_MAX, n_min: int = DEFAULT_NGRAM_MIN):
        if not 1 <= n_min <= n_max:
            raise ValueError("need 1 <= n_min <= n_max")
        self.n_max, self.n_min = n_max, n_min
        self._tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after it
        self._source: list[int] | None = None  # the list last synced with (the engine's context)

    def sync(self, tokens: list[int]) -> None:
        """Follow `tokens`: appended tokens are indexed; a sequence that is not an extension of
        the indexed one is indexed afresh."""
        known = self._tokens
        # The engine's context only grows during a generation: the same list needs no comparison.
        same = tokens is self._source and len(tokens) >= len(known)
        if not same and (len(tokens) < len(known) or tokens[: len(known)] != known):
            self._tokens, self._next = [], {}
            known = self._tokens
        self._source = tokens
        start = len(known)
        known.extend(tokens[start:])
        # The n-grams ending at position p (followed by position p + 1) for every p now followed.
        for p in range(max(start - 1, 0), len(known) - 1):
            for n in range(self.n_min, self.n_max + 1):
                if p + 1 >= n:
                    self._next[tuple(known[p + 1 - n : p + 1])] = p + 1

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix of `tokens` seen earlier in them (its
        latest occurrence); [] when no suffix of n_min+ tokens repeats."""
        if k < 1:
            return []
        self.sync(tokens)
        known = self._tokens
        for n in range(min(self.n_max, len(known)), self.n_min - 1, -1):
            start = self._next.get(tuple(known[-n:]))
            if start is not None:
                return known[start : start + k]
        return []


class OneHotProposal:
    """q for a deterministic proposal of `token`: q[token] = 1, 0 elsewhere. Supports what
    `verify.verify_run` reads: `q[x]` and `residual_from(r)` = max(0, r - q) (r without `token`)."""

    def __init__(self, token: int):
        self.token = token

    def __getitem__(self, token: int) -> float:
        return 1.0 if token == self.token else 0.0

    def residual_from(self, target_probs: np.ndarray) -> np.ndarray:
        out = target_probs.copy()
        out[self.token] = 0.0
        return out
