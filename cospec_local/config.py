"""One configuration object for decoding, shared by the CLI flags and the Python API.

The CLI builds its options from the field metadata below, so a default changes in one place only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .sampling import SamplingParams

MODES = ("spec", "target", "draft", "collab", "cos", "cos-naive", "cospec")
COMBINATIONS = ("we", "cd")
DRAFT_SOURCES = ("model", "ngram", "ngram+model", "mtp", "ngram+mtp")
DEFAULT_DRAFT_MAX = 6
GRAMMAR_ASSISTS = ("verify", "drafts", "forced")
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


def _opt(default, help: str, flag: str | None = None, items: type | None = None):
    """A config field; `items` marks a tuple field given on the command line as 'a,b,c'."""
    return field(default=default, metadata={"help": help, "flag": flag, "items": items})


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode one reply. `mode`: 'spec' (draft proposes, target verifies: the default),
    'target' (target alone: the baseline), 'draft' (draft alone), or a collaborative mode whose
    output follows a combination r of every model ('collab': all models score every token, the
    reference; 'cos': collaborative decoding via speculation with alternating proposers;
    'cos-naive': the draft proposes, r verifies), or 'cospec' (speculative decoding where a learned
    policy may keep the draft's token at a mismatch). Per-model values (`weights`, `gamma`) are in
    the order draft, target, then extra models."""

    max_tokens: int = _opt(256, "Maximum number of tokens to generate.")
    temperature: float = _opt(0.8, "Sampling temperature; 0 = greedy.")
    top_k: int = _opt(40, "Keep the k most likely tokens (0 = off).")
    top_p: float = _opt(0.95, "Nucleus sampling mass (1.0 = off).")
    min_p: float = _opt(0.05, "Drop tokens below min_p x the top probability (0 = off).")
    seed: int | None = _opt(
        None, "Random seed (default: fresh entropy). Reproduces tokens exactly with --no-adaptive; "
        "the adaptive draft length follows timings, so with it a seed fixes only the distribution."
    )
    stop: tuple[str, ...] = _opt((), "Stop when this string is generated (repeatable).")
    logprobs: int | None = _opt(None, "Report each emitted token's log probability under the distribution the output "
                                "follows (the target's, or r's in the collaborative modes; processed by temperature and "
                                "filters when sampling, plain softmax when greedy; masked by a grammar) and its N most "
                                "likely alternatives (0: the token's alone; at most 20).")
    mode: str = _opt("spec", "Decoding mode: spec, target, draft, collab, cos, cos-naive or cospec.")
    draft_max: int = _opt(
        DEFAULT_DRAFT_MAX, "Maximum draft tokens per verification (k); on the CPU at most 6, so that the target's "
        "7-token verification batch gives bit-identical logits to target-only decoding. cospec's batch has no bonus "
        "row, so there the draft writes up to k + 1 tokens.", flag="-k/--draft-max"
    )
    draft_source: str = _opt("ngram+model", "spec mode (other modes ignore it): who proposes: ngram+model (the proposer chain: "
                             "each cycle, an n-gram match in the context or the draft model, whichever promises more tokens per "
                             "second; measured as fast as the draft alone on open-ended prompts and faster on grounded ones), "
                             "model (the draft alone), or ngram (prompt lookup alone: tokens that followed the context's latest "
                             "suffix earlier in it; no draft model needed), mtp (the target's own multi-token-prediction layers, "
                             "Qwen3.5/3.6 GGUFs that carry them; no draft model needed) or ngram+mtp.")
    draft_p_min: float = _opt(0.3, "Stop drafting when the draft's top probability falls below this.")
    grammar_assist: str = _opt("forced", "With a grammar (--json-schema, --grammar): how speculation uses it: verify (mask the "
                               "verified rows only), drafts (also mask draft rows and cut n-gram proposals at a forbidden token), "
                               "forced (also emit tokens the grammar alone allows with no model call, and propose the bytes it "
                               "forces for free).")
    adaptive: bool = _opt(True, "Adapt the draft length to measured acceptance and costs (spec mode).")
    combine: str = _opt("we", "Collaborative modes: how r combines the models: we (weighted ensemble of "
                        "probabilities) or cd (contrastive decoding: target logits - mu x draft logits).")
    weights: tuple[float, ...] | None = _opt(
        None, "Weighted-ensemble weights, one per model (draft, target, extra models), e.g. 0.5,0.5; default equal.",
        items=float)
    mu: float = _opt(0.1, "Contrastive-decoding strength (r = softmax((l_target - mu l_draft) / T)).")
    policy: str | None = _opt(None, "CoSpec: the ONNX arbitration policy (default: the one shipped for the test-world family; for models with another vocabulary, the shipped model-agnostic one).")
    threshold: float = _opt(0.5, "CoSpec: keep the draft's token at a mismatch when the policy's keep probability exceeds this.")
    gamma: tuple[int, ...] | None = _opt(
        None, "CoS proposal length per model (draft, target, extra models), e.g. 5,1; default: "
        "--draft-max + 1 - (number of models) for the draft (room for the others' bonus tokens in a verification batch), 1 for the others.", items=int)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError("seed must be >= 0 (leave it unset for fresh entropy)")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.draft_max < 1:
            raise ValueError("draft_max must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.draft_source not in DRAFT_SOURCES:
            raise ValueError(f"draft_source must be one of {DRAFT_SOURCES}, not {self.draft_source!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if self.grammar_assist not in GRAMMAR_ASSISTS:
            raise ValueError(f"grammar_assist must be one of {GRAMMAR_ASSISTS}, not {self.grammar_assist!r}")
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, not {self.combine!r}")
        if self.mu < 0:
            raise ValueError("mu must be >= 0")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError("weights must be >= 0 and not all 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        if self.gamma is not None and min(self.gamma) < 1:
            raise ValueError("every gamma must be >= 1")
        self.sampling  # validates top_k/top_p/min_p

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    def with_(self, **changes) -> "GenerationConfig":
        """A copy with some fields changed (None values are ignored, for CLI plumbing)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def config_fields():
    """(name, default, help, flag, items) for every GenerationConfig field: the CLI's option list."""
    return [(f.name, f.default, f.metadata["help"], f.metadata["flag"], f.metadata["items"]) for f in fields(GenerationConfig)]


def parse_list(text: str, items: type) -> tuple:
    """'0.5,0.5' -> (0.5, 0.5); raises ValueError naming the bad value."""
    try:
        return tuple(items(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated {items.__name__} values, got {text!r}") from None
