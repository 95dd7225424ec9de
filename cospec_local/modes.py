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
  cospec           member: target; the draft proposes every token (no bonus row), k + 1 per
                   verification (fewer when its confidence drops); at a mismatch a learned policy
                   may keep the draft's token (`arbiter.ArbitratingVerifier`);
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

from .combine import Combination, Contrastive, Single, WeightedEnsemble
from .config import MODES as MODE_NAMES
from .config import GenerationConfig
from .verify import StandardVerifier, Verifier


class Mode:
    """One generation's use of the engine's slots. Subclasses set the class facts (`name`,
    `arbitrates`, `needs_draft`) and, per generation, `combination` (r over the members), `active`
    (slot indices taking part) and `proposers`."""

    name = ""
    arbitrates = False  # uses the ONNX arbitration policy (cospec)
    has_bonus_row = True  # a scoring call adds the row after the pending tokens (cospec: no)

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
        return False

    @classmethod
    def without_draft(cls, config: GenerationConfig) -> GenerationConfig:
        """The config to run when no draft was loaded (spec falls back to target-only)."""
        return config

    @classmethod
    def predicted_speedup(cls, measured: dict) -> dict | None:
        """bench: the formulas' expected speedup over the bench baseline from measured acceptance
        (`alpha`, `gamma`), cost ratio `c` and verification cost (`verify_ratio(n_rows)`); None
        when no formula covers this mode against that baseline."""
        return None

    # -- one generation ------------------------------------------------------------------------------
    def verifier(self) -> Verifier:
        return StandardVerifier()

    def prefills_lazily(self, index: int) -> bool:
        """Whether slot `index` may skip the prompt's prefill (a windowed draft that loses)."""
        return False

    def start(self) -> None:
        """Per-generation set-up of the proposers' state."""

    def take_turn(self, gen) -> None:
        """One call of one model: a proposer drafts, or a member scores the pending tokens."""
        raise NotImplementedError

    def observe(self, gen, n_verified: int, n_accepted: int, n_emitted: int) -> None:
        """After a verification: what the draft-length policies learn from it."""


class TargetOnly(Mode):
    """The target alone: the baseline."""

    name = "target"


class DraftOnly(Mode):
    """The draft alone."""

    name = "draft"

    @classmethod
    def needs_draft(cls, config):
        return True


class Spec(Mode):
    """Speculative decoding: proposers draft, the target verifies (lossless)."""

    name = "spec"

    @classmethod
    def needs_draft(cls, config):
        return config.draft_source != "ngram"

    @classmethod
    def without_draft(cls, config):
        return config.with_(mode="target") if cls.needs_draft(config) else config


class CoSpec(Mode):
    """Speculative decoding where a learned arbiter may keep the draft's token at a mismatch."""

    name = "cospec"
    arbitrates = True
    has_bonus_row = False

    @classmethod
    def needs_draft(cls, config):
        return True


class Collab(Mode):
    """Every model scores every token; the output follows r (the collaborative reference)."""

    name = "collab"


class CosNaive(Collab):
    """The draft proposes gamma tokens, r verifies them."""

    name = "cos-naive"


class Cos(Collab):
    """CoS with alternating proposers (two models: the Alternate Proposal Framework)."""

    name = "cos"


MODES: dict[str, type[Mode]] = {cls.name: cls for cls in (Spec, TargetOnly, DraftOnly, Collab, Cos, CosNaive, CoSpec)}
assert tuple(MODES) == MODE_NAMES, "config.MODES lists the modes in the order of this table"


def mode_class(config: GenerationConfig) -> type[Mode]:
    """The class of `config.mode`."""
    return MODES[config.mode]
