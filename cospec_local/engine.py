"""The decoding loop over n model slots: draft, score, verify, apply.

Terms, one word per idea (used across the package; verification's own terms are in `verify`):
- *slot*: one loaded model taking part (`slots.ModelSlot`): its KV cache, id map and row queue.
  (A server's parallel request handler is a *worker*, never a slot.)
- *context*: a conversation's committed token list, in shared (target) ids.
- *pending tokens*: proposed tokens after the context, not yet verified.
- *proposer*: who drafts pending tokens (`proposers`): a model slot, or the n-gram lookup.
- *member*: a slot whose rows make r, the distribution the output follows (`combine.Combination`).
- *rows*: the logits each slot has computed for the pending positions, queued per slot.
- *k* (`draft_max`, CoS's per-model `gamma`): how many tokens a proposer drafts per cycle.
- *draft-length policy*: what chooses k from measured acceptance and costs (`draft_length`);
  the *arbiter* (`arbiter`) is CoSpec's learned ONNX policy at mismatches: never "policy" alone.
- *mode*: how a generation uses the slots (`modes`): members, proposers, whose turn is next.
- *turn*: one model call: a proposer drafts, or a member scores every pending token in one batch
  (its last row, after them, is the *bonus row*, except in cospec).
- *round*: turns until a verification emits tokens; a round with proposed tokens is a *cycle*,
  one without is a *plain step*.

One round:
  1. draft: the mode's proposer appends pending tokens (`Mode.take_turn`);
  2. score: a member evaluates the pending tokens in one batch, appending rows;
  3. verify: once every member has a row for position 0, the verifier gets ONE `RowBundle` and
     returns a `Verdict`: how many proposed tokens to keep and the next token;
  4. apply: the engine checks the verdict, emits, and drops what it made stale (rows and cache
     entries after a rejection);
  5. adapt: the mode's draft-length policies learn from the cycle (`Mode.observe`).

The state of one call lives in a `Generation`; a conversation's state across calls (context, RNG,
draft-length policies, n-gram index) in its `Conversation`. The engine holds the slots and runs
one conversation at a time. A slot's cache may run ahead of the committed context (pending tokens,
or accepted tokens not yet emitted); a consumer that stops early leaves the engine ready for the
next call: `finally` drops the rows and trims caches to the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .arbiter import DEFAULT_POLICY, GENERIC_POLICY, OnnxPolicy, vocabulary_fingerprint
from .config import GenerationConfig
from .draft_length import AdaptiveDraftLength
from .errors import ContextOverflowError, EngineBusyError
from .grammar import Grammar, GrammarState
from .modes import Mode, mode_class
from .ngram import NgramIndex, SharedNgramPool
from .proposers import Proposer
from .slots import ModelSlot
from .stats import GenerationStats
from .text import TextStream
from .verify import ARBITRATED, BONUS, FORCED, KEPT_KINDS, PROPOSED_KINDS, SAMPLED, RowBundle, Verdict, Verifier

PREFILL_PIECE = 256  # prompt tokens evaluated between two looks at Conversation.cancelled
COMBINED = "combined"  # the producing "slot" of a token drawn from r over several models


@dataclass
class TokenLogprob:
    """An emitted token's log probability under the distribution the output follows at its
    position, and the most likely alternatives there: [(token, logprob)], most likely first."""

    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def from_probs(cls, probs: np.ndarray, token: int, n_top: int) -> "TokenLogprob":
        with np.errstate(divide="ignore"):  # a token the distribution gives 0 (an arbiter's): -inf
            logprob = float(np.log(probs[token]))
            top = np.argpartition(-probs, n_top)[:n_top] if 0 < n_top < len(probs) else np.arange(min(n_top, len(probs)))
            top = top[np.argsort(-probs[top], kind="stable")]
            return cls(logprob, [(int(t), float(np.log(probs[t]))) for t in top])


@dataclass
class TokenEvent:
    """One emitted token. `text` is the text it adds (may be empty while a UTF-8 character or a
    possible stop string is incomplete); `source` says how it was produced (`verify.ACCEPTED`,
    CORRECTION, BONUS, SAMPLED, ARBITRATED, FORCED) and `slot` which model produced it ('draft', 'target',
    'model1', ... or 'combined' for a draw from r over several models)."""

    token: int
    text: str
    source: str
    slot: str = ""
    logprob: TokenLogprob | None = None  # with GenerationConfig.logprobs

    @property
    def proposed(self) -> bool:
        """True for a token a proposer wrote and the verifier kept."""
        return self.source in PROPOSED_KINDS


@dataclass
class DoneEvent:
    """The last event of a stream: why it ended and the run's statistics."""

    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens), "context" (n_ctx full),
    # "cancelled" (Conversation.cancel)
    stats: GenerationStats


