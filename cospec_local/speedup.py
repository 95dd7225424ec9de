"""The formulas that predict a mode's speed from its acceptance and costs (algorithms.md), which
each mode's `predict` applies for `bench`: alpha = per-token acceptance, gamma = draft length,
c = one draft call over one target call, verify_ratio = a verification call over a one-token call."""

from __future__ import annotations


def predicted_speedup(alpha: float, gamma: float, c: float) -> float:
    """Expected wall-time speedup of speculative decoding (draft length gamma, cost ratio c)."""
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def predicted_speedup_with_verify_cost(alpha: float, gamma: float, c: float, verify_ratio: float) -> float:
    """The same expectation when verifying gamma + 1 tokens costs `verify_ratio` target calls
    instead of one (on CPUs every verified row pays the output head: Gemma's 262k-wide head
    makes a 6-row verification cost ~3.6 single-token calls here)."""
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + verify_ratio)


def predicted_cos_naive_speedup(alpha: float, gamma: float, c: float, verify_ratio: float = 1.0) -> float:
    """Naive CoS over collaborative decoding: g draft calls and one target call per cycle give
    (1 - a^g) / (1 - a) tokens (no bonus); collab pays 1 + c per token. `verify_ratio`: the
    target's verification call in single-call units (1 in the paper's model)."""
    tokens = gamma if alpha >= 1.0 else (1 - alpha**gamma) / (1 - alpha)
    return (1 + c) * tokens / (gamma * c + verify_ratio)


def predicted_apf_speedup(alpha: float, gamma_q: int, gamma_p: int, c: float, verify_ratio: float = 1.0) -> float:
    """CoS with the Alternate Proposal Framework over collaborative decoding (two models, the
    paper's formula): (1 - a^gq)(1 + c) / ((1 - a)(1 + c gq - a^gp c)), with the target's call
    (the 1 in the denominator) replaced by `verify_ratio` when rows are not free."""
    if alpha >= 1.0:
        return gamma_q * (1 + c) / (verify_ratio + c * gamma_q - c)
    return (1 - alpha**gamma_q) * (1 + c) / ((1 - alpha) * (verify_ratio + c * gamma_q - alpha**gamma_p * c))
