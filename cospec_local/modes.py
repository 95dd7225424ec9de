"""The decoding modes: one class each, the only place that knows what a mode does.

A mode says what it needs (a draft model, several models), how it uses the engine's slots for one
generation (which models are *members*, whose rows make r, and which *proposers* draft), which
turn comes next, which verifier judges the proposals, what the draft-length policy observes, and
how fast `bench` should expect it to be. The engine, CLI, server, bench, eval and training ask the
mode; none of them compares mode names.

The modes (terms as in `engine`):
  target / draft   one member, no proposer: each round scores one row and samples from it;
  spec             member: target; proposers: the n-gram lookup and/or the draft model (adaptive k);
                   r = the target's p;
  cospec           member: target; the draft proposes as in spec (greedy: the target's bonus token
                   is held pending until the draft has read it; sampled: the draft writes every
                   token, no bonus row); at a mismatch a learned policy may keep the draft's
                   token (`arbiter.ArbitratingVerifier`);
  collab           all models are members, no proposer: every model scores every token (reference);
  cos-naive        all members; the draft proposes gamma tokens; r verifies them;
  cos              all members; the model with the largest gamma proposes first; every scoring call
                   appends its own sample (the bonus) to the proposal; when everything before it
                   is accepted, its owner drafts up to its gamma (two models: the Alternate
                   Proposal Framework; n models: the paper's queue scheme).
"""

from __future__ import annotations

import time

import numpy as np

from .speedup import (
    predicted_apf_speedup,
    predicted_cos_naive_speedup,
    predicted_speedup,
    predicted_speedup_with_verify_cost,
)
from .combine import Combination, Contrastive, Single, WeightedEnsemble
from .config import MODES as MODE_NAMES
from .config import GenerationConfig
from .proposers import GrammarProposer, HeldBonus, ModelProposer, MtpProposer, NgramProposer, Proposer
from .verify import StandardVerifier, Verifier


class Mode:
    """One generation's use of the engine's slots. Subclasses set the class facts (`name`,
    `arbitrates`, `needs_draft`) and, per generation, `combination` (r over the members), `active`
    (slot indices taking part) and `proposers`."""

    name = ""
    requires_draft = False  # whether every config of this mode needs a draft model
    rolls_back = False  # proposals can be rejected: every active model must take back positions
    arbitrates = False  # uses the ONNX arbitration policy (cospec)
    has_bonus_row = True  # a scoring call adds the row after the pending tokens (sampled cospec: no)
    holds_bonus = False  # the bonus token waits as a pending token for the draft (greedy cospec)
    held_bonus: Proposer | None = None  # the proposer that stands for such a token

    def __init__(self, engine, config: GenerationConfig, conversation):
        self.engine = engine
        self.config = config
        self.conversation = conversation
        self.slots = engine.slots
        self.combination: Combination = Single(engine.target_index)
        self.active: tuple[int, ...] = (engine.target_index,)

    # -- class facts: asked by the CLI, server, bench and eval before any model is loaded ------------
    @classmethod
    def needs_draft(cls, config: GenerationConfig) -> bool:
        """Whether `config` needs a draft model."""
        return cls.requires_draft

    @classmethod
    def without_draft(cls, config: GenerationConfig) -> GenerationConfig:
        """The config to run when no draft was loaded (spec falls back to target-only)."""
        return config

    def predict(self, baseline: str, alpha: float, gamma: float, c: float, verify_ratio) -> dict | None:
        """bench: the formulas' speedup over `baseline` (`speedup`) from the measured per-token
        acceptance `alpha`, mean proposal length `gamma`, cost ratio `c` and verification cost
        (`verify_ratio(n_rows)`, in one-token target calls): {"predicted_speedup",
        "predicted_speedup_with_verify_cost", ...}; None when no formula covers this comparison."""
        return None

    # -- one generation ------------------------------------------------------------------------------
    def check_models(self) -> None:
        """Refuse, before the first token, models this mode cannot run (a rejected proposal must
        be taken back from every model that evaluated it)."""
        if not self.rolls_back:
            return
        for i in self.active:
            model = self.slots[i].model
            if not getattr(model, "can_roll_back", True):
                raise ValueError(
                    f"mode {self.name!r} cannot run on {self.slots[i].name} {getattr(model, 'path', '')}: its "
                    f"{model.memory} memory cannot take back rejected tokens here (llama.cpp cannot copy its "
                    "recurrent state); use --mode target")

    def verifier(self) -> Verifier:
        return StandardVerifier()

    def prefills_lazily(self, index: int) -> bool:
        """Whether slot `index` may skip the prompt's prefill (a windowed draft that loses)."""
        return False

    def start(self) -> None:
        """Per-generation set-up: the proposers' state, and which models keep copies of their
        recurrent state (only needed where a rollback may reach past a model's last call)."""
        for i in self.active:
            self.slots[i].model.keeps_state_copies = self.rolls_back_past_last_call(i)

    def rolls_back_past_last_call(self, index: int) -> bool:
        """Whether a rejection may take back more than slot `index`'s last llama.cpp call: any
        model of a mode with proposals (CoS members score batches that start at pending tokens),
        unless a subclass knows better."""
        return self.rolls_back

    def ready(self, gen) -> bool:
        """Whether the rows queued so far may be verified (once every member has scored position
        0; greedy cospec also waits for the draft's row at a held bonus and the target's rows)."""
        return True

    def take_turn(self, gen) -> None:
        """One turn: a proposer drafts, or a member scores the pending tokens (the default)."""
        self.score(gen)

    def score(self, gen) -> int:
        """The member with the fewest rows scores every pending token in one batch (plus the bonus
        row after them, except in cospec); returns its slot index."""
        members = self.combination.members
        i = members[0] if len(members) == 1 else min(members, key=lambda m: len(self.slots[m].rows))
        t0 = time.perf_counter()
        rows = self.slots[i].score(gen.context, gen.pending, None if self.has_bonus_row else len(gen.pending))
        self.observe_score(len(rows), time.perf_counter() - t0)
        return i

    def observe_score(self, n_rows: int, seconds: float) -> None:
        """A member's scoring call took `seconds` for `n_rows` rows."""

    def observe(self, gen, n_verified: int, n_accepted: int, n_emitted: int) -> None:
        """After a verification: what the draft-length policies learn from it."""


