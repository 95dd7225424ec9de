"""The decoding loop: a draft model proposes, the target verifies a whole run in one batch.

Terms (see also `verify`): the *context* is the list of committed token ids, in TARGET ids. Each
model's KV cache holds a prefix of the context (`model.n_past` tokens); the tokens after it are
*pending* and are evaluated at the start of the model's next call, so a model that sat out a few
steps catches up in one batch instead of re-evaluating everything.

One speculative cycle:
  1. draft: evaluate its pending tokens, then propose x_1..x_k one at a time (k from the draft-length
     policy; drafting stops early when the draft's top probability falls under `draft_p_min`);
  2. target: evaluate [pending..., x_1..x_k] in ONE llama_decode, logits for the last k+1 rows only;
  3. verifier: keep x_1..x_m and choose the next token (correction or bonus);
  4. roll both KV caches back to the committed prefix;
  5. emit x_1..x_m and the next token as events, committing each to the context as it is emitted.
With k = 0 a cycle is a plain target step (the draft-length policy backs off to that when the draft
does not pay for itself).

Invariant at every yield: every cached position of both models holds the committed token of that
position. A consumer that stops early (break, Ctrl-C, a stop string) therefore leaves the engine
ready for the next call; `finally` trims any cache that ran ahead of the context.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .config import GenerationConfig
from .errors import ContextOverflowError
from .pair import TokenMap
from .sampling import SamplingParams, logits_to_probs, sample, sample_logits
from .verify import DRAFT, TARGET, GreedyVerifier, RejectionVerifier, Verdict, Verifier

# A probe after many target-only steps feeds the draft at most this many recent tokens.
CATCH_UP_WINDOW = 16

# The draft's rows handed to a verifier that reads them in greedy mode: its raw distribution.
PLAIN_SOFTMAX = SamplingParams(temperature=1.0)


@dataclass
class TokenEvent:
    """One emitted token. `text` is the text it adds (may be empty while a UTF-8 character or a
    possible stop string is incomplete); `source` is DRAFT, TARGET or ARBITRATED."""

    token: int
    text: str
    source: str


@dataclass
class GenerationStats:
    """Counts and timings of one generate/stream call (seconds)."""

    n_prompt: int = 0
    n_generated: int = 0
    n_cycles: int = 0  # verification cycles with at least one draft token
    n_target_steps: int = 0  # cycles with k = 0 (target alone)
    n_drafted: int = 0
    n_accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # per cycle: draft tokens accepted
    draft_lengths: list[int] = field(default_factory=list)  # per cycle: draft tokens proposed
    t_prefill: float = 0.0
    t_decode: float = 0.0
    t_draft: float = 0.0
    t_target: float = 0.0
    finish_reason: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of draft tokens accepted per verification cycle."""
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prompt prefill excluded)."""
        return self.n_generated / self.t_decode if self.t_decode > 0 else 0.0

    @property
    def t_overhead(self) -> float:
        """Decode time spent outside llama.cpp calls: Python work, sampling, bookkeeping."""
        return max(self.t_decode - self.t_draft - self.t_target, 0.0)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("accepted_lengths", "draft_lengths")}
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            tokens_per_second=self.tokens_per_second,
            t_overhead=self.t_overhead,
            overhead_share=self.t_overhead / self.t_decode if self.t_decode else 0.0,
            accepted_lengths=list(self.accepted_lengths),
            draft_lengths=list(self.draft_lengths),
        )
        return d


@dataclass
class DoneEvent:
    """The last event of a stream: why it ended and the run's statistics."""

    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens), "context" (n_ctx full)
    stats: GenerationStats


