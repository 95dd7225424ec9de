"""Prompt-lookup (n-gram) drafts: propose what followed the context's latest suffix the last time
it occurred earlier in the context. No model, ~zero cost; pays off where the output repeats its
input (quoting, code edits, answers from a document, tables).

The same idea as llama.cpp's `llama-lookup` / `--spec-type ngram-*`, transformers'
`prompt_lookup_num_tokens` and vLLM's ngram proposer. A proposal is deterministic, i.e. a one-hot
q: rejection sampling then accepts x with probability r(x) and, on rejection, draws from r with x
removed (`OneHotProposal`), so sampled output still follows the target exactly.
"""

from __future__ import annotations

import threading

import numpy as np

DEFAULT_NGRAM_MAX = 4  # longest suffix looked up
DEFAULT_NGRAM_MIN = 2  # shortest: a single repeated token predicts too little to pay a verify row
BOUNDARY = -1  # separates generations in a SharedNgramPool: no n-gram spans two of them


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
        return self.continuation(tokens, k)

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """Up to k indexed tokens that followed the longest suffix of `tokens` (any sequence) found
        in the index, stopping at a document boundary; [] when none of n_min+ tokens is found."""
        known = self._tokens
        for n in range(min(self.n_max, len(tokens)), self.n_min - 1, -1):
            start = self._next.get(tuple(tokens[-n:]))
            if start is not None:
                found = known[start : start + k]
                return found[: found.index(BOUNDARY)] if BOUNDARY in found else found
        return []


class SharedNgramPool:
    """The token history of finished generations, shared by a server's workers (opt-in,
    `serve --shared-ngrams`): where a request's own context has no match, its n-gram proposals
    may continue from text that earlier requests held (the same system prompt, a repeated
    document). Proposals are only proposals: the target verifies each one, so no request's text
    reaches another's output. Its timing is another matter: a request runs faster when another
    one held the same text, a side channel, which is why the pool is off by default.

    Thread-safe (workers decode on their own threads); holds at most `max_tokens` tokens (when
    full it starts over with the newest generation)."""

    def __init__(self, max_tokens: int = 1 << 20, n_max: int = DEFAULT_NGRAM_MAX, n_min: int = DEFAULT_NGRAM_MIN):
        self.max_tokens = max_tokens
        self._index = NgramIndex(n_max, n_min)
        self._tokens: list[int] = []
        self._lock = threading.Lock()

    def add(self, tokens: list[int]) -> None:
        """Remember a finished generation's tokens (prompt and reply)."""
        with self._lock:
            if len(self._tokens) + len(tokens) >= self.max_tokens:
                self._tokens = []
            self._tokens.extend(list(tokens[-self.max_tokens + 1 :]) + [BOUNDARY])
            self._index.sync(self._tokens)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix of `tokens` in an earlier generation."""
        if k < 1:
            return []
        with self._lock:
            return self._index.continuation(tokens, k)


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
