"""The decoding loop over n model slots: propose, score, verify.

Terms (see also `verify` and `slots`): the *context* is a conversation's committed token list, in
shared (target) ids. The *pending* tokens are proposed tokens after the context, not yet verified.
Each slot queues the logits rows it has computed for the pending positions. A mode (`Plan`) says
which slots are *members* (their rows make r, the distribution the output follows, through a
`combine.Combination`), which slot proposes by default and how many tokens (gamma), and whether a
scoring call extends the proposal with its own sample (CoS).

One round, repeated until it emits tokens:
  1. verify: when every member has a row for position 0, the verifier gets ONE `RowBundle` (every
     slot's rows, the proposed tokens that all members have scored) and returns a `Verdict`: how
     many proposed tokens to keep and the next token; the engine checks it, emits, and drops what
     the verdict made stale (rows and cache entries after a rejection);
  2. otherwise a *turn*: a proposer drafts tokens one call at a time (`_propose`), or the member
     with the fewest rows scores every pending token in one batch (`_score_turn`), its last row
     being the bonus row, and in CoS mode samples one more token from it.

The modes, in these terms:
  target / draft   one member, no proposer: each round scores one row and samples from it;
  spec             member: target; the draft proposes k tokens (adaptive); r = the target's p;
  collab           all models are members, no proposer: every model scores every token (reference);
  cos-naive        all members; the first slot (the draft) proposes gamma tokens; r verifies them;
  cos              all members; the model with the largest gamma proposes first; every scoring call
                   appends its own sample (the bonus) to the proposal; when everything before it
                   is accepted, its owner drafts up to its gamma (two models: the Alternate
                   Proposal Framework; n models: the paper's queue scheme);
  cospec           member: target; the draft proposes every token (no bonus row), k + 1 per
                   verification (fewer when its confidence drops); at a mismatch a learned policy
                   may keep the draft's token (`arbiter.ArbitratingVerifier`).

Per-conversation state (`Conversation`) holds the context, the RNG and the draft-length policies; the
engine holds the slots and runs one conversation at a time. A slot's cache may run ahead of the
committed context (pending tokens, or accepted tokens not yet emitted); a consumer that stops early
leaves the engine ready for the next call: `finally` drops the rows and trims caches to the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .arbiter import DEFAULT_POLICY, ArbitratingVerifier, OnnxPolicy
from .combine import Combination, Contrastive, Single, WeightedEnsemble
from .config import GenerationConfig
from .draft_length import CATCH_UP_WINDOW, AdaptiveDraftLength
from .ngram import NGRAM, NgramIndex
from .errors import ContextOverflowError, EngineBusyError
from .sampling import logits_to_probs, sample
from .slots import ModelSlot
from .text import TextStream
from .verify import PROPOSED_KINDS, SAMPLED, RowBundle, Verdict, Verifier, default_verifier

PREFILL_PIECE = 256  # prompt tokens evaluated between two looks at Conversation.cancelled
COMBINED = "combined"  # the producing "slot" of a token drawn from r over several models
NGRAM_NAME = "ngram"  # the producing "slot" of a proposed token that came from the n-gram lookup


@dataclass
class TokenEvent:
    """One emitted token. `text` is the text it adds (may be empty while a UTF-8 character or a
    possible stop string is incomplete); `source` says how it was produced (`verify.ACCEPTED`,
    CORRECTION, BONUS, SAMPLED, ARBITRATED) and `slot` which model produced it ('draft', 'target',
    'model1', ... or 'combined' for a draw from r over several models)."""

    token: int
    text: str
    source: str
    slot: str = ""

    @property
    def proposed(self) -> bool:
        """True for a token a proposer wrote and the verifier kept."""
        return self.source in PROPOSED_KINDS


@dataclass
class GenerationStats:
    """Counts and timings of one generate/stream call (seconds)."""

    n_prompt: int = 0
    n_prompt_cached: int = 0  # prompt tokens whose KV entries were reused (the target's, when it runs)
    n_generated: int = 0
    n_cycles: int = 0  # verification rounds with at least one proposed token
    n_target_steps: int = 0  # rounds with nothing proposed (plain steps)
    n_drafted: int = 0  # proposed tokens that were verified
    n_accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # per cycle: proposed tokens accepted
    draft_lengths: list[int] = field(default_factory=list)  # per cycle: proposed tokens verified
    model_calls: dict[str, int] = field(default_factory=dict)  # llama.cpp calls with logits, per slot
    t_models: dict[str, float] = field(default_factory=dict)  # seconds in llama.cpp, per slot
    n_mismatches: int = 0  # proposed tokens verification rejected (before any arbiter)
    n_overrides: int = 0  # cospec: of those, proposed tokens the arbiter kept
    t_prefill: float = 0.0
    t_decode: float = 0.0
    t_arbiter: float = 0.0  # cospec: computing features and scoring the policy (inside t_overhead)
    t_llama: float = 0.0  # seconds inside llama_decode (prefill and decode, every model)
    finish_reason: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of proposed tokens accepted per verification cycle."""
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prompt prefill excluded)."""
        return self.n_generated / self.t_decode if self.t_decode > 0 else 0.0

    @property
    def t_draft(self) -> float:
        return self.t_models.get("draft", 0.0)

    @property
    def t_target(self) -> float:
        return self.t_models.get("target", 0.0)

    @property
    def total_model_calls(self) -> int:
        return sum(self.model_calls.values())

    @property
    def model_calls_per_token(self) -> float:
        """llama.cpp calls (any model) per generated token: the machine-independent cost."""
        return self.total_model_calls / self.n_generated if self.n_generated else 0.0

    @property
    def outside_llama_per_token(self) -> float:
        """Seconds per generated token spent outside llama_decode (Python, numpy, ctypes), prefill
        and decode together: the loop's own cost."""
        wall = self.t_prefill + self.t_decode
        return max(wall - self.t_llama, 0.0) / self.n_generated if self.n_generated else 0.0

    @property
    def t_overhead(self) -> float:
        """Decode time spent outside llama.cpp calls: Python work, sampling, bookkeeping."""
        return max(self.t_decode - sum(self.t_models.values()), 0.0)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("accepted_lengths", "draft_lengths")}
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            tokens_per_second=self.tokens_per_second,
            t_draft=self.t_draft,
            t_target=self.t_target,
            total_model_calls=self.total_model_calls,
            model_calls_per_token=self.model_calls_per_token,
            t_overhead=self.t_overhead,
            overhead_share=self.t_overhead / self.t_decode if self.t_decode else 0.0,
            outside_llama_per_token=self.outside_llama_per_token,
            accepted_lengths=list(self.accepted_lengths),
            draft_lengths=list(self.draft_lengths),
        )
        return d


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
        self.draft_length = AdaptiveDraftLength()  # learned costs carry over between calls
        # The same for n-gram proposals: own acceptance, restarted per generation (whether the
        # output repeats its context depends on the prompt), probing more often (proposals are free)
        # and with a longer memory (one rejected run of free proposals is no reason to stop).
        self.ngram_length = AdaptiveDraftLength(probe_growth=2, cycle_decay=0.95, full_length=True)
        self.ngram_index = NgramIndex()  # follows the context
        self.rng = np.random.default_rng()
        self.last_stats: GenerationStats | None = None
        # Set from any thread to stop the running generation at the next prefill piece or round
        # (it then ends with finish reason "cancelled"); cleared by `Engine.stream`.
        self.cancelled = False

    def cancel(self) -> None:
        """Stop this conversation's running generation soon (safe from another thread)."""
        self.cancelled = True