class AdaptiveDraftLength:
    """Chooses k for the next cycle (k = 0: a plain target step) from measurements.

    Two questions, two measurements:
    - *How long a draft?* With per-token acceptance alpha a cycle drafting k tokens yields
      (1 - alpha^(k+1)) / (1 - alpha) tokens and costs k * t_draft + t_verify(k + 1), where
      t_verify(n) = a + b * n is fitted online to the target's call times (on CPUs each verified
      row pays a full pass of the output head, so b matters). We pick the k >= 1 with the lowest
      expected time per token.
    - *Draft at all?* The model can be wrong (catch-up batches, confidence stops), so we compare
      the MEASURED seconds per emitted token of drafting cycles and of plain target steps, and use
      the faster. The slower one is re-tried now and then (probe); its interval doubles while it
      stays slower. A probe after a long run of target steps re-feeds the draft only the last
      `CATCH_UP_WINDOW` tokens instead of everything it missed, so a useless draft costs a few
      percent at most.
    The policy lives on the engine, so what it learned carries over to the next call.
    """

    FIRST_PROBE, PROBE_GROWTH, LAST_PROBE = 8, 4, 256

    def __init__(self, k_max: int, decay: float = 0.9):
        self.k_max = k_max
        self.decay = decay
        # Acceptance counts with a prior of 0.8 worth two observations: start by drafting.
        self.successes, self.failures = 1.6, 0.4
        self.t_draft: float | None = None  # seconds per draft step (EMA)
        # Decayed sufficient statistics of (rows, seconds) for the target's call-time line.
        self._s = np.zeros(5)  # sum w, w*n, w*n^2, w*t, w*n*t
        self.spec_tpt: float | None = None  # measured seconds per token, drafting cycles (EMA)
        self.target_tpt: float | None = None  # measured seconds per token, target steps (EMA)
        self.since_probe = 0
        self.probe_every = self.FIRST_PROBE

    @property
    def alpha(self) -> float:
        return self.successes / (self.successes + self.failures)

    def verify_time(self, n_rows: int) -> float:
        s0, sn, snn, st, snt = self._s
        if s0 <= 0:
            return 0.0
        mean_n, mean_t = sn / s0, st / s0
        var = snn / s0 - mean_n**2
        # Until two row counts have been seen, assume each extra row costs 30% of a call.
        slope = (snt / s0 - mean_n * mean_t) / var if var > 0.25 else 0.3 * mean_t / max(mean_n, 1)
        return max(mean_t + max(slope, 0.0) * (n_rows - mean_n), 1e-6)

    def best_draft_length(self, k_max: int) -> int:
        """The k in [1, k_max] with the lowest modelled time per token."""
        if self.t_draft is None or self._s[0] <= 0:
            return k_max
        alpha = min(self.alpha, 0.999)
        costs = [
            (k * self.t_draft + self.verify_time(k + 1)) * (1 - alpha) / (1 - alpha ** (k + 1))
            for k in range(1, k_max + 1)
        ]
        return 1 + int(np.argmin(costs))

    @property
    def drafting_loses(self) -> bool:
        """True once measurements say plain target steps are faster."""
        return self.spec_tpt is not None and self.target_tpt is not None and self.spec_tpt > self.target_tpt

    def choose(self, k_max: int | None = None) -> int:
        k_max = self.k_max if k_max is None else min(k_max, self.k_max)
        if k_max < 1:  # no room left for a draft token
            return 0
        k = self.best_draft_length(k_max)
        if self.spec_tpt is None:
            return k
        if self.target_tpt is None:
            return 0
        drafting_wins = self.spec_tpt <= self.target_tpt
        self.since_probe += 1
        if self.since_probe >= self.probe_every:  # re-try the losing option
            self.since_probe = 0
            self.probe_every = min(self.probe_every * self.PROBE_GROWTH, self.LAST_PROBE)
            return 0 if drafting_wins else k
        return k if drafting_wins else 0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def observe_cycle(self, k: int, seconds: float, n_tokens: int) -> None:
        """A whole cycle: k drafted (0 = target step), `n_tokens` emitted in `seconds`."""
        was_winning = None if self.spec_tpt is None or self.target_tpt is None else not self.drafting_loses
        if k == 0:
            self.target_tpt = self._ema(self.target_tpt, seconds / n_tokens)
        else:
            self.spec_tpt = self._ema(self.spec_tpt, seconds / n_tokens)
        if was_winning is not None and was_winning == self.drafting_loses:
            self.probe_every = self.FIRST_PROBE  # the winner changed: probe often again

    def observe_target(self, n_rows: int, seconds: float) -> None:
        self._s *= self.decay
        self._s += (1.0, n_rows, n_rows * n_rows, seconds, n_rows * seconds)

    def observe_draft_step(self, seconds: float) -> None:
        self.t_draft = self._ema(self.t_draft, seconds)

    def observe_acceptance(self, n_proposed: int, n_accepted: int) -> None:
        self.successes = self.decay * self.successes + n_accepted
        self.failures = self.decay * self.failures + (1 if n_accepted < n_proposed else 0)


