"""Proposers: who drafts the pending tokens. One small interface, one class per kind.

A proposer offers a proposal (`offer(generation, cap)`: how many tokens it would draft now, chosen
by its own draft-length policy, `length_policy`, which also observes how its cycles went), drafts
them after the generation's context and pending tokens (`propose(generation, n)`, appending with
`Generation.add_pending`), and gives, for each token it proposed, the distribution q_j it drew it
from (`proposal_probs(bundle, j)`), which the verifier needs for rejection sampling. `name` is the
provenance shown on emitted tokens (`TokenEvent.slot`). Spec mode runs its proposers as a chain
(`modes.Spec`); a new kind of proposer is one class here.

- `ModelProposer`: a model slot drafts one call per token, catching up first on whatever context
  its cache lacks (its first row may already be queued: in CoS a member's bonus row); q is its
  processed row.
- `MtpProposer`: the target's own multi-token-prediction layer (`backend.MtpHead`, Qwen3.5/3.6):
  one small call per token, no second model; q is its processed row.
- `GrammarProposer`: under a grammar, the canonical tokens of the bytes it forces next (a JSON
  schema's keys and punctuation); one-hot q, no model call.
- `HeldBonus`: not a drafter: in greedy cospec the target's bonus token waits as the first
  pending token of the next round, so the draft reads it before it is emitted.
- `NgramProposer`: prompt lookup over the context (`ngram.NgramIndex`), and optionally over
  earlier generations (`ngram.SharedNgramPool`); q is one-hot, the proposal costs no model call.
"""

from __future__ import annotations

import time

from .draft_length import CATCH_UP_WINDOW, AdaptiveDraftLength
from .ngram import NgramIndex, OneHotProposal, SharedNgramPool
from .sampling import draw


class Proposer:
    """Drafts tokens for the pending positions (see the module docstring)."""

    name = ""
    draws_from_model = False  # whether q is a model's distribution (CoSpec's features read it)
    length_policy: AdaptiveDraftLength | None = None  # chooses this proposer's k (None: fixed, k = the cap)

    def start(self) -> None:
        """A new generation begins."""

    def offer(self, generation, cap: int) -> int:
        """How many tokens this proposer would draft now, at most `cap` (0: none): the cap, or what
        its draft-length policy chooses (0 when plain target steps are faster)."""
        return cap if self.length_policy is None else self.length_policy.choose(cap)

    def propose(self, generation, n: int) -> int:
        """Append up to n proposed tokens to `generation`'s pending tokens; return how many."""
        raise NotImplementedError

    def proposal_probs(self, bundle, j: int):
        """q_j for the token this proposer proposed at position j of `bundle`."""
        raise NotImplementedError


class ModelProposer(Proposer):
    """A model slot drafting autoregressively, one llama.cpp call per token.

    `stops_when_unsure`: stop drafting when the draft's top probability falls below
    `config.draft_p_min` (spec, cospec). `windowed`: after a long stretch without drafting, restart
    the draft's cache on the last `CATCH_UP_WINDOW` tokens instead of catching up on everything
    (spec only: its tokens are only proposals the target checks exactly; in cospec they may be
    kept, so the draft must read the whole context). `length_policy` learns the draft's step time.
    """

    draws_from_model = True

    def __init__(self, index: int, slot, stops_when_unsure: bool = False, windowed: bool = False,
                 length_policy: AdaptiveDraftLength | None = None):
        self.index = index
        self.slot = slot
        self.name = slot.name
        self.stops_when_unsure = stops_when_unsure
        self.windowed = windowed
        self.length_policy = length_policy

    def propose(self, generation, n: int) -> int:
        slot, pending = self.slot, generation.pending
        t0 = time.perf_counter()
        calls0 = slot.calls
        if self.windowed and not pending and len(generation.context) - slot.synced > CATCH_UP_WINDOW:
            slot.rebase(generation.context, CATCH_UP_WINDOW)
        n = min(n, generation.limit - len(pending))
        n_before = len(pending)
        params = generation.config.sampling
        for step in range(n):
            position = len(pending)
            if len(slot.rows) <= position:
                slot.score(generation.context, pending)
            if not generation.constrain_draft(slot.rows[position], position, slot.token_map):
                break
            # Stop when the draft's confidence drops (moot for the last token).
            p_min = generation.config.draft_p_min if self.stops_when_unsure and step < n - 1 else 0.0
            token, top_prob = slot.draw(position, params, generation.rng, p_min)
            generation.add_pending(token, self)
            if top_prob < p_min:
                break
        if self.length_policy is not None and slot.calls > calls0:
            self.length_policy.observe_draft_step((time.perf_counter() - t0) / (slot.calls - calls0))
        return len(pending) - n_before

    def proposal_probs(self, bundle, j: int):
        return bundle.probs(self.index, j)