class Conversation:
    """One conversation's decoding state: its committed context, RNG, draft-length policy and the
    last call's statistics. Several conversations can share an engine (one decodes at a time; the
    engine keeps whatever prefix of a conversation its caches still hold)."""

    def __init__(self):
        self.context: list[int] = []
        self.draft_length_policy = AdaptiveDraftLength()  # learned costs carry over between calls
        # The same for n-gram proposals: own acceptance, restarted per generation (whether the
        # output repeats its context depends on the prompt), probing more often (proposals are free)
        # and with a longer memory (one rejected run of free proposals is no reason to stop).
        self.ngram_length_policy = AdaptiveDraftLength(probe_growth=2, cycle_decay=0.95, full_length=True)
        # The same for the target's MTP head (`--draft-source mtp`).
        self.mtp_length_policy = AdaptiveDraftLength()
        # cospec's draft: its own acceptance (kept tokens count), lengths only (it always drafts).
        self.cospec_length_policy = AdaptiveDraftLength()
        self.ngram_index = NgramIndex()  # follows the context
        # Earlier generations' tokens shared with other conversations (a server option; None: off).
        self.ngram_pool: SharedNgramPool | None = None
        self.rng = np.random.default_rng()
        self.last_stats: GenerationStats | None = None
        # Set from any thread to stop the running generation at the next prefill piece or round
        # (it then ends with finish reason "cancelled"); cleared by `Engine.stream`.
        self.cancelled = False

    def cancel(self) -> None:
        """Stop this conversation's running generation soon (safe from another thread)."""
        self.cancelled = True


class Generation:
    """The state of one generate/stream call, which the engine, the mode and the proposers share:
    the committed context (the conversation's list), the pending tokens and who proposed each, how
    many pending tokens this round's scoring batch may hold (`limit`), the RNG and the statistics."""

    def __init__(self, context: list[int], config: GenerationConfig, rng: np.random.Generator, stats: GenerationStats):
        self.context = context
        self.config = config
        self.rng = rng
        self.stats = stats
        self.pending: list[int] = []  # proposed tokens after the context, not yet verified
        self.proposed_by: list[Proposer] = []  # the proposer of each pending token
        self.limit = 0  # most pending tokens this round's scoring batch may hold
        self.started = time.perf_counter()
        self.round_started = self.started
        self.stopped = False  # an end-of-generation token or a stop string ended the reply
        self.grammar: GrammarState | None = None  # the reply's constraint, if any
        self.text: TextStream | None = None  # the reply's text so far (stop strings)
        self.eog: set[int] = set()
        self.token_bytes = None  # the target's token -> bytes

    def would_end(self, token: int) -> bool:
        """Whether emitting `token` next would end the reply: an end-of-generation token, a stop
        string it completes, or the last token max_tokens allows."""
        return (token in self.eog or self.stats.n_generated + 1 >= self.config.max_tokens
                or (self.text is not None and self.text.would_stop(self.token_bytes(token))))

    def add_pending(self, token: int, proposer: Proposer) -> None:
        """Append a proposed token (shared ids)."""
        self.pending.append(token)
        self.proposed_by.append(proposer)

    def constrain_draft(self, row: np.ndarray, position: int, token_map=None) -> bool:
        """`constrain` for a proposer's row, unless the grammar only masks verified rows
        (`grammar_assist` "verify"); False also when nothing in this vocabulary is allowed there
        (a trimmed draft's): either way, stop drafting."""
        if self.grammar is None or self.config.grammar_assist == "verify":
            return True
        return self.constrain(row, position, token_map) and row.max() > -np.inf

    def constrain(self, row: np.ndarray, position: int, token_map=None) -> bool:
        """Mask `row` (logits for pending position `position`, in place; `token_map`: the row is
        in a draft's ids) with the grammar; False when that position is unreachable (a pending
        token before it is forbidden: the row will not be read)."""
        return self.grammar is None or self.grammar.mask_row(row, self.pending, position, token_map)