class TextStream:
    """Incremental detokenizer with stop strings: returns the text that is safe to show now,
    holding back a tail that could still turn into a stop string."""

    def __init__(self, stop: tuple[str, ...]):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        text = self._held + self._decoder.decode(data)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                self.stopped = True
                self._held = ""
                return text[:i]
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


class Engine:
    """Decodes with a target and an optional draft, keeping both KV caches across calls.

    `context` is the committed token list; `stream(context_tokens, config)` first reuses the longest
    cached prefix of `context_tokens` (a chat turn re-evaluates only the new text).
    """

    def __init__(self, target, draft=None, token_map: TokenMap | None = None):
        self.target = target
        self.draft = draft
        self.token_map = token_map
        self.context: list[int] = []
        self._eog = set(target.eog_ids().tolist())
        self.policy: AdaptiveDraftLength | None = None  # learned costs carry over between calls
        # The draft's cache holds context[draft_offset : draft_offset + draft.n_past]. The offset
        # is 0 unless a probe re-started the draft on a recent window (its proposals then see
        # less context, which verification makes harmless).
        self.draft_offset = 0
        self.n_ctx = target.n_ctx if draft is None else min(target.n_ctx, draft.n_ctx)

    # -- helpers -------------------------------------------------------------------------------------
    def _draft_ids(self, target_ids: list[int]) -> list[int]:
        return target_ids if self.token_map is None else self.token_map.to_draft(target_ids)

    def _to_target(self, draft_id: int) -> int:
        return draft_id if self.token_map is None else self.token_map.to_target(draft_id)

    def _draft_synced(self) -> int:
        """Number of context tokens the draft's cache covers (from the start of the context)."""
        return self.draft_offset + self.draft.n_past

    def _rollback(self, n_keep: int) -> None:
        """Roll both caches back to at most `n_keep` context tokens (the one place for rewinds)."""
        # Always ask llama.cpp (cheap): after an interrupt our count may lag its cache.
        self.target.rollback(min(self.target.n_past, n_keep))
        if self.draft is not None:
            if n_keep >= self.draft_offset:
                self.draft.rollback(min(self.draft.n_past, n_keep - self.draft_offset))
            else:
                self.draft.reset()
                self.draft_offset = n_keep

    def _rebase_draft(self, window: int) -> None:
        """Restart the draft on the last `window` context tokens (cheaper than a long catch-up)."""
        self.draft.reset()
        self.draft_offset = max(len(self.context) - window, 0)

    def _draft_full_context(self) -> None:
        """Undo a probe's short window: the draft restarts at position 0 (it then prefills all)."""
        if self.draft_offset > 0:
            self.draft.reset()
            self.draft_offset = 0

    def _prepare(self, context_tokens: list[int]) -> int:
        """Make `context_tokens` the context, keeping the longest cached common prefix."""
        if not context_tokens:
            raise ValueError("the prompt is empty: give at least one token")
        if len(context_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(context_tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten it, start a new chat or raise --ctx-size"
            )
        common = 0
        for a, b in zip(self.context, context_tokens):
            if a != b:
                break
            common += 1
        # The last prompt token is always re-evaluated: its logits start the reply.
        keep = min(common, len(context_tokens) - 1)
        self._rollback(keep)
        self.context = list(context_tokens)
        return len(context_tokens) - keep

    def reset(self) -> None:
        """Forget the context and empty both caches."""
        self.context = []
        self.draft_offset = 0
        for model in (self.target, self.draft):
            if model is not None:
                model.reset()

    # -- the loop ----------------------------------------------------------------------------------------
    def stream(
        self, context_tokens: list[int], config: GenerationConfig, verifier: Verifier | None = None
    ) -> Iterator[TokenEvent | DoneEvent]:
        """Generate after `context_tokens`, yielding a TokenEvent per token and a final DoneEvent."""
        if config.mode != "target" and self.draft is None:
            raise ValueError(f"mode {config.mode!r} needs a draft model")
        params = config.sampling
        rng = np.random.default_rng(params.seed)
        if verifier is None:
            verifier = GreedyVerifier() if params.greedy else RejectionVerifier(params)
        stats = GenerationStats(n_prompt=len(context_tokens))
        n_new = self._prepare(context_tokens)
        if self.policy is None:
            self.policy = AdaptiveDraftLength(config.draft_max)
        policy = self.policy
        text = TextStream(config.stop)
        eog = self._eog
        target, draft = self.target, self.draft

        finish = "length"
        t_start = time.perf_counter()
        try:
            # Prefill: everything but the last prompt token, without logits.
            t0 = time.perf_counter()
            if n_new > 1:
                if config.mode != "draft":
                    target.eval(self.context[target.n_past : -1], 0)
                # The draft prefills lazily when measurements say it is not worth running.
                draft_needed = config.mode == "draft" or (
                    config.mode == "spec" and not (config.adaptive and policy.drafting_loses)
                )
                if draft is not None and draft_needed:
                    self._draft_full_context()
                    draft.eval(self._draft_ids(self.context[self._draft_synced() : -1]), 0)
            stats.t_prefill = time.perf_counter() - t0
            t_decode0 = time.perf_counter()

            while stats.n_generated < config.max_tokens:
                # The verification batch is [last, x_1..x_k]: keep it within the target's exact size.
                room = min(self.n_ctx - len(self.context), target.exact_batch)
                if room <= 0:
                    finish = "context"
                    break
                if config.mode == "draft":
                    new_tokens, sources = self._draft_step(params, rng, stats)
                else:
                    if config.mode == "target":
                        k = 0
                    elif config.adaptive:
                        k = policy.choose(min(config.draft_max, room - 1))
                    else:
                        k = min(config.draft_max, room - 1)
                    t_cycle = time.perf_counter()
                    new_tokens, sources = self._cycle(k, config, params, rng, verifier, policy, stats)
                    if config.mode == "spec":
                        policy.observe_cycle(k, time.perf_counter() - t_cycle, len(new_tokens))
                for token, source in zip(new_tokens, sources):
                    if token in eog:
                        finish = "stop"
                        break
                    self.context.append(token)
                    stats.n_generated += 1
                    piece = text.push(target.token_bytes(token))
                    yield TokenEvent(token, piece, source)
                    if text.stopped:
                        finish = "stop"
                        break
                    if stats.n_generated >= config.max_tokens:
                        break
                if finish == "stop":
                    break
            tail = text.flush() if not text.stopped else ""
            if tail:
                yield TokenEvent(-1, tail, TARGET)
            stats.t_decode = time.perf_counter() - t_decode0
        finally:
            self._rollback(len(self.context))  # whatever was evaluated beyond the committed context
            if not stats.t_decode:
                stats.t_decode = time.perf_counter() - t_start - stats.t_prefill
        stats.finish_reason = finish
        yield DoneEvent(finish, stats)

    def _draft_step(self, params, rng, stats) -> tuple[list[int], list[str]]:
        """Draft alone: one token from the draft's own distribution, over the whole context."""
        self._draft_full_context()
        t0 = time.perf_counter()
        row = self.draft.eval(self._draft_ids(self.context[self._draft_synced() :]), 1)[0]
        stats.t_draft += time.perf_counter() - t0
        draft_id = sample_logits(row, params, rng)
        return [self._to_target(draft_id)], [DRAFT]

    def _cycle(self, k, config, params, rng, verifier, policy, stats) -> tuple[list[int], list[str]]:
        """One draft-then-verify cycle (k = 0: a plain target step). Returns the tokens to emit."""
        target, draft = self.target, self.draft
        n_committed = len(self.context)

        # 1. Draft k tokens (fewer if its confidence drops).
        draft_tokens: list[int] = []
        draft_rows: list[np.ndarray | None] = []
        if k > 0:
            t0 = time.perf_counter()
            pending = len(self.context) - self._draft_synced()
            if pending > CATCH_UP_WINDOW:
                self._rebase_draft(CATCH_UP_WINDOW)
            feed = self._draft_ids(self.context[self._draft_synced() :])
            n_calls = 0
            # Sampling always needs the draft's rows; greedy only for a verifier that reads them
            # (then as the draft's plain softmax).
            want_rows = not params.greedy or verifier.needs_draft_probs
            row_params = PLAIN_SOFTMAX if params.greedy else params
            for _ in range(k):
                row = draft.eval(feed, 1)[0]
                n_calls += 1
                if want_rows:
                    probs = logits_to_probs(row, row_params)
                    draft_id = int(np.argmax(row)) if params.greedy else sample(probs, rng)
                    top_prob = float(probs.max())
                    draft_rows.append(probs if self.token_map is None else self.token_map.row(probs))
                else:
                    draft_id = int(np.argmax(row))
                    # Softmax of the top logit; only needed when the confidence cut-off is on.
                    top_prob = 1.0 / float(np.exp(row - row[draft_id]).sum()) if config.draft_p_min > 0 else 1.0
                    draft_rows.append(None)
                draft_tokens.append(self._to_target(draft_id))
                feed = [draft_id]
                if top_prob < config.draft_p_min:
                    break
            dt = time.perf_counter() - t0
            stats.t_draft += dt
            policy.observe_draft_step(dt / n_calls)

        # 2. Target scores [last, x_1..x_k] in one batch, k + 1 logit rows.
        pending = self.context[target.n_past :]
        if len(pending) > 1:  # catch up first (after draft-only calls): keep the batch exact-sized
            t0 = time.perf_counter()
            target.eval(pending[:-1], 0)
            stats.t_target += time.perf_counter() - t0
            pending = pending[-1:]
        t0 = time.perf_counter()
        n_rows = len(draft_tokens) + 1
        target_logits = target.eval(pending + draft_tokens, n_rows)
        dt = time.perf_counter() - t0
        stats.t_target += dt
        policy.observe_target(n_rows, dt)

        # 3. Verify.
        if draft_tokens:
            verdict = verifier.verify(draft_tokens, draft_rows, target_logits, rng)
            stats.n_cycles += 1
            stats.n_drafted += len(draft_tokens)
            stats.n_accepted += verdict.num_accepted
            stats.accepted_lengths.append(verdict.num_accepted)
            stats.draft_lengths.append(len(draft_tokens))
            policy.observe_acceptance(len(draft_tokens), verdict.num_accepted)
        else:
            verdict = Verdict(0, sample_logits(target_logits[0], params, rng), False)
            stats.n_target_steps += 1

        # 4. Roll back whatever was evaluated beyond the accepted prefix.
        self._rollback(n_committed + verdict.num_accepted)

        # 5. The tokens to emit, with their provenance.
        accepted = draft_tokens[: verdict.num_accepted]
        return accepted + [verdict.next_token], verdict.accepted_sources + [TARGET]
