"""Goodness-of-fit helpers for the statistical tests (no scipy dependency)."""

import math

import numpy as np


def chi2_critical(df: int, alpha: float = 1e-3) -> float:
    """Upper `alpha` quantile of the chi-square distribution (Wilson-Hilferty approximation)."""
    z = {1e-2: 2.326, 1e-3: 3.090, 1e-4: 3.719}[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(counts: np.ndarray, probs: np.ndarray, alpha: float = 1e-3) -> None:
    """Chi-square test that `counts` were drawn from `probs` (bins with tiny expectation pooled)."""
    counts = np.asarray(counts, dtype=float)
    probs = np.asarray(probs, dtype=float) / np.sum(probs)
    n = counts.sum()
    expected = probs * n
    assert counts[expected == 0].sum() == 0, "drew a token the target gives probability 0"
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    assert df >= 1
    assert stat < chi2_critical(df, alpha), f"chi2={stat:.1f} >= critical {chi2_critical(df, alpha):.1f} (df={df})"


def two_token_law(path, prompt: list[int], params) -> dict[tuple[int, int], float]:
    """{(a, b): P(first token a, second token b)} of target-only sampling with `params` after
    `prompt`, computed exactly by a fresh context of the GGUF at `path`."""
    from cospec_local.backend import LlamaModel, LoadOptions
    from cospec_local.sampling import logits_to_probs

    with LlamaModel(path, LoadOptions(n_ctx=512, n_threads=1, load_mtp=False)) as fresh:
        def law(context):
            fresh.reset()
            return logits_to_probs(np.array(fresh.eval(context, 1)[0], dtype=np.float64), params)

        first = law(prompt)
        return {(int(a), b): first[a] * q for a in np.flatnonzero(first) for b, q in enumerate(law(prompt + [int(a)])) if q > 0}


def sampled_counts(generate, cells: dict, n_seeds: int) -> tuple[np.ndarray, int]:
    """Counts of each cell (a tuple of emitted tokens) over `generate(seed)` for seeds 0..n_seeds-1
    (GenerationResults), in `cells`' order, and how many of the runs rejected a proposal."""
    index = {cell: i for i, cell in enumerate(cells)}
    counts = np.zeros(len(cells))
    rejected = 0
    for seed in range(n_seeds):
        out = generate(seed)
        counts[index[tuple(out.tokens)]] += 1
        rejected += out.stats.n_accepted < out.stats.n_drafted
    return counts, rejected