class TargetOnly(Mode):
    """The target alone: the baseline."""

    name = "target"


class DraftOnly(Mode):
    """The draft alone."""

    name = "draft"
    requires_draft = True

    def __init__(self, engine, config, conversation):
        super().__init__(engine, config, conversation)
        draft = _draft_index(engine, "mode 'draft' needs a draft model")
        self.combination, self.active = Single(draft), (draft,)


class Spec(Mode):
    """Speculative decoding: the n-gram lookup and/or the draft model propose, the target verifies
    (lossless). The draft's length per cycle comes from the conversation's adaptive policies (one
    per proposer: n-gram proposals learn their own acceptance); k = 0 is a plain target step."""

    name = "spec"
    rolls_back = True

    @classmethod
    def needs_draft(cls, config):
        # The chain (ngram+model) runs its n-gram half alone when no draft was loaded.
        return config.draft_source == "model"

    @classmethod
    def without_draft(cls, config):
        return config.with_(mode="target") if cls.needs_draft(config) else config

    def predict(self, baseline, alpha, gamma, c, verify_ratio):
        if baseline != "target" or "mtp" in self.config.draft_source:
            return None  # no measured cost ratio for an MTP head
        c = c if self.model is not None else 0.0  # an n-gram lookup costs nothing next to a model call
        rows = verify_ratio(gamma + 1)
        return {"predicted_speedup": predicted_speedup(alpha, gamma, c),
                "predicted_speedup_with_verify_cost": predicted_speedup_with_verify_cost(alpha, gamma, c, rows),
                # A draft that costs nothing with the same acceptance: the ceiling that the
                # target's verification cost alone sets on this machine.
                "ceiling_free_draft": predicted_speedup_with_verify_cost(alpha, gamma, 0.0, rows)}

    def __init__(self, engine, config, conversation):
        super().__init__(engine, config, conversation)
        if self.needs_draft(config):
            _draft_index(engine, "mode 'spec' with --draft-source model needs a draft model (or --draft-source ngram+model or ngram)")
        adaptive = config.adaptive
        # The chain, in order of preference when two proposers promise as much.
        # First: the grammar's forced bytes (free, fixed length: taken whenever there are some).
        self.proposers: list[Proposer] = [GrammarProposer()]
        self.model: ModelProposer | None = None
        sources = config.draft_source.split("+")
        if "ngram" in sources:
            self.proposers.append(NgramProposer(conversation.ngram_index, conversation.ngram_pool,
                                                conversation.ngram_length_policy if adaptive else None))
        if "mtp" in sources:
            target = engine.slots[engine.target_index]
            reason = getattr(target.model, "mtp_unavailable", "it has no MTP head")
            if reason is not None:
                raise ValueError(f"--draft-source {config.draft_source} needs a target that drafts with its own "
                                 f"multi-token-prediction layers, but {getattr(target.model, 'path', target.name)}: {reason}")
            self.proposers.append(MtpProposer(target, conversation.mtp_length_policy if adaptive else None))
        draft = engine.index.get("draft")
        if "model" in sources and draft is not None:
            self.model = ModelProposer(draft, engine.slots[draft], stops_when_unsure=True, windowed=True,
                                       length_policy=conversation.draft_length_policy if adaptive else None)
            self.proposers.append(self.model)
            self.active = (draft, engine.target_index)
        self._drafted_by: Proposer | None = None  # this round's proposer (None: a plain target step)
        self._k = 0  # how many tokens it proposed

    def start(self):
        super().start()
        for proposer in self.proposers:
            proposer.start()

    def rolls_back_past_last_call(self, index):
        return _rolls_back_past_last_call(self.slots, index, self.model)

    def prefills_lazily(self, index):
        # The draft skips the prompt while measurements say drafting loses; a probe then feeds it a window.
        lengths = self.model.length_policy if self.model is not None and index == self.model.index else None
        return lengths is not None and lengths.drafting_loses

    def take_turn(self, gen):
        if not gen.pending and gen.limit > 0 and self._draft(gen):
            return
        self.score(gen)

    def _draft(self, gen) -> bool:
        """The proposer chain: each proposer offers a proposal (the n-gram lookup: its match; the
        draft model: the length its policy chooses, 0 when target steps win) and the one with the
        most expected emitted tokens per second of its cycle drafts; with fixed lengths
        (--no-adaptive) the first with an offer. False: a plain target step."""
        cap = min(self.config.draft_max, gen.limit)
        best, best_n, best_rate = None, 0, -1.0
        for proposer in self.proposers:
            n = proposer.offer(gen, cap)
            if n <= 0:
                continue
            if proposer.length_policy is None:
                best, best_n = proposer, n
                break
            rate = proposer.length_policy.expected_tokens_per_second(n)
            if rate > best_rate:
                best, best_n, best_rate = proposer, n, rate
        if best is None:
            return False
        self._drafted_by, self._k = best, best.propose(gen, best_n)
        if self._k == 0:  # e.g. the grammar allows nothing the proposer could write: a target step
            self._drafted_by = None
            return False
        return True

    def observe_score(self, n_rows, seconds):
        # The target's call-time line: every proposer's cycles are verified by the same target.
        for proposer in self.proposers:
            if proposer.length_policy is not None and n_rows:
                proposer.length_policy.observe_target(n_rows, seconds)

    def observe(self, gen, n_verified, n_accepted, n_emitted):
        seconds = time.perf_counter() - gen.round_started
        if self._drafted_by is not None:  # its proposal's acceptance and the cycle's time per token
            lengths = self._drafted_by.length_policy
            if lengths is not None:
                if n_verified:
                    lengths.observe_acceptance(n_verified, n_accepted)
                lengths.observe_cycle(self._k, seconds, n_emitted)
        else:  # a plain target step: every proposer compares its drafting with it
            for proposer in self.proposers:
                if proposer.length_policy is not None:
                    proposer.length_policy.observe_cycle(0, seconds, n_emitted)
        self._drafted_by, self._k = None, 0