@dataclass
class Plan:
    """How a mode uses the slots (see the module docstring)."""

    mode: str
    combination: Combination
    active: tuple[int, ...]  # slots taking part: members and proposer
    proposer: int | None = None  # the default proposer
    gammas: tuple[int, ...] = ()  # proposal length per slot (CoS)
    extend_with_bonus: bool = False  # cos: a scoring call appends its own sample
    # spec/cospec: the draft's length comes from the draft-length policy, drafting stops when its
    # confidence drops, and it may restart on a recent window instead of catching up.
    speculative: bool = False
    # cospec: members score only the proposed positions (no bonus row), so the draft writes every
    # token and the arbiter can weigh in at each one.
    bonus_row: bool = True
    # spec: propose from an n-gram lookup of the context ("ngram"), before the draft model
    # ("ngram+model"), or not ("model").
    draft_source: str = "model"

    @property
    def uses_ngram(self) -> bool:
        return self.draft_source != "model"

    @property
    def windowed_proposer(self) -> bool:
        """spec only: the draft may skip its prefill and restart on a recent window, since its
        tokens are only proposals the target checks exactly. In cospec its tokens may be kept, so
        it must always read the whole context."""
        return self.speculative and self.bonus_row


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

    def check(self, config: GenerationConfig) -> None:
        """Raise ValueError when these models cannot run `config`'s mode (before any decoding)."""
        self.plan(config)

    def cached_tokens(self) -> list[int]:
        """The tokens the target's KV cache holds from position 0 (for choosing among engines)."""
        slot = self.slots[self.target_index]
        return list(slot.history) if slot.offset == 0 else []

    # -- planning ----------------------------------------------------------------------------------
    def plan(self, config: GenerationConfig) -> Plan:
        """The slots a mode uses and how; raises ValueError for a mode these models cannot run."""
        mode = config.mode
        draft, target = self.index.get("draft"), self.target_index
        if mode == "target":
            return Plan(mode, Single(target), (target,))
        if mode == "spec" and config.draft_source == "ngram":
            return Plan(mode, Single(target), (target,), None, speculative=True, draft_source="ngram")
        if mode in ("draft", "spec") and draft is None:
            raise ValueError(f"mode {mode!r} needs a draft model" + (" (or --draft-source ngram)" if mode == "spec" else ""))
        if mode == "draft":
            return Plan(mode, Single(draft), (draft,))
        if mode == "spec":
            return Plan(mode, Single(target), (draft, target), draft, speculative=True, draft_source=config.draft_source)
        if mode == "cospec":
            return Plan(mode, Single(target), (draft, target), draft, speculative=True, bonus_row=False)
        n = len(self.slots)
        if n < 2:
            raise ValueError(f"mode {mode!r} combines several models: give a --draft (and --model ...)")
        members = tuple(range(n))
        if config.combine == "cd":
            if n != 2:
                raise ValueError("contrastive decoding (--combine cd) combines exactly two models, the draft and the target")
            combination: Combination = Contrastive(expert=target, amateur=1 - target, mu=config.mu)
        else:
            combination = WeightedEnsemble(members, config.weights)
        # Default proposal lengths: the draft's leaves room in the exact-size batch for every other
        # model's bonus token (cos), the others propose one token each (the paper's setting).
        gammas = config.gamma or tuple(max(1, config.draft_max + 1 - n) if i == 0 else 1 for i in range(n))
        if len(gammas) != n:
            raise ValueError(f"--gamma has {len(gammas)} values for {n} models (order: draft, target, --model ...)")
        if mode == "collab":
            return Plan(mode, combination, members)
        if mode == "cos-naive":
            return Plan(mode, combination, members, 0, gammas)
        # cos: the model with the largest gamma proposes first (ties: the first, i.e. the draft).
        return Plan(mode, combination, members, int(np.argmax(gammas)), gammas, extend_with_bonus=True)

    # -- the loop ------------------------------------------------------------------------------------
    def stream(
        self,
        context_tokens: list[int],
        config: GenerationConfig,
        verifier: Verifier | None = None,
        conversation: Conversation | None = None,
    ) -> Iterator[TokenEvent | DoneEvent]:
        """Generate after `context_tokens`, yielding a TokenEvent per token and a final DoneEvent.

        Bad input (empty prompt, a prompt that does not fit, a mode these models cannot run, the
        engine already generating) raises here, before the first event.
        """
        plan = self.plan(config)
        if not context_tokens:
            raise ValueError("the prompt is empty: give at least one token")
        if len(context_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(context_tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten it, start a new chat or raise --ctx-size"
            )
        self._check_idle()
        conversation = conversation or Conversation()
        conversation.cancelled = False  # a cancel from now on stops this generation
        if verifier is None:
            if plan.mode == "cospec":
                verifier = ArbitratingVerifier(self.load_policy(config.policy), config.threshold)
            else:
                verifier = default_verifier(config.sampling)
        return self._generate(list(context_tokens), config, plan, verifier, conversation)

    def load_policy(self, path: str | None) -> OnnxPolicy:
        """The ONNX arbitration policy at `path` (default: the shipped one), loaded once (again
        when the file changes)."""
        resolved = Path(path or DEFAULT_POLICY).expanduser().resolve()
        key = (str(resolved), resolved.stat().st_mtime_ns if resolved.is_file() else None)
        if key not in self._policies:
            self._policies[key] = OnnxPolicy(resolved)
        return self._policies[key]

    def _check_idle(self) -> None:
        if self._active is not None:
            raise EngineBusyError(
                "these models are already generating (one stream at a time per engine): finish or close "
                "the other stream first, or load another engine for parallel conversations"
            )

    def _generate(self, context_tokens, config, plan, verifier, conv) -> Iterator[TokenEvent | DoneEvent]:
        self._check_idle()  # another stream may have started between stream() and the first next()
        slots = self.slots
        params = config.sampling
        rng = np.random.default_rng(params.seed) if params.seed is not None else conv.rng
        stats = GenerationStats(n_prompt=len(context_tokens))
        text = TextStream(config.stop)
        eog = self._eog
        # spec's draft-length policy (cospec always fills its batch: it has none).
        policy = conv.draft_length if plan.speculative and plan.bonus_row and config.adaptive else None
        start = getattr(verifier, "start", None)  # a verifier with per-reply state (the arbiter)
        if start is not None:
            start()
        finish = "length"
        if plan.uses_ngram:
            conv.ngram_length.new_input()
        # Claim the engine only now: whatever failed above left it free.
        self._active = conv
        conv.context = context = context_tokens
        t_start = time.perf_counter()
        try:
            # 1. Reuse each cache's longest prefix of the context, then prefill the rest (no logits).
            for slot in slots:
                slot.seconds, slot.calls = 0.0, 0
            llama0 = sum(slot.model.decode_seconds for slot in slots)
            lazy = plan.proposer if plan.windowed_proposer and policy is not None and policy.drafting_loses else None
            reused = {}
            for i in plan.active:
                slots[i].prepare(context)
                if i != lazy:  # spec's draft prefills lazily when measurements say it does not pay
                    slots[i].full_context()
                reused[i] = slots[i].synced if slots[i].offset == 0 else 0
            stats.n_prompt_cached = reused.get(self.target_index, reused[plan.active[0]])
            t0 = time.perf_counter()
            for i in plan.active:
                if i != lazy:
                    # In pieces, so that a cancel (a server's client gone) stops a long prefill.
                    while slots[i].synced < len(context) - 1 and not conv.cancelled:
                        slots[i].prefill(context[: slots[i].synced + PREFILL_PIECE + 1])
            stats.t_prefill = time.perf_counter() - t0
            for slot in slots:
                slot.seconds = 0.0
            t_decode0 = time.perf_counter()

            # 2. Rounds until a limit.
            pending: list[int] = []  # proposed tokens after the context
            proposers: list[int] = []  # slot index per pending token
            token_bytes = slots[self.target_index].model.token_bytes
            while stats.n_generated < config.max_tokens:
                if conv.cancelled:
                    finish = "cancelled"
                    break
                # Tokens a scoring batch may hold: the exact batch size, the context left, and no
                # more pending tokens than the reply can still emit.
                room = min(self.n_ctx - len(context), self.exact_batch, config.max_tokens - stats.n_generated + 1)
                if room <= 0:
                    finish = "context"
                    break
                emitted = self._round(context, pending, proposers, room, config, plan, verifier, policy, rng, stats, conv)
                for token, kind, slot_name in emitted:
                    if token in eog:
                        finish = "stop"
                        break
                    context.append(token)
                    stats.n_generated += 1
                    piece = text.push(token_bytes(token))
                    yield TokenEvent(token, piece, kind, slot_name)
                    if text.stopped:
                        finish = "stop"
                        break
                    if stats.n_generated >= config.max_tokens:
                        break
                if finish == "stop":
                    break
            tail = text.flush() if not text.stopped else ""
            if tail:
                yield TokenEvent(-1, tail, SAMPLED, "")
            stats.t_decode = time.perf_counter() - t_decode0
        finally:
            try:
                # Whatever was evaluated beyond the committed context goes; rows are per round.
                for slot in slots:
                    slot.clear_rows()
                for i in plan.active:
                    try:
                        slots[i].rollback(len(context))
                    except Exception:
                        slots[i].reset()  # a memory that cannot roll back starts over
                        raise
                if not stats.t_decode:
                    stats.t_decode = time.perf_counter() - t_start - stats.t_prefill
                for slot in slots:
                    if slot.calls:
                        stats.model_calls[slot.name] = slot.calls
                        stats.t_models[slot.name] = slot.seconds
                stats.t_llama = sum(slot.model.decode_seconds for slot in slots) - llama0
                stats.finish_reason = finish
                conv.last_stats = stats
            finally:
                self._active = None  # never leave the engine busy, whatever failed above
        yield DoneEvent(finish, stats)

    def _round(self, context, pending, proposers, room, config, plan, verifier, policy, rng, stats, conv):
        """Turns until a verification emits tokens; returns [(token, kind, slot name)]."""
        t_round = time.perf_counter()
        k = None  # spec: tokens the draft was asked for this round
        # The draft-length policy of this round's proposals: the n-gram one learns separately.
        cycle_policy = policy
        ngram_policy = conv.ngram_length if policy is not None and plan.uses_ngram else None
        while True:
            bundle = self._bundle(context, pending, proposers, plan, config)
            if bundle is not None:
                verdict = verifier.verify(bundle, rng)
                n_verified = len(bundle.tokens)
                emitted = self._apply(bundle, verdict, context, pending, proposers, plan, stats)
                if cycle_policy is not None:
                    if n_verified:
                        cycle_policy.observe_acceptance(n_verified, verdict.num_accepted)
                    if plan.bonus_row:  # spec's drafting-vs-target-steps comparison
                        seconds = time.perf_counter() - t_round
                        cycle_policy.observe_cycle(k or 0, seconds, len(emitted))
                        if not k and ngram_policy is not None and cycle_policy is not ngram_policy:
                            ngram_policy.observe_cycle(0, seconds, len(emitted))  # target steps: both learn
                return emitted
            # Most pending tokens: scoring batches stay within `room` (cospec needs no bonus slot).
            limit = room - 1 if plan.bonus_row else room
            if not pending and plan.uses_ngram and limit > 0:
                cap = min(config.draft_max, limit)
                n = cap if ngram_policy is None else ngram_policy.choose(cap)
                found = conv.ngram_index.propose(context, n)
                if found:
                    k = len(found)
                    cycle_policy = ngram_policy
                    pending.extend(found)
                    proposers.extend([NGRAM] * k)
                    continue
            if not pending and plan.proposer is not None:
                proposer = self._first_proposer(plan)
                if plan.speculative:
                    # spec's batch holds k drafted tokens and the bonus row. cospec's has no bonus
                    # row, so its draft fills the same batch with k + 1 tokens, always: a cycle
                    # then covers as many positions per target call as spec's longest, and
                    # overrides lengthen accepted runs, so cospec makes no more target calls per
                    # token than spec (fewer in every run measured). Shorter runs can be a little
                    # faster (add: 4 tokens, 2-6%) at more target calls than spec: that is -k's call.
                    cap = min(config.draft_max + (0 if plan.bonus_row else 1), limit)
                    if policy is None:
                        n = cap
                    else:  # spec: k = 0 is a plain target step
                        n = k = policy.choose(cap)
                else:
                    n = plan.gammas[proposer]
                if n > 0 and limit > 0:
                    self._propose(proposer, n, context, pending, proposers, limit, config, plan, policy, rng)
                    continue
            elif pending and plan.extend_with_bonus:
                owner = proposers[0]
                n_more = min(plan.gammas[owner], limit) - len(pending)
                if n_more > 0 and all(p == owner for p in proposers) and len(self.slots[owner].rows) == len(pending):
                    self._propose(owner, n_more, context, pending, proposers, limit, config, plan, policy, rng)
                    continue
            self._score_turn(context, pending, proposers, limit, config, plan, policy, rng, ngram_policy)

    def _first_proposer(self, plan: Plan) -> int:
        """With nothing pending: in CoS, the model whose row for the next position is already
        queued proposes (the roles swap after a fully accepted proposal); else the default one."""
        if plan.extend_with_bonus:
            for i in plan.active:
                if self.slots[i].rows:
                    return i
        return plan.proposer

    def _propose(self, i, n, context, pending, proposers, limit, config, plan, policy, rng) -> None:
        """Slot i drafts up to n tokens, one call each (its first row may already be queued)."""
        slot = self.slots[i]
        params = config.sampling
        t0 = time.perf_counter()
        calls0 = slot.calls
        if plan.windowed_proposer and not pending and len(context) - slot.synced > CATCH_UP_WINDOW:
            slot.rebase(context, CATCH_UP_WINDOW)
        n = min(n, limit - len(pending))
        for step in range(n):
            position = len(pending)
            if len(slot.rows) <= position:
                slot.score(context, pending)
            # spec: stop drafting when the draft's confidence drops (moot for the last token).
            p_min = config.draft_p_min if plan.speculative and step < n - 1 else 0.0
            token, top_prob = self._draw(slot, position, params, rng, p_min)
            pending.append(token)
            proposers.append(i)
            if top_prob < p_min:
                break
        if policy is not None and slot.calls > calls0:
            policy.observe_draft_step((time.perf_counter() - t0) / (slot.calls - calls0))

    @staticmethod
    def _draw(slot: ModelSlot, position: int, params, rng, p_min: float) -> tuple[int, float]:
        """The slot's own choice at `position` (argmax, or a sample from its processed row, which
        is kept as its proposal distribution) and the row's top probability (1.0 when unneeded)."""
        row = slot.rows[position]
        if params.greedy:
            model_id = int(np.argmax(row))
            # Softmax of the top logit; only needed for the draft's confidence cut-off.
            top_prob = 1.0 / float(np.exp(row - row[model_id]).sum()) if p_min > 0 else 1.0
            return slot.to_shared(model_id), top_prob
        probs = logits_to_probs(row, params)
        model_id = sample(probs, rng)
        slot.probs[position] = probs if slot.token_map is None else slot.token_map.row(probs)
        return slot.to_shared(model_id), float(probs.max())

    def _score_turn(self, context, pending, proposers, limit, config, plan, policy, rng, ngram_policy=None) -> None:
        """The member with the fewest rows scores every pending token in one batch (plus the bonus
        row after them, except in cospec); in CoS it then proposes its own sample for that row."""
        members = plan.combination.members
        i = min(members, key=lambda m: len(self.slots[m].rows))
        slot = self.slots[i]
        t0 = time.perf_counter()
        rows = slot.score(context, pending, None if plan.bonus_row else len(pending))
        if policy is not None and rows:
            seconds = time.perf_counter() - t0
            policy.observe_target(len(rows), seconds)
            if ngram_policy is not None:  # the same target: both policies learn its costs
                ngram_policy.observe_target(len(rows), seconds)
        if plan.extend_with_bonus and len(pending) < limit:
            token, _ = self._draw(slot, len(pending), config.sampling, rng, 0.0)
            pending.append(token)
            proposers.append(i)

    def _bundle(self, context, pending, proposers, plan, config) -> RowBundle | None:
        """The bundle of every position all members have scored, or None."""
        slots = self.slots
        n_positions = min(len(slots[i].rows) for i in plan.combination.members)
        if n_positions == 0:
            return None
        t = min(n_positions, len(pending))
        return RowBundle(slots, plan.combination, config.sampling, pending[:t], proposers[:t], n_positions, self.n_vocab)

    def _apply(self, bundle: RowBundle, verdict: Verdict, context, pending, proposers, plan, stats):
        """Check the verdict, update queues and caches, and return the tokens to emit."""
        t = len(bundle.tokens)
        m = verdict.num_accepted
        if not 0 <= m <= t:
            raise RuntimeError(f"verifier accepted {m} of {t} proposed tokens")
        if len(verdict.accepted_kinds) != m or not all(kind in PROPOSED_KINDS for kind in verdict.accepted_kinds):
            raise RuntimeError("verifier must give one provenance (accepted or arbitrated) per accepted token")
        wants_next = m < t or bundle.has_bonus_row
        if (verdict.next_token is None) == wants_next:
            raise RuntimeError(
                f"verifier {'must' if wants_next else 'cannot'} give a next token "
                f"({m} of {t} accepted, bonus row {'present' if bundle.has_bonus_row else 'absent'})"
            )
        if verdict.next_token is not None and not 0 <= verdict.next_token < self.n_vocab:
            raise RuntimeError(f"verifier chose token {verdict.next_token} outside the vocabulary")
        slots = self.slots
        emitted = [(pending[j], verdict.accepted_kinds[j], NGRAM_NAME if proposers[j] == NGRAM else slots[proposers[j]].name)
                   for j in range(m)]
        stats.n_mismatches += verdict.mismatches
        stats.n_overrides += verdict.overrides
        stats.t_arbiter += verdict.seconds
        if t:
            stats.n_cycles += 1
            stats.n_drafted += t
            stats.n_accepted += m
            stats.accepted_lengths.append(m)
            stats.draft_lengths.append(t)
        else:
            stats.n_target_steps += 1
        n_committed = len(context)
        if verdict.next_token is not None:
            members = plan.combination.members
            maker = slots[members[0]].name if len(members) == 1 else COMBINED
            emitted.append((verdict.next_token, verdict.next_kind, maker))
        if m < t:  # a rejection: everything after the correction is stale
            for i in plan.active:
                slots[i].clear_rows()
                slots[i].rollback(n_committed + m)
            del pending[:], proposers[:]
        else:
            n_done = m + (verdict.next_token is not None)
            for slot in slots:
                slot.pop_rows(n_done)
            del pending[:n_done], proposers[:n_done]
        return emitted