class MtpProposer(Proposer):
    """The target's MTP head drafting after the committed context, one call per token.

    The head follows the target's cache (`backend.mtp`), so it can draft exactly when the target
    has evaluated the whole context but its last token, which is where every spec cycle starts.
    Its calls and time are reported as the "mtp" model in the generation's statistics."""

    name = "mtp"
    draws_from_model = True

    def __init__(self, target_slot, length_policy: AdaptiveDraftLength | None = None):
        self.slot = target_slot
        self.head = None  # the target's MtpHead, made at the first generation that uses it
        self.length_policy = length_policy
        self._q: list = []  # q of each pending token it proposed (None when greedy)

    def start(self) -> None:
        if self.slot.model.mtp is None:
            self.slot.reset()  # the new head must follow the target's cache from position 0
        self.head = self.slot.model.enable_mtp()

    def propose(self, generation, n: int) -> int:
        context, pending = generation.context, generation.pending
        n = min(n, generation.limit - len(pending))
        start = len(context) - 1  # the last committed token's position
        if n <= 0 or pending or self.slot.offset or self.slot.model.n_past != start:
            return 0
        head, params, stats = self.head, generation.config.sampling, generation.stats
        t0, calls0 = time.perf_counter(), head.calls
        self._q = []
        row = head.first_step(context[-1], start)
        for step in range(n):
            if not generation.constrain_draft(row, step):
                break
            # Stop when the head's confidence drops (moot for the last token).
            p_min = generation.config.draft_p_min if step < n - 1 else 0.0
            token, top_prob, q = draw(row, params, generation.rng, p_min)
            generation.add_pending(token, self)
            self._q.append(q)
            if step == n - 1 or top_prob < p_min:
                break
            row = head.next_step(token, start + step + 1)
        seconds, calls = time.perf_counter() - t0, head.calls - calls0
        stats.model_calls[self.name] = stats.model_calls.get(self.name, 0) + calls
        stats.t_models[self.name] = stats.t_models.get(self.name, 0.0) + seconds
        if self.length_policy is not None and calls:
            self.length_policy.observe_draft_step(seconds / calls)
        return len(self._q)

    def proposal_probs(self, bundle, j: int):
        return self._q[j]


class GrammarProposer(Proposer):
    """The bytes the grammar forces after the committed reply, in the tokenizer's canonical tokens.

    Where exactly one token is allowed the engine emits it without verification; forced bytes
    that several tokenizations could spell are proposed here instead, and verified like an n-gram
    match (the constrained target may prefer another spelling). Offers nothing without a grammar."""

    name = "grammar"

    def __init__(self):
        self._offered: list[int] = []

    def offer(self, generation, cap: int) -> int:
        grammar = generation.grammar
        if grammar is None or generation.pending or generation.config.grammar_assist != "forced":
            return 0
        self._offered = grammar.fast_forward(cap)
        return len(self._offered)

    def propose(self, generation, n: int) -> int:
        found, self._offered = self._offered[:n], []
        for token in found:
            generation.add_pending(token, self)
        return len(found)

    def proposal_probs(self, bundle, j: int):
        return OneHotProposal(bundle.tokens[j])


class HeldBonus(Proposer):
    """Greedy cospec's bonus token, held back: after a fully accepted run the target's bonus
    token b is not emitted but stays pending, and the draft's next call (which reads the last
    accepted token and b in one batch) gives its row at b's position. There the arbiter sees a
    mismatch whenever the draft would have written another token, as at any drafted position,
    so every position is arbitrated while the draft makes spec's k calls per cycle, not k + 1.
    `name` is the target's (the token is the target's choice)."""

    def __init__(self, name: str, draft_index: int):
        self.name = name
        self.draft_index = draft_index
        self.draft_choice = -1  # the draft's own token at the held position (set when it has read it)

    def proposal_probs(self, bundle, j: int):
        return OneHotProposal(bundle.tokens[j])


class NgramProposer(Proposer):
    """Prompt lookup: the tokens that followed the context's latest suffix earlier in it."""

    name = "ngram"

    def __init__(self, index: NgramIndex, pool: SharedNgramPool | None = None,
                 length_policy: AdaptiveDraftLength | None = None):
        self.index = index
        self.pool = pool
        self.length_policy = length_policy
        self._offered: list[int] = []  # the match found by the last offer

    def start(self) -> None:
        # Whether the output repeats its context depends on the prompt: learn acceptance afresh.
        if self.length_policy is not None:
            self.length_policy.new_input()

    def offer(self, generation, cap: int) -> int:
        self._offered = self.lookup(generation, super().offer(generation, cap))
        return len(self._offered)

    def lookup(self, generation, n: int) -> list[int]:
        """Up to n tokens the lookup would propose (nothing is appended): from the context, else
        from the shared pool of earlier generations (a server option)."""
        found = self.index.propose(generation.context, n)
        if not found and self.pool is not None:
            found = self.pool.propose(generation.context, n)
        if found and generation.grammar is not None and generation.config.grammar_assist != "verify":
            # Never propose what the grammar forbids.
            found = generation.grammar.valid_prefix(generation.pending, found)
        return found

    def propose(self, generation, n: int) -> int:
        found = (self._offered or self.lookup(generation, n))[:n]
        self._offered = []
        for token in found:
            generation.add_pending(token, self)
        return len(found)

    def proposal_probs(self, bundle, j: int):
        return OneHotProposal(bundle.tokens[j])