class CoSpec(Mode):
    """Speculative decoding where a learned arbiter may keep the draft's token at a mismatch.

    The arbiter needs the draft's row at every position. Greedy, the draft proposes k tokens as in
    spec and the target's bonus token is *held* (`proposers.HeldBonus`): it stays pending, the
    draft's next call reads it together with the last accepted token (the call spec makes anyway)
    and gives its row there. Where the draft agrees and the token cannot end the reply, the draft
    goes on after it and the bonus is verified with that run; otherwise it is judged alone first
    (by the arbiter at a mismatch). So a cycle costs spec's calls (k draft calls, one target call
    of k + 1 rows), every position is arbitrated, and overrides only lengthen accepted runs.
    k is chosen as spec chooses it when it drafts (`AdaptiveDraftLength.best_draft_length`, from
    the measured acceptance and call times; `--no-adaptive`: k = `-k`), but never 0: a plain
    target step would leave its token unjudged. Since every position is judged whatever k is,
    greedy output does not depend on k. Sampled, the draft writes every token instead (k + 1 per
    verification, no bonus row), because a held sample could not be judged by the rejection
    test. Runs stop early where the draft's confidence drops (`--draft-p-min`)."""

    name = "cospec"
    requires_draft = True
    rolls_back = True
    arbitrates = True

    def __init__(self, engine, config, conversation):
        super().__init__(engine, config, conversation)
        draft = _draft_index(engine, "mode 'cospec' needs a draft model")
        self.has_bonus_row = self.holds_bonus = config.sampling.greedy
        lengths = conversation.cospec_length_policy if config.adaptive and self.holds_bonus else None
        self.model = ModelProposer(draft, engine.slots[draft], stops_when_unsure=True, length_policy=lengths)
        self.active = (draft, engine.target_index)
        self.held_bonus = HeldBonus(engine.slots[engine.target_index].name, draft)
        self._k = 0  # tokens drafted this round

    def rolls_back_past_last_call(self, index):
        return _rolls_back_past_last_call(self.slots, index, self.model)

    def verifier(self):
        from .arbiter import ArbitratingVerifier

        policy = self.engine.load_policy(self.config.policy)
        return ArbitratingVerifier(policy, self.config.threshold)

    def _holding(self, gen) -> bool:
        return bool(gen.pending) and gen.proposed_by[0] is self.held_bonus

    def ready(self, gen):
        # A held bonus: once the draft has read it, and the target has scored what was drafted after it.
        if not self._holding(gen):
            return True
        return bool(self.model.slot.rows) and len(self.slots[self.engine.target_index].rows) >= len(gen.pending)

    def take_turn(self, gen):
        if self._holding(gen):
            slot = self.model.slot
            if slot.rows:  # the draft went on after the held bonus: the target scores it all
                self.score(gen)
                return
            # The draft reads the last accepted token and the held bonus in one call (the call
            # spec makes first in a cycle), so it has its row at the bonus. Where it would have
            # written the same token and that token cannot end the reply, it drafts on and the
            # bonus is judged with the run; otherwise the bonus is judged alone first (a
            # mismatch, or a reply's last token: its end is then seen as early as in spec).
            slot.score(gen.context, gen.pending)
            b = gen.pending[0]
            self.held_bonus.draft_choice = slot.to_shared(int(np.argmax(slot.rows[0])))
            if self.held_bonus.draft_choice == b and not gen.would_end(b) and gen.limit > 1:
                self._k = self.model.propose(gen, self._draft_length(gen.limit - 1))
            return
        if not gen.pending and gen.limit > 0:
            n = self._draft_length(gen.limit) if self.holds_bonus else min(self.config.draft_max + 1, gen.limit)
            # (A proposer writes nothing when the grammar allows nothing it could write.)
            self._k = self.model.propose(gen, n)
            if self._k:
                return
        self.score(gen)

    def _draft_length(self, room: int) -> int:
        lengths = self.model.length_policy
        return min(lengths.best_draft_length(self.config.draft_max) if lengths else self.config.draft_max, room)

    def observe_score(self, n_rows, seconds):
        if self.model.length_policy is not None and n_rows:
            self.model.length_policy.observe_target(n_rows, seconds)

    def observe(self, gen, n_verified, n_accepted, n_emitted):
        if self._k and self.model.length_policy is not None:  # a drafted run (after any held bonus)
            held = n_verified - self._k
            self.model.length_policy.observe_acceptance(self._k, max(n_accepted - held, 0))
        self._k = 0


