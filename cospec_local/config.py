"""One configuration object for decoding, shared by the CLI flags and the Python API.

The CLI builds its options from the field metadata below, so a default changes in one place only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .sampling import SamplingParams

MODES = ("spec", "target", "draft")


def _opt(default, help: str, flag: str | None = None):
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode one reply. `mode`: 'spec' (draft proposes, target verifies: the default),
    'target' (target alone: the baseline) or 'draft' (draft alone)."""

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
    mode: str = _opt("spec", "Decoding mode: spec, target or draft.")
    draft_max: int = _opt(
        6, "Maximum draft tokens per verification (k); on the CPU at most 6, so that the target's "
        "7-token verification batch gives bit-identical logits to target-only decoding.", flag="-k/--draft-max"
    )
    draft_p_min: float = _opt(0.3, "Stop drafting when the draft's top probability falls below this.")
    adaptive: bool = _opt(True, "Adapt the draft length to measured acceptance and costs.")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.draft_max < 1:
            raise ValueError("draft_max must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        self.sampling  # validates top_k/top_p/min_p

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    def with_(self, **changes) -> "GenerationConfig":
        """A copy with some fields changed (None values are ignored, for CLI plumbing)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def config_fields():
    """(name, type default, help, flag) for every GenerationConfig field: the CLI's option list."""
    return [(f.name, f.default, f.metadata["help"], f.metadata["flag"]) for f in fields(GenerationConfig)]
