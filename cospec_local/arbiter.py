"""CoSpec: a learned arbiter decides, where draft and target disagree, whose token to keep.

Plain speculative decoding treats the target as the only authority. In `--mode cospec` the draft
proposes every token (no bonus token: the target's rows cover exactly the proposed positions), and
at a *mismatch* (greedy: the draft's token is not the target's argmax; sampled: the rejection test
failed) a policy scores a row of cheap features. Above the threshold the draft's token is kept
(provenance ARBITRATED) and verification goes on over the rest of the run with the target rows
already computed in the same batch (they were conditioned on that token); otherwise the target's
token is taken as in plain SD. So a policy that always defers gives plain SD's output, and one that
always keeps gives the draft's.

Feature schema (version 2): one float32 row per mismatch, built from what the loop already has:
the draft's distribution q and the target's p at that position (greedy: plain softmaxes), the
draft's token x and the target's choice y, and the reply's history. All are model-agnostic (no
token identities), so one policy can serve other pairs, and none depends on where the draft's runs
happen to be cut (the draft length adapts to timings), so greedy output is reproducible.
Policies are trained on greedy rollouts; at temperature > 0 the features come from the processed
(filtered, tempered) distributions, outside what they saw in training.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CospecError
from .verify import RowBundle, Verdict, verify_run

SCHEMA_VERSION = "2"
# The policy shipped with the library (trained on the test-world family: `models/family/README.md`).
DEFAULT_POLICY = Path(__file__).parent / "data" / "cospec_policy.onnx"

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
}
FEATURE_NAMES = tuple(FEATURES)


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


def mismatch_features(bundle: RowBundle, j: int, target_choice: int, position: int, since_mismatch: int,
                      recent_acceptance: float) -> np.ndarray:
    """The schema-2 feature row for a mismatch at position j of the bundle (proposer = slot of
    token j, judge = the combination's single member); `position` counts the reply's tokens
    before it, `since_mismatch` the tokens since the previous mismatch."""
    x = bundle.tokens[j]
    q_row = bundle.proposal_probs(j)
    p = bundle.combined(j)  # the target's processed (greedy: plain softmax) distribution
    q_dense = q_row.draft_probs if hasattr(q_row, "draft_probs") else q_row
    p_x = float(p[x])
    return np.array(
        [
            float(q_row[x]),
            float(q_row[target_choice]),
            float(p[target_choice]),
            p_x,
            _entropy(q_dense),
            _entropy(p),
            _margin(q_dense),
            _margin(p),
            math.log1p(int(np.count_nonzero(p > p_x))),
            math.log1p(since_mismatch) / 5.0,
            math.log1p(position) / 5.0,
            recent_acceptance,
        ],
        dtype=np.float32,
    )


class OnnxPolicy:
    """An arbitration policy exported to ONNX: input `features` float32 [1, F] in the order of its
    metadata's feature names, output the probability of keeping the draft's token, [1, 1]."""

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
        if version != SCHEMA_VERSION:
            raise PolicyError(f"{path.name}: feature schema {version!r}, this runtime computes schema {SCHEMA_VERSION!r}")
        names = tuple(n for n in meta.get("cospec.feature_names", "").split(",") if n)
        unknown = [n for n in names if n not in FEATURES]
        if not names or unknown:
            raise PolicyError(f"{path.name}: unknown feature names {unknown or '(none listed)'}; known: {', '.join(FEATURE_NAMES)}")
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].shape[-1] != len(names):
            raise PolicyError(
                f"{path.name}: the network takes {[i.shape for i in inputs]} but its metadata lists {len(names)} features"
            )
        self.feature_names = names
        self._columns = np.array([FEATURE_NAMES.index(n) for n in names])
        # One input row and one output buffer, bound once: a call copies the features into the row.
        self._row = np.zeros((1, len(names)), dtype=np.float32)
        self._out = np.zeros((1, 1), dtype=np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(inputs[0].name, self._row)
        self._binding.bind_output(self.session.get_outputs()[0].name, "cpu", 0, np.float32, [1, 1], self._out.ctypes.data)

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
    _n_generated: int = 0
    _last_mismatch: int = -1  # position of the reply's previous mismatch
    _spent: float = 0.0  # seconds of features and policy scoring in the current verification
    _seen: int = 0  # bundle positions already folded into the recent acceptance

    def start(self) -> None:
        """Forget the previous reply's running statistics (called at the start of each reply)."""
        self._recent, self._n_generated, self._last_mismatch = 1.0, 0, -1
        self.decisions = []

    def _fold_agreements(self, upto: int) -> None:
        """Count the agreeing tokens at bundle positions _seen..upto-1 in the recent acceptance."""
        for _ in range(upto - self._seen):
            self._recent = self.acceptance_decay * self._recent + (1 - self.acceptance_decay)
        self._seen = max(self._seen, upto)

    def _keep(self, bundle, j, choice, rng) -> bool:
        t0 = time.perf_counter()
        self._fold_agreements(j)
        self._recent = self.acceptance_decay * self._recent  # this mismatch
        self._seen = j + 1
        position = self._n_generated + j
        features = mismatch_features(bundle, j, choice, position, position - self._last_mismatch - 1, self._recent)
        self._last_mismatch = position
        prob = self.policy.keep_probability(features)
        kept = bool(rng.random() < prob) if self.stochastic else prob > self.threshold
        if self.stochastic:
            self.decisions.append(Decision(features, kept))
        self._spent += time.perf_counter() - t0
        return kept

    def verify(self, bundle: RowBundle, rng: np.random.Generator) -> Verdict:
        if not all(p.draws_from_model for p in bundle.proposers):
            raise ValueError("CoSpec arbitration needs a model draft's proposals (its features read the draft's "
                             "distribution), not n-gram ones: use --draft-source model")
        self._spent, self._seen = 0.0, 0
        verdict = verify_run(bundle, rng, lambda j, choice: self._keep(bundle, j, choice, rng))
        self._fold_agreements(verdict.num_accepted)
        self._n_generated += verdict.num_accepted + (verdict.next_token is not None)
        verdict.seconds = self._spent
        return verdict