class Collab(Mode):
    """Every model scores every token; the output follows r (the collaborative reference)."""

    name = "collab"

    def __init__(self, engine, config, conversation):
        super().__init__(engine, config, conversation)
        n = len(engine.slots)
        if n < 2:
            raise ValueError(f"mode {self.name!r} combines several models: give a --draft (and --model ...)")
        self.active = tuple(range(n))
        if config.combine == "cd":
            if n != 2:
                raise ValueError("contrastive decoding (--combine cd) combines exactly two models, the draft and the target")
            target = engine.target_index
            self.combination = Contrastive(expert=target, amateur=1 - target, mu=config.mu)
        else:
            self.combination = WeightedEnsemble(self.active, config.weights)
        # Default proposal lengths: the draft's leaves room in the exact-size batch for every other
        # model's bonus token (cos), the others propose one token each (the paper's setting).
        self.gammas = config.gamma or tuple(max(1, config.draft_max + 1 - n) if i == 0 else 1 for i in range(n))
        if len(self.gammas) != n:
            raise ValueError(f"--gamma has {len(self.gammas)} values for {n} models (order: draft, target, --model ...)")
        self.proposers = [ModelProposer(i, slot) for i, slot in enumerate(engine.slots)]


class CosNaive(Collab):
    """The draft (the first slot) proposes gamma tokens, r verifies them."""

    name = "cos-naive"
    rolls_back = True

    def predict(self, baseline, alpha, gamma, c, verify_ratio):
        if baseline != "collab" or len(self.slots) != 2:
            return None
        return {"predicted_speedup": predicted_cos_naive_speedup(alpha, gamma, c),
                "predicted_speedup_with_verify_cost": predicted_cos_naive_speedup(alpha, gamma, c, verify_ratio(gamma + 1))}

    def take_turn(self, gen):
        if not gen.pending and self.gammas[0] > 0 and gen.limit > 0 and self.proposers[0].propose(gen, self.gammas[0]):
            return
        self.score(gen)


