"""Model slots: one small object per model taking part in decoding.

A slot wraps a `backend.LlamaModel` (one llama.cpp context) with what the decoding loop needs:
- the id map between the model's vocabulary and the shared (target) ids (`token_map`, None when
  the vocabularies are identical);
- what its KV cache holds: `history` is the token sequence (shared ids: the context, then any
  pending tokens the slot has evaluated) the cache was built for, and the cache holds
  `history[offset:]` (`offset > 0` only while a proposer works on a recent window, see `rebase`);
- `rows`: the queue of logits rows it has computed for the positions after the committed context
  (row j = its distribution of pending token j, given the context and pending tokens 0..j-1), with
  the processed distributions made from them (`probs`, filled lazily);
- `score`: evaluate what it has not seen yet and append rows; `rollback`; `prepare` (keep the
  longest cached prefix of a new context).

Invariant kept by the engine during a generation: a slot with m >= 1 rows has evaluated the context
and the first m - 1 pending tokens; a slot with no rows has evaluated at most the context minus its
last token. Between generations `prepare` re-establishes it for the next context.
"""

from __future__ import annotations

import time

import numpy as np

from .vocab import TokenMap
from .sampling import SamplingParams, draw


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelSlot:
    """One participating model: its llama.cpp model, id map, cache bookkeeping and row queue."""

    def __init__(self, name: str, model, token_map: TokenMap | None = None):
        self.name = name
        self.model = model
        self.token_map = token_map
        self.history: list[int] = []  # shared ids the cache was built for (context, then pending)
        self.offset = 0  # the cache holds history[offset:]
        self.rows: list[np.ndarray] = []  # logits rows (model ids) for pending positions 0..m-1
        self.probs: list = []  # processed distributions of those rows, None until computed
        self._n_borrowed = 0  # trailing rows that are views of llama.cpp's output buffer
        self.seconds = 0.0  # time in this model's llama.cpp calls (reset per generation)
        self.calls = 0  # llama.cpp calls that asked for logits (reset per generation)

    # -- ids ------------------------------------------------------------------------------------------
    def to_model(self, shared_ids: list[int]) -> list[int]:
        return shared_ids if self.token_map is None else self.token_map.to_draft(shared_ids)

    def to_shared(self, model_id: int) -> int:
        return model_id if self.token_map is None else self.token_map.to_target(model_id)

    # -- cache ----------------------------------------------------------------------------------------
    @property
    def synced(self) -> int:
        """Length of `history`: tokens (context, then pending) the cache covers from the start."""
        return len(self.history)

    def rollback(self, n_keep: int) -> None:
        """Drop cached positions so the cache covers at most the first `n_keep` context tokens."""
        # Always ask llama.cpp (cheap): after an interrupt our count may lag its cache.
        n_keep = min(n_keep, len(self.history))
        if n_keep >= self.offset:
            self.model.rollback(n_keep - self.offset)
            del self.history[self.offset + self.model.n_past :]
        else:  # the window starts after n_keep: start over at n_keep
            self.model.reset()
            del self.history[n_keep:]
            self.offset = n_keep

    def prepare(self, context: list[int]) -> int:
        """Keep the longest cached prefix of `context` (all but its last token, whose logits start
        a reply); return how many context tokens the cache still covers."""
        self.rollback(min(common_prefix(self.history, context), len(context) - 1))
        self.clear_rows()
        return self.synced

    def reset(self) -> None:
        """Empty the cache and the row queue."""
        self.model.reset()
        self.history = []
        self.offset = 0
        self.clear_rows()

    def rebase(self, context: list[int], window: int) -> None:
        """Restart the cache on the last `window` context tokens (cheaper than a long catch-up;
        only for proposers, whose rows need not be exact)."""
        self.model.reset()
        self.offset = max(len(context) - window, 0)
        self.history = context[: self.offset]

    def full_context(self) -> None:
        """Undo a `rebase`: the cache restarts at position 0 (the next score prefills everything)."""
        if self.offset > 0:
            self.model.reset()
            self.history = []
            self.offset = 0

    # -- rows -----------------------------------------------------------------------------------------
    def clear_rows(self) -> None:
        self.rows = []
        self.probs = []
        self._n_borrowed = 0

    def pop_rows(self, n: int) -> None:
        """Forget the first `n` rows (their positions were committed)."""
        del self.rows[:n]
        del self.probs[:n]
        self._n_borrowed = min(self._n_borrowed, len(self.rows))

    def prefill(self, context: list[int]) -> None:
        """Evaluate the context up to its last token, without logits (the prompt's prefill)."""
        feed = context[self.synced : -1]
        if feed:
            t0 = time.perf_counter()
            self.model.eval(self.to_model(feed), 0)
            self.seconds += time.perf_counter() - t0
            self.history.extend(feed)

    def score(self, context: list[int], pending: list[int], upto: int | None = None) -> list[np.ndarray]:
        """Evaluate what the cache lacks and append rows for positions m..upto-1 (m = rows already
        queued; default upto = len(pending) + 1: every pending position and the bonus row after
        them); return the new rows (views: valid until this slot's next call).

        A catch-up longer than the model's exact batch size is evaluated first, without logits, so
        the batch holding the rows (at most `exact_batch` when the caller keeps the pending tokens
        within it) stays bit-identical to one-token decoding.
        """
        m = len(self.rows)
        upto = len(pending) + 1 if upto is None else upto
        n_rows = upto - m
        if n_rows <= 0:
            return []
        n_context = len(context)
        start = self.synced
        needed = pending[: upto - 1]  # row j is conditioned on the pending tokens before j
        feed = context[start:] + needed if start < n_context else needed[start - n_context :]
        if self._n_borrowed:  # rows we keep must survive the next call overwriting the buffer
            for i in range(len(self.rows) - self._n_borrowed, len(self.rows)):
                self.rows[i] = self.rows[i].copy()
        model = self.model
        t0 = time.perf_counter()
        if len(feed) > n_rows and len(feed) > model.exact_batch:
            model.eval(self.to_model(feed[:-n_rows]), 0)
            logits = model.eval(self.to_model(feed[-n_rows:]), n_rows)
        else:
            logits = model.eval(self.to_model(feed), n_rows)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.history.extend(feed)
        new_rows = list(logits)
        self.rows.extend(new_rows)
        self.probs.extend([None] * n_rows)
        self._n_borrowed = n_rows
        return new_rows

    def draw(self, position: int, params: SamplingParams, rng, p_min: float = 0.0) -> tuple[int, float]:
        """This model's own choice at `position` in shared ids (argmax, or a sample from its
        processed row, which is kept as its proposal distribution) and the row's top probability
        (1.0 when greedy and `p_min` is 0: then it is not needed)."""
        model_id, top_prob, probs = draw(self.rows[position], params, rng, p_min)
        if probs is not None:
            self.probs[position] = probs if self.token_map is None else self.token_map.row(probs)
        return self.to_shared(model_id), top_prob
