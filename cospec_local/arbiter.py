"""CoSpec: a learned arbiter decides, where draft and target disagree, whose token to keep.

Plain speculative decoding treats the target as the only authority. In `--mode cospec` the draft
proposes every token (no bonus token: the target's rows cover exactly the proposed positions), and
at a *mismatch* (greedy: the draft's token is not the target's argmax; sampled: the rejection test
failed) a policy scores a row of cheap features. Above the threshold the draft's token is kept
(provenance ARBITRATED) and verification goes on over the rest of the run with the target rows
already computed in the same batch (they were conditioned on that token); otherwise the target's
token is taken as in plain SD. So a policy that always defers gives plain SD's output, and one that
always keeps gives the draft's.

Feature schema (version 3): one float32 row per mismatch, built from what the loop already has:
the draft's distribution q and the target's p at that position (greedy: plain softmaxes), the
draft's token x and the target's choice y, and the reply's history. None depends on where the
draft's runs happen to be cut (the draft length adapts to timings), so greedy output is
reproducible. Two kinds:
- model-agnostic features (`GENERIC_FEATURES`): probabilities, entropies, margins, positions; a
  policy reading only these serves any pair (schema 2 had exactly these);
- token identities (`TOKEN_FEATURES`: x, y and the token before them, as ids): the network reads
  them through embedding tables, so such a policy is bound to the vocabulary it was trained with
  (`cospec.vocabulary` in its metadata, checked against the models' before it is used). They let
  one policy tell whose blind spot a mismatch is in (on the test world: which addition column or
  tally step), which the probabilities alone do not show.
Policies are trained on greedy rollouts; at temperature > 0 the features come from the processed
(filtered, tempered) distributions, outside what they saw in training.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CospecError
from .proposers import HeldBonus
from .verify import ARBITRATED, RowBundle, Verdict, verify_run

SCHEMA_VERSION = "3"
# Schema 2 listed the model-agnostic features of schema 3 with the same meanings: still readable.
READABLE_SCHEMAS = ("2", "3")
# The policies shipped with the library: the default, trained on the test-world family
# (`models/family/README.md`) and bound to its vocabulary, and a model-agnostic one used for
# every other pair when no --policy is given.
DEFAULT_POLICY = Path(__file__).parent / "data" / "cospec_policy.onnx"
GENERIC_POLICY = Path(__file__).parent / "data" / "cospec_policy_generic.onnx"

# name -> why it is there
FEATURES: dict[str, str] = {
    "draft_p_own": "q(x): how sure the draft is of its own token",
    "draft_p_other": "q(y): whether the draft considered the target's token at all",
    "target_p_own": "p(y): how sure the target is (blind spots show as low confidence)",
    "target_p_other": "p(x): how plausible the target finds the draft's token",
    "draft_entropy": "H(q) in nats: the draft's overall uncertainty",
    "target_entropy": "H(p) in nats: the target's overall uncertainty",
    "draft_margin": "q's top-1 minus top-2 probability",
    "target_margin": "p's top-1 minus top-2 probability",
    "target_log_rank_of_draft": "log(1 + rank of x under p): 0 when x is the target's second choice",
    "since_mismatch": "log(1 + tokens since the previous mismatch of this reply) / 5: mismatches cluster",
    "position_in_answer": "log(1 + tokens generated so far) / 5: early and late mistakes differ",
    "recent_acceptance": "exponential average of the draft's acceptance in this reply",
    "draft_token": "x's id (vocabulary-bound: read through an embedding table)",
    "target_token": "y's id (vocabulary-bound)",
    "previous_token": "the id of the token before the mismatch (vocabulary-bound): where in the task it is",
}
FEATURE_NAMES = tuple(FEATURES)
TOKEN_FEATURES = ("draft_token", "target_token", "previous_token")
GENERIC_FEATURES = tuple(n for n in FEATURE_NAMES if n not in TOKEN_FEATURES)


def vocabulary_fingerprint(n_vocab: int, token_bytes) -> str:
    """"<n_vocab>:<hash of every token's bytes>": what a vocabulary-bound policy must match."""
    digest = hashlib.sha256()
    for token in range(n_vocab):
        piece = token_bytes(token)
        digest.update(len(piece).to_bytes(4, "little") + piece)
    return f"{n_vocab}:{digest.hexdigest()[:16]}"


class PolicyError(CospecError):
    """A policy file is missing, corrupt, or does not match the feature schema."""


def _margin(probs: np.ndarray) -> float:
    """Top-1 minus top-2 probability (one partial sort)."""
    if len(probs) < 2:
        return float(probs.max())
    second, first = np.partition(probs, -2)[-2:]
    return float(first - second)


def _entropy(probs: np.ndarray) -> float:
    logs = np.log(probs, out=np.zeros_like(probs), where=probs > 0)
    return float(-np.dot(probs, logs))


def mismatch_features(q_row, p: np.ndarray, x: int, y: int, previous: int, position: int, since_mismatch: int,
                      recent_acceptance: float) -> np.ndarray:
    """The feature row (all of `FEATURE_NAMES`, in order) for a mismatch: the draft's distribution
    `q_row` (dense, or a trimmed draft's `MappedRow`) and its token x, the target's `p` and its
    choice y, the token before them; `position` counts the reply's tokens before it,
    `since_mismatch` the tokens since the previous mismatch."""
    q_dense = q_row.draft_probs if hasattr(q_row, "draft_probs") else q_row
    p_x = float(p[x])
    return np.array(
        [
            float(q_row[x]),
            float(q_row[y]),
            float(p[y]),
            p_x,
            _entropy(q_dense),
            _entropy(p),
            _margin(q_dense),
            _margin(p),
            math.log1p(int(np.count_nonzero(p > p_x))),
            math.log1p(since_mismatch) / 5.0,
            math.log1p(position) / 5.0,
            recent_acceptance,
            x,
            y,
            previous,
        ],
        dtype=np.float32,
    )


class OnnxPolicy:
    """An arbitration policy exported to ONNX: input `features` float32 [1, F] in the order of its
    metadata's feature names, output the probability of keeping the draft's token, [1, 1].
    `vocabulary` is the fingerprint of the vocabulary its token features were trained with (None:
    a model-agnostic policy)."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for corrupt files
            raise PolicyError(f"{path}: not a loadable ONNX policy ({e.__class__.__name__}: {str(e)[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.path = path
        self.metadata = dict(meta)
        version = meta.get("cospec.schema_version")
        if version not in READABLE_SCHEMAS:
            raise PolicyError(f"{path.name}: feature schema {version!r}, this runtime reads schemas {', '.join(READABLE_SCHEMAS)}")
        names = tuple(n for n in meta.get("cospec.feature_names", "").split(",") if n)
        unknown = [n for n in names if n not in FEATURES]
        if not names or unknown:
            raise PolicyError(f"{path.name}: unknown feature names {unknown or '(none listed)'}; known: {', '.join(FEATURE_NAMES)}")
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].shape[-1] != len(names):
            raise PolicyError(
                f"{path.name}: the network takes {[i.shape for i in inputs]} but its metadata lists {len(names)} features"
            )
        self.vocabulary = meta.get("cospec.vocabulary")
        if self.vocabulary is None and any(n in TOKEN_FEATURES for n in names):
            raise PolicyError(f"{path.name}: it reads token identities but does not say which vocabulary (cospec.vocabulary)")
        self.feature_names = names
        self._columns = np.array([FEATURE_NAMES.index(n) for n in names])
        # One input row and one output buffer, bound once: a call copies the features into the row.
        self._row = np.zeros((1, len(names)), dtype=np.float32)
        self._out = np.zeros((1, 1), dtype=np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(inputs[0].name, self._row)
        self._binding.bind_output(self.session.get_outputs()[0].name, "cpu", 0, np.float32, [1, 1], self._out.ctypes.data)

    def check_vocabulary(self, fingerprint) -> None:
        """Refuse models whose vocabulary is not the one this policy's token features were trained
        with (`fingerprint`: a `vocabulary_fingerprint`, or a callable computing it on demand)."""
        if self.vocabulary is None:
            return
        ours = fingerprint() if callable(fingerprint) else fingerprint
        if ours != self.vocabulary:
            raise PolicyError(
                f"{self.path.name} reads token identities of the vocabulary it was trained with ({self.vocabulary}); "
                f"these models' vocabulary is {ours}: give a model-agnostic policy (--policy "
                f"{GENERIC_POLICY}) or train one for this pair (cospec-local train-policy)")

    def keep_probability(self, features: np.ndarray) -> float:
        """P(keep the draft's token) for one feature row of the current schema."""
        np.take(features, self._columns, out=self._row[0])
        self.session.run_with_iobinding(self._binding)
        return float(self._out[0, 0])


@dataclass
class RulePolicy:
    """A fixed-threshold baseline: keep the draft's token when the draft is sure of it
    (q(x) > tau) and the target is not sure of its own (p(y) < rho)."""

    tau: float
    rho: float

    def keep_probability(self, features: np.ndarray) -> float:
        return 1.0 if features[0] > self.tau and features[2] < self.rho else 0.0


@dataclass
class ConstantPolicy:
    """Always keep (1.0) or always defer (0.0): the two ends that reproduce draft-only and plain SD."""

    value: float

    def keep_probability(self, features: np.ndarray) -> float:
        return self.value


@dataclass
class Decision:
    """One arbitration, recorded for training: the feature row and the choice."""

    features: np.ndarray
    kept: bool


@dataclass
class ArbitratingVerifier:
    """Verification with a policy at mismatches (see the module docstring).

    `stochastic=True` keeps the draft's token with the policy's probability (training rollouts,
    recorded in `decisions`); otherwise it keeps it when the probability exceeds `threshold`.
    """

    policy: object
    threshold: float = 0.5
    stochastic: bool = False
    decisions: list[Decision] = field(default_factory=list)
    acceptance_decay: float = 0.8
    _recent: float = 1.0
    _last_mismatch: int = -1  # position of the reply's previous mismatch
    _spent: float = 0.0  # seconds of features and policy scoring in the current verification
    _seen: int = 0  # bundle positions already folded into the recent acceptance
    _held_mismatch: bool = False  # the last held bonus was a mismatch the arbiter deferred on

    def start(self) -> None:
        """Forget the previous reply's running statistics (called at the start of each reply)."""
        self._recent, self._last_mismatch = 1.0, -1
        self.decisions = []

    def _fold_agreements(self, upto: int) -> None:
        """Count the agreeing tokens at bundle positions _seen..upto-1 in the recent acceptance."""
        for _ in range(upto - self._seen):
            self._recent = self.acceptance_decay * self._recent + (1 - self.acceptance_decay)
        self._seen = max(self._seen, upto)

    def _keep(self, bundle, j, choice, rng, x: int | None = None, q_row=None) -> bool:
        """The decision at a mismatch at position j: keep the draft's token `x` (default: the
        proposed one, drawn from `q_row`, default its proposal distribution) rather than `choice`."""
        t0 = time.perf_counter()
        self._fold_agreements(j)
        self._recent = self.acceptance_decay * self._recent  # this mismatch
        self._seen = j + 1
        position = bundle.n_generated + j  # the reply's tokens before it (a held bonus is not yet one)
        x = bundle.tokens[j] if x is None else x
        q_row = bundle.proposal_probs(j) if q_row is None else q_row
        features = mismatch_features(q_row, bundle.combined(j), x, choice, bundle.previous_token(j), position,
                                     position - self._last_mismatch - 1, self._recent)
        self._last_mismatch = position
        prob = self.policy.keep_probability(features)
        kept = bool(rng.random() < prob) if self.stochastic else prob > self.threshold
        if self.stochastic:
            self.decisions.append(Decision(features, kept))
        self._spent += time.perf_counter() - t0
        return kept

    def _review_held_bonus(self, bundle: RowBundle, rng) -> Verdict | None:
        """Position 0 holds the target's bonus token b, which the draft has now read (greedy
        cospec, `modes.CoSpec`): where the draft's own choice d differs, the arbiter decides as at
        any mismatch. Keeping d: the verdict (d replaces b; what was drafted after b is stale).
        None when b stands; `_held_mismatch` says whether it was a deferred mismatch."""
        held = bundle.proposers[0]
        b = bundle.tokens[0]
        d = held.draft_choice  # the mode took the draft's argmax there when the draft read it
        self._held_mismatch = d != b
        if d != b and self._keep(bundle, 0, b, rng, x=d, q_row=bundle.probs(held.draft_index, 0)):
            return Verdict(0, d, ARBITRATED, [], mismatches=1, overrides=1)
        return None

    def verify(self, bundle: RowBundle, rng: np.random.Generator) -> Verdict:
        held = bool(bundle.tokens) and isinstance(bundle.proposers[0], HeldBonus)
        if not all(p.draws_from_model for p in bundle.proposers[int(held):]):
            raise ValueError("CoSpec arbitration needs a model draft's proposals (its features read the draft's "
                             "distribution), not n-gram ones: use --draft-source model")
        self._spent, self._seen = 0.0, 0
        verdict = self._review_held_bonus(bundle, rng) if held else None
        if verdict is None:
            verdict = verify_run(bundle, rng, lambda j, choice: self._keep(bundle, j, choice, rng), first=int(held))
            if held and self._held_mismatch:
                verdict.mismatches += 1
        self._fold_agreements(verdict.num_accepted)
        verdict.seconds = self._spent
        return verdict
