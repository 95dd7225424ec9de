"""How many tokens the draft proposes each cycle, chosen from measured acceptance and costs."""

from __future__ import annotations

# A probe after many target-only steps feeds the draft at most this many recent tokens.
CATCH_UP_WINDOW = 16


class AdaptiveDraftLength:
    """Chooses k for the next cycle (k = 0: a plain target step) from measurements.

    Two questions, two measurements:
    - *How long a draft?* With per-token acceptance alpha a cycle drafting k tokens yields
      (1 - alpha^(k+1)) / (1 - alpha) tokens and costs k * t_draft + t_verify(k + 1), where
      t_verify(n) = a + b * n is fitted online to the target's call times (on CPUs each verified
      row pays a full pass of the output head, so b matters). We pick the k >= 1 with the lowest
      expected time per token.
    - *Draft at all?* The model can be wrong (catch-up batches, confidence stops), so we compare
      the MEASURED seconds per emitted token of drafting cycles and of plain target steps, and use
      the faster. The slower one is re-tried now and then (probe); its interval grows 4x while it
      stays slower. A probe after a long run of target steps re-feeds the draft only the last
      `CATCH_UP_WINDOW` tokens instead of everything it missed, so a useless draft costs a few
      percent at most.
    The policy lives in the conversation (`engine.Conversation`), so what it learned carries over
    to that conversation's next call. The cap on k is given per call (`choose(k_max)`), so a later
    call with a larger `-k` drafts up to its own cap.
    """

    FIRST_PROBE, PROBE_GROWTH, LAST_PROBE = 8, 4, 256

    def __init__(self, decay: float = 0.9, probe_growth: int | None = None, cycle_decay: float = 0.8,
                 full_length: bool = False):
        self.decay = decay
        # Always propose k_max when drafting (n-gram lookups: a proposal costs nothing, and the
        # linear row-cost fit, learned mostly from 1- and 2-row calls, overprices long ones).
        self.full_length = full_length
        self.cycle_decay = cycle_decay  # per-cycle decay of the measured seconds and tokens
        self.probe_growth = probe_growth or self.PROBE_GROWTH
        # Acceptance counts with a prior of 0.8 worth two observations: start by drafting.
        self.successes, self.failures = 1.6, 0.4
        self.t_draft: float | None = None  # seconds per draft step (EMA)
        # Decayed sufficient statistics of (rows, seconds) for the target's call-time line.
        self._s = (0.0, 0.0, 0.0, 0.0, 0.0)  # sum w, w*n, w*n^2, w*t, w*n*t (plain floats: cheap per step)
        # Measured seconds and tokens of drafting cycles and of target steps, decayed sums: their
        # ratio is the expected time per token (an average of per-cycle ratios would let one
        # fully rejected cycle, 1 token for a whole verification, outweigh several good ones).
        self._spec = (0.0, 0.0)
        self._target = (0.0, 0.0)
        self.since_probe = 0
        self.probe_every = self.FIRST_PROBE

    @property
    def alpha(self) -> float:
        return self.successes / (self.successes + self.failures)

    def verify_time(self, n_rows: int) -> float:
        s0, sn, snn, st, snt = self._s
        if s0 <= 0:
            return 0.0
        mean_n, mean_t = sn / s0, st / s0
        var = snn / s0 - mean_n**2
        # Until two row counts have been seen, assume each extra row costs 30% of a call.
        slope = (snt / s0 - mean_n * mean_t) / var if var > 1e-6 else 0.3 * mean_t / max(mean_n, 1)
        return max(mean_t + max(slope, 0.0) * (n_rows - mean_n), 1e-6)

    def best_draft_length(self, k_max: int) -> int:
        """The k in [1, k_max] with the lowest modelled time per token (0 when k_max < 1)."""
        if k_max < 1:
            return 0
        if self.full_length or self.t_draft is None or self._s[0] <= 0:
            return k_max
        alpha = min(self.alpha, 0.999)
        def time_per_token(k: int) -> float:
            return (k * self.t_draft + self.verify_time(k + 1)) * (1 - alpha) / (1 - alpha ** (k + 1))

        return min(range(1, k_max + 1), key=time_per_token)

    def expected_tokens_per_second(self, k: int) -> float:
        """Modelled emitted tokens per second of a cycle proposing k tokens: (1 - alpha^(k+1)) /
        (1 - alpha) tokens for k draft steps (free for a proposer that never measured one, such as
        the n-gram lookup) and a (k + 1)-row verification."""
        alpha = min(self.alpha, 0.999)
        tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
        seconds = k * (self.t_draft or 0.0) + self.verify_time(k + 1)
        return tokens / max(seconds, 1e-9)

    @property
    def drafting_loses(self) -> bool:
        """True once measurements say plain target steps are faster."""
        return self.spec_tpt is not None and self.target_tpt is not None and self.spec_tpt > self.target_tpt

    def choose(self, k_max: int) -> int:
        """k for the next cycle: 0 (a plain target step) or 1..k_max."""
        if k_max < 1:  # no room left for a draft token
            return 0
        # The best k is modelled only when drafting is chosen (the per-step cost of target steps).
        if self.spec_tpt is None:
            return self.best_draft_length(k_max)
        if self.target_tpt is None:
            # No plain target step measured yet: try one, unless proposals are free (n-gram), which
            # then keep going (with a model draft beside it, target steps may not come for long).
            return k_max if self.full_length else 0
        drafting_wins = self.spec_tpt <= self.target_tpt
        self.since_probe += 1
        if self.since_probe >= self.probe_every:  # re-try the losing option
            self.since_probe = 0
            self.probe_every = min(self.probe_every * self.probe_growth, self.LAST_PROBE)
            drafting_wins = not drafting_wins
        return self.best_draft_length(k_max) if drafting_wins else 0

    def new_input(self) -> None:
        """Forget what was learned about acceptance and about drafting's time per token (kept: the
        target's cost fit and its plain-step time, and the draft's step time). For sources whose usefulness depends on the
        input itself, such as n-gram lookups, at each new generation."""
        self.successes, self.failures = 1.6, 0.4
        self._spec = (0.0, 0.0)  # the target-step time (_target) does not depend on the input: kept
        self.since_probe = 0
        self.probe_every = self.FIRST_PROBE

    @property
    def spec_tpt(self) -> float | None:
        """Measured seconds per emitted token of drafting cycles (None before the first)."""
        return self._spec[0] / self._spec[1] if self._spec[1] else None

    @property
    def target_tpt(self) -> float | None:
        """Measured seconds per token of plain target steps (None before the first)."""
        return self._target[0] / self._target[1] if self._target[1] else None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def observe_cycle(self, k: int, seconds: float, n_tokens: int) -> None:
        """A whole cycle: k drafted (0 = target step), `n_tokens` emitted in `seconds`."""
        was_winning = None if self.spec_tpt is None or self.target_tpt is None else not self.drafting_loses
        d = self.cycle_decay
        if k == 0:
            t, n = self._target
            self._target = (d * t + seconds, d * n + n_tokens)
        else:
            t, n = self._spec
            self._spec = (d * t + seconds, d * n + n_tokens)
        if was_winning is not None and was_winning == self.drafting_loses:
            self.probe_every = self.FIRST_PROBE  # the winner changed: probe often again

    def observe_target(self, n_rows: int, seconds: float) -> None:
        d = self.decay
        s0, sn, snn, st, snt = self._s
        self._s = (d * s0 + 1.0, d * sn + n_rows, d * snn + n_rows * n_rows, d * st + seconds, d * snt + n_rows * seconds)

    def observe_draft_step(self, seconds: float) -> None:
        self.t_draft = self._ema(self.t_draft, seconds)

    def observe_acceptance(self, n_proposed: int, n_accepted: int) -> None:
        self.successes = self.decay * self.successes + n_accepted
        self.failures = self.decay * self.failures + (1 if n_accepted < n_proposed else 0)