class Cos(Collab):
    """CoS with alternating proposers: every scoring call appends its model's own sample (the
    bonus) to the proposal; when everything before it is accepted, its owner drafts up to its
    gamma (two models: the Alternate Proposal Framework; n models: the paper's queue scheme). The
    model with the largest gamma proposes first (ties: the first, i.e. the draft)."""

    name = "cos"
    rolls_back = True

    def predict(self, baseline, alpha, gamma, c, verify_ratio):
        if baseline != "collab" or len(self.slots) != 2:
            return None
        gq, gp = self.gammas
        return {"predicted_speedup": predicted_apf_speedup(alpha, gq, gp, c),
                "predicted_speedup_with_verify_cost": predicted_apf_speedup(alpha, gq, gp, c, verify_ratio(gq + 1))}

    def take_turn(self, gen):
        pending, limit = gen.pending, gen.limit
        if not pending:
            proposer = self._first_proposer()
            n = self.gammas[proposer.index]
            if n > 0 and limit > 0 and proposer.propose(gen, n):
                return
        else:
            owner = gen.proposed_by[0]
            n_more = min(self.gammas[owner.index], limit) - len(pending)
            if (n_more > 0 and all(p is owner for p in gen.proposed_by) and len(owner.slot.rows) == len(pending)
                    and owner.propose(gen, n_more)):
                return
        i = self.score(gen)
        slot, j = self.slots[i], len(pending)
        # The scoring model's own sample extends the proposal (from its row masked by the grammar).
        if j < limit and gen.constrain_draft(slot.rows[j], j, slot.token_map):
            token, _ = slot.draw(j, self.config.sampling, gen.rng)
            gen.add_pending(token, self.proposers[i])

    def _first_proposer(self) -> ModelProposer:
        """With nothing pending: the model whose row for the next position is already queued
        proposes (the roles swap after a fully accepted proposal); else the default one."""
        for proposer in self.proposers:
            if proposer.slot.rows:
                return proposer
        return self.proposers[int(np.argmax(self.gammas))]


MODES: dict[str, type[Mode]] = {cls.name: cls for cls in (Spec, TargetOnly, DraftOnly, Collab, Cos, CosNaive, CoSpec)}
assert tuple(MODES) == MODE_NAMES, "config.MODES lists the modes in the order of this table"


def mode_class(config: GenerationConfig) -> type[Mode]:
    """The class of `config.mode`."""
    return MODES[config.mode]


def _draft_index(engine, message: str) -> int:
    """The draft's slot index, or ValueError(message) when no draft was loaded."""
    draft = engine.index.get("draft")
    if draft is None:
        raise ValueError(message)
    return draft


def _rolls_back_past_last_call(slots, index: int, draft: ModelProposer | None) -> bool:
    """spec and cospec: the draft's calls are one token each, so its rollbacks reach back past
    them; the target's verification batch starts at the last committed token, so its rollbacks
    stay inside that call, where llama.cpp's own recurrent snapshots (when the architecture has
    them) suffice."""
    if draft is not None and index == draft.index:
        return True
    return not getattr(slots[index].model, "native_snapshots", 0)
