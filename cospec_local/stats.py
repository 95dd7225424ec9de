"""What one generation measured: counts and timings, and the figures derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


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
    n_forced: int = 0  # tokens the grammar alone allowed, emitted with no model call
    n_mismatches: int = 0  # proposed tokens verification rejected (before any arbiter)
    n_overrides: int = 0  # cospec: of those, proposed tokens the arbiter kept
    t_prefill: float = 0.0
    t_decode: float = 0.0
    t_arbiter: float = 0.0  # cospec: computing features and scoring the policy (inside t_overhead)
    t_llama: float = 0.0  # seconds inside llama_decode (prefill and decode, every model)
    t_state_copies: float = 0.0  # hybrid/recurrent models: saving and restoring recurrent states
    t_grammar: float = 0.0  # constrained decoding: masks, consuming and rolling back grammar states
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

    def add(self, other: "GenerationStats") -> "GenerationStats":
        """Add another generation's counts and times to these (totals over many generations are
        GenerationStats too, so every derived figure has one definition); returns self."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, dict):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            elif isinstance(mine, (int, float)):
                setattr(self, f.name, mine + theirs)
        return self

    @property
    def target_calls_per_token(self) -> float:
        """Target calls per generated token (CoSpec's cost, what its reward charges)."""
        return self.model_calls.get("target", 0) / self.n_generated if self.n_generated else 0.0

    def count_verification(self, n_verified: int, verdict, n_held: int = 0) -> None:
        """Count one verification of `n_verified` proposed tokens (0: a plain step) after `n_held`
        held bonus tokens (greedy cospec: not proposals, not counted as drafted)."""
        self.n_mismatches += verdict.mismatches
        self.n_overrides += verdict.overrides
        self.t_arbiter += verdict.seconds
        accepted = max(verdict.num_accepted - n_held, 0)
        if n_verified:
            self.n_cycles += 1
            self.n_drafted += n_verified
            self.n_accepted += accepted
            self.accepted_lengths.append(accepted)
            self.draft_lengths.append(n_verified)
        elif not n_held:
            self.n_target_steps += 1

    def summary(self) -> dict:
        """The derived figures, the one place each is defined (reports, the CLI, the server)."""
        return {
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "tokens_per_second": self.tokens_per_second,
            "t_draft": self.t_draft,
            "t_target": self.t_target,
            "total_model_calls": self.total_model_calls,
            "model_calls_per_token": self.model_calls_per_token,
            "target_calls_per_token": self.target_calls_per_token,
            "t_overhead": self.t_overhead,
            "overhead_share": self.t_overhead / self.t_decode if self.t_decode else 0.0,
            "outside_llama_per_token": self.outside_llama_per_token,
        }

    def as_dict(self) -> dict:
        """Every count and time, and the summary: JSON-ready."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("accepted_lengths", "draft_lengths")}
        d.update(self.summary(), accepted_lengths=list(self.accepted_lengths), draft_lengths=list(self.draft_lengths))
        return d