class Engine:
    """Decodes over n >= 1 model slots, keeping their KV caches across calls.

    Slot order is the user's: the draft (if any) first, then the target, then any further models;
    `--weights` and `--gamma` list values in that order.
    """

    def __init__(self, slots: list[ModelSlot], eog_ids):
        if not slots:
            raise ValueError("an engine needs at least one model")
        self.slots = slots
        self.index = {slot.name: i for i, slot in enumerate(slots)}
        self.n_ctx = min(slot.model.n_ctx for slot in slots)
        self.exact_batch = min(slot.model.exact_batch for slot in slots)
        self.target_index = self.index.get("target", 0)
        self.n_vocab = slots[self.target_index].model.n_vocab
        self._eog = set(int(t) for t in eog_ids)
        self._active: Conversation | None = None
        self._policies: dict[tuple, OnnxPolicy] = {}
        self._vocabulary: str | None = None

    def slot(self, name: str) -> ModelSlot | None:
        i = self.index.get(name)
        return None if i is None else self.slots[i]

    def new_conversation(self) -> Conversation:
        return Conversation()

    def reset(self) -> None:
        """Empty every cache."""
        if self._active is not None:
            raise EngineBusyError("cannot reset the engine while it is generating")
        for slot in self.slots:
            slot.reset()

    def mode_for(self, config: GenerationConfig, conversation: Conversation | None = None) -> Mode:
        """`config`'s mode on these slots, for one generation of `conversation`; raises ValueError
        for a mode these models cannot run."""
        mode = mode_class(config)(self, config, conversation or Conversation())
        mode.check_models()
        return mode

    def check(self, config: GenerationConfig) -> None:
        """Raise ValueError when these models cannot run `config`'s mode (before any decoding)."""
        self.mode_for(config)

    def cached_tokens(self) -> list[int]:
        """The tokens the target's KV cache holds from position 0 (for choosing among engines)."""
        slot = self.slots[self.target_index]
        return list(slot.history) if slot.offset == 0 else []

    # -- the loop ------------------------------------------------------------------------------------
    def stream(
        self,
        context_tokens: list[int],
        config: GenerationConfig,
        verifier: Verifier | None = None,
        conversation: Conversation | None = None,
        grammar: Grammar | None = None,
    ) -> Iterator[TokenEvent | DoneEvent]:
        """Generate after `context_tokens`, yielding a TokenEvent per token and a final DoneEvent.
        With a `grammar`, the reply follows the constrained target (see `grammar`).

        Bad input (empty prompt, a prompt that does not fit, a mode these models cannot run, an
        invalid grammar, the engine already generating) raises here, before the first event.
        """
        conversation = conversation or Conversation()
        mode = self.mode_for(config, conversation)
        if not context_tokens:
            raise ValueError("the prompt is empty: give at least one token")
        if len(context_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(context_tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten it, start a new chat or raise --ctx-size"
            )
        self._check_idle()
        state = None
        if grammar is not None:
            target = self.slots[self.target_index].model
            state = GrammarState(target.grammar_tokenizer(), grammar.compile(), self.n_vocab)
        conversation.cancelled = False  # a cancel from now on stops this generation
        return self._generate(list(context_tokens), mode, verifier or mode.verifier(), conversation, state)

    def vocabulary(self) -> str:
        """The target vocabulary's fingerprint (`arbiter.vocabulary_fingerprint`), computed once."""
        if self._vocabulary is None:
            model = self.slots[self.target_index].model
            self._vocabulary = vocabulary_fingerprint(model.n_vocab, model.token_bytes)
        return self._vocabulary

    def load_policy(self, path: str | None) -> OnnxPolicy:
        """The ONNX arbitration policy at `path`, loaded once (again when the file changes). A
        policy that reads token identities must match these models' vocabulary (else PolicyError).
        Default: the shipped policy, or, for models with another vocabulary than the one it was
        trained with, the shipped model-agnostic one."""
        resolved = Path(path or DEFAULT_POLICY).expanduser().resolve()
        key = (str(resolved), resolved.stat().st_mtime_ns if resolved.is_file() else None)
        if key not in self._policies:
            self._policies[key] = OnnxPolicy(resolved)
        policy = self._policies[key]
        if self._fits(policy):
            return policy
        if path is None:
            return self.load_policy(str(GENERIC_POLICY))
        policy.check_vocabulary(self.vocabulary())  # raises, saying why
        return policy

    def _fits(self, policy: OnnxPolicy) -> bool:
        """Whether `policy` can read these models' tokens (a model-agnostic one always can)."""
        if policy.vocabulary is None:
            return True
        # Another vocabulary size needs no hashing to tell.
        return policy.vocabulary.split(":")[0] == str(self.n_vocab) and policy.vocabulary == self.vocabulary()

    def _check_idle(self) -> None:
        if self._active is not None:
            raise EngineBusyError(
                "these models are already generating (one stream at a time per engine): finish or close "
                "the other stream first, or load another engine for parallel conversations"
            )

    def _generate(self, context_tokens, mode: Mode, verifier: Verifier, conv: Conversation,
                  grammar: GrammarState | None = None) -> Iterator[TokenEvent | DoneEvent]:
        self._check_idle()  # another stream may have started between stream() and the first next()
        config = mode.config
        seed = config.sampling.seed
        gen = Generation(context_tokens, config, np.random.default_rng(seed) if seed is not None else conv.rng,
                         GenerationStats(n_prompt=len(context_tokens)))
        gen.grammar = grammar
        text = TextStream(config.stop)
        gen.text, gen.eog, gen.token_bytes = text, self._eog, self.slots[self.target_index].model.token_bytes
        start = getattr(verifier, "start", None)  # a verifier with per-reply state (the arbiter)
        if start is not None:
            start()
        mode.start()
        finish = "length"
        # Claim the engine only now: whatever failed above left it free.
        self._active = conv
        conv.context = gen.context
        llama0 = sum(slot.model.decode_seconds for slot in self.slots)
        copies0 = sum(slot.model.state_copy_seconds for slot in self.slots)
        try:
            self._prefill(gen, mode, conv)
            t_decode0 = time.perf_counter()
            while gen.stats.n_generated < config.max_tokens:
                if conv.cancelled:
                    finish = "cancelled"
                    break
                # Tokens a scoring batch may hold: the exact batch size, the context left, and no
                # more pending tokens than the reply can still emit. A held bonus (greedy cospec)
                # is pending but takes the place of the last committed token in the target's
                # batch (the target has read the whole context), so the batch holds one more.
                held = int(bool(gen.pending) and gen.proposed_by[0] is mode.held_bonus)
                room = min(self.n_ctx - len(gen.context), self.exact_batch + held,
                           config.max_tokens - gen.stats.n_generated + 1)
                if room <= 0:
                    finish = "context"
                    break
                gen.limit = room - 1 if mode.has_bonus_row else room  # cospec needs no bonus slot
                yield from self._emit(gen, self._round(gen, mode, verifier), text)
                if gen.stopped:
                    finish = "stop"
                    break
            tail = text.flush() if not text.stopped else ""
            if tail:
                yield TokenEvent(-1, tail, SAMPLED, "")
            gen.stats.t_decode = time.perf_counter() - t_decode0
        finally:
            self._finish(gen, mode, conv, finish, llama0, copies0)
        yield DoneEvent(finish, gen.stats)

    def _prefill(self, gen: Generation, mode: Mode, conv: Conversation) -> None:
        """Reuse each cache's longest prefix of the context, then prefill the rest (no logits)."""
        slots, context, stats = self.slots, gen.context, gen.stats
        t_start = time.perf_counter()
        for slot in slots:
            slot.seconds, slot.calls = 0.0, 0
        reused = {}
        for i in mode.active:
            slots[i].prepare(context)
            if not mode.prefills_lazily(i):
                slots[i].full_context()
            reused[i] = slots[i].synced if slots[i].offset == 0 else 0
        stats.n_prompt_cached = reused.get(self.target_index, reused[mode.active[0]])
        for i in mode.active:
            if not mode.prefills_lazily(i):
                # In pieces, so that a cancel (a server's client gone) stops a long prefill.
                while slots[i].synced < len(context) - 1 and not conv.cancelled:
                    slots[i].prefill(context[: slots[i].synced + PREFILL_PIECE + 1])
        stats.t_prefill = time.perf_counter() - t_start
        for slot in slots:
            slot.seconds = 0.0

    def _emit(self, gen: Generation, emitted, text: TextStream) -> Iterator[TokenEvent]:
        """Commit a round's tokens to the context, up to an end-of-generation token, a stop string
        or max_tokens (`gen.stopped` says which ended the reply)."""
        token_bytes = self.slots[self.target_index].model.token_bytes
        for token, kind, maker, logprob in emitted:
            if token in self._eog:
                gen.stopped = True
                return
            gen.context.append(token)
            if gen.grammar is not None:
                gen.grammar.commit([token])
            gen.stats.n_generated += 1
            yield TokenEvent(token, text.push(token_bytes(token)), kind, maker, logprob)
            if text.stopped:
                gen.stopped = True
                return
            if gen.stats.n_generated >= gen.config.max_tokens:
                return

    def _finish(self, gen: Generation, mode: Mode, conv: Conversation, finish: str, llama0: float, copies0: float) -> None:
        """Rewind: whatever was evaluated beyond the committed context goes (rows are per round),
        the statistics are completed, and the engine is free again, whatever failed."""
        stats = gen.stats
        try:
            for slot in self.slots:
                slot.clear_rows()
            for i in mode.active:
                try:
                    self.slots[i].rollback(len(gen.context))
                except Exception:
                    self.slots[i].reset()  # a memory that cannot roll back starts over
                    raise
            if not stats.t_decode:
                stats.t_decode = time.perf_counter() - gen.started - stats.t_prefill
            for slot in self.slots:
                if slot.calls:
                    stats.model_calls[slot.name] = slot.calls
                    stats.t_models[slot.name] = slot.seconds
            stats.t_llama = sum(slot.model.decode_seconds for slot in self.slots) - llama0
            stats.t_state_copies = sum(slot.model.state_copy_seconds for slot in self.slots) - copies0
            if gen.grammar is not None:
                stats.t_grammar = gen.grammar.seconds
            stats.finish_reason = finish
            conv.last_stats = stats
            if conv.ngram_pool is not None:
                conv.ngram_pool.add(gen.context)
        finally:
            self._active = None  # never leave the engine busy, whatever failed above

    def _round(self, gen: Generation, mode: Mode, verifier: Verifier) -> list[tuple]:
        """Turns until a verification emits tokens; returns [(token, kind, producer name, TokenLogprob
        or None)]."""
        gen.round_started = time.perf_counter()
        if gen.grammar is not None and not gen.pending and gen.config.grammar_assist == "forced":
            forced = gen.grammar.forced(max(gen.limit, 1))
            if forced:  # the constrained target is one-hot there: no model needs to decide
                for i in mode.active:
                    self.slots[i].clear_rows()  # rows for the position the forced token now fills
                gen.stats.n_forced += len(forced)
                # The constrained target gives such a token probability 1.
                certain = gen.config.logprobs is not None
                return [(token, FORCED, "grammar", TokenLogprob(0.0, [(token, 0.0)]) if certain else None)
                        for token in forced]
        while True:
            bundle = self._bundle(gen, mode)
            if bundle is None:  # 1. draft, or 2. score: one model call
                mode.take_turn(gen)
                continue
            verdict = verifier.verify(bundle, gen.rng)  # 3. verify
            emitted = self._apply(gen, mode, bundle, verdict)  # 4. apply (and rewind after a rejection)
            mode.observe(gen, len(bundle.tokens), verdict.num_accepted, len(emitted))  # 5. adapt
            return emitted

    def _bundle(self, gen: Generation, mode: Mode) -> RowBundle | None:
        """The bundle of every position all members have scored, or None."""
        slots = self.slots
        n_positions = min(len(slots[i].rows) for i in mode.combination.members)
        if n_positions == 0 or not mode.ready(gen):
            return None
        t = min(n_positions, len(gen.pending))
        if gen.grammar is not None:
            self._constrain_rows(gen, mode, n_positions)
        return RowBundle(slots, mode.combination, gen.config.sampling, gen.pending[:t], gen.proposed_by[:t],
                         n_positions, self.n_vocab, gen.context[-1], gen.stats.n_generated)

    def _constrain_rows(self, gen: Generation, mode: Mode, n_positions: int) -> None:
        """Every verified row follows the constrained target: mask the rows r is made of, up to
        the first position a forbidden pending token makes unreachable (never read)."""
        members = getattr(mode.combination, "constrained", mode.combination.members)
        for j in range(n_positions):
            for i in members:
                slot = self.slots[i]
                if not gen.constrain(slot.rows[j], j, slot.token_map):
                    return

    def _apply(self, gen: Generation, mode: Mode, bundle: RowBundle, verdict: Verdict) -> list[tuple]:
        """Check the verdict, update queues and caches, and return the tokens to emit."""
        t = len(bundle.tokens)
        m = verdict.num_accepted
        self._check_verdict(bundle, verdict)
        stats, pending, proposed_by = gen.stats, gen.pending, gen.proposed_by
        emitted = [(pending[j], verdict.accepted_kinds[j], proposed_by[j].name, None) for j in range(m)]
        held = int(bool(t) and proposed_by[0] is mode.held_bonus)
        stats.count_verification(t - held, verdict, held)
        if verdict.next_token is not None and verdict.next_kind == BONUS and mode.holds_bonus and gen.grammar is None:
            # greedy cospec: the bonus token waits, pending, until the draft has read it (its
            # target row stays queued as row 0). Not under a grammar: the draft's row there is
            # not masked, so its choice could be one the grammar forbids.
            for slot in self.slots:
                slot.pop_rows(m)
            del pending[:m], proposed_by[:m]
            gen.add_pending(verdict.next_token, mode.held_bonus)
            return self._with_logprobs(gen, bundle, emitted)
        n_committed = len(gen.context)
        if verdict.next_token is not None:
            members = mode.combination.members
            maker = self.slots[members[0]].name if len(members) == 1 else COMBINED
            if verdict.next_kind == ARBITRATED:  # cospec kept the draft's token over a held bonus
                maker = bundle.slots[bundle.proposers[m].draft_index].name
            emitted.append((verdict.next_token, verdict.next_kind, maker, None))
        emitted = self._with_logprobs(gen, bundle, emitted)
        if m < t:  # a rejection: everything after the correction is stale
            for i in mode.active:
                self.slots[i].clear_rows()
                self.slots[i].rollback(n_committed + m)
            del pending[:], proposed_by[:]
        else:
            n_done = m + (verdict.next_token is not None)
            for slot in self.slots:
                slot.pop_rows(n_done)
            del pending[:n_done], proposed_by[:n_done]
        return emitted

    @staticmethod
    def _with_logprobs(gen: Generation, bundle: RowBundle, emitted: list[tuple]) -> list[tuple]:
        """With `config.logprobs`: r at each emitted position (verification computed most of them)."""
        n_top = gen.config.logprobs
        if n_top is None:
            return emitted
        return [(token, kind, maker, TokenLogprob.from_probs(bundle.combined(j), token, n_top))
                for j, (token, kind, maker, _) in enumerate(emitted)]

    def _check_verdict(self, bundle: RowBundle, verdict: Verdict) -> None:
        """A verifier is pluggable: refuse a verdict that does not fit its bundle."""
        t, m = len(bundle.tokens), verdict.num_accepted
        if not 0 <= m <= t:
            raise RuntimeError(f"verifier accepted {m} of {t} proposed tokens")
        if len(verdict.accepted_kinds) != m or not all(kind in KEPT_KINDS for kind in verdict.accepted_kinds):
            raise RuntimeError("verifier must give one provenance (accepted, arbitrated or a held bonus) per accepted token")
        wants_next = m < t or bundle.has_bonus_row
        if (verdict.next_token is None) == wants_next:
            raise RuntimeError(
                f"verifier {'must' if wants_next else 'cannot'} give a next token "
                f"({m} of {t} accepted, bonus row {'present' if bundle.has_bonus_row else 'absent'})"
            )
        if verdict.next_token is not None and not 0 <= verdict.next_token < self.n_vocab:
            raise RuntimeError(f"verifier chose token {verdict.next_token} outside the vocabulary")
