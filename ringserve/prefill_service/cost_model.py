"""CostModel: a prefill pass's predicted time, fitted to measured passes (the scheduler sizes
chunks with it; calibration seeds it at start)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from ringserve.errors import InvalidArgument

_MIN_FIT_OBSERVATIONS = 3
_RIDGE = 1e-9  # relative to the (unit) diagonal of the scaled normal equations


def _features(work: Sequence[tuple[int, int]]) -> tuple[float, float, float, float]:
    """(1, S, sum c, sum c*(d + c/2)) of a pass with sequences (c new tokens, d tokens before)."""
    return (
        1.0,
        float(len(work)),
        float(sum(c for c, _ in work)),
        float(sum(c * (d + c / 2) for c, d in work)),
    )


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a small dense system by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


class CostModel:
    """Predicted seconds of one pass, fitted to measured pass times.

    pass_s = fixed + per_sequence * S + per_token * sum(c_i) + per_pair * sum(c_i * (d_i + c_i / 2))
    where a pass holds S sequences, sequence i computing c_i new tokens after d_i earlier ones (the
    last term is causal attention work).

    The fit keeps the last ``window`` passes, plus the calibration passes (``calibrate``) for good,
    and minimises relative error (a 50 ms pass counts as much as a 5 s one) under non-negative
    coefficients. Until 3 passes have been observed it predicts with ``prior``, so a scheduler can
    run before calibration.
    """

    def __init__(self, window: int = 256, *, prior: tuple[float, float, float, float] = (0.0, 0.0, 1e-4, 1e-9)):
        if window < _MIN_FIT_OBSERVATIONS:
            raise InvalidArgument(f"cost model window must be >= {_MIN_FIT_OBSERVATIONS} passes, got {window}")
        if len(prior) != 4 or any(p < 0 for p in prior):
            raise InvalidArgument(f"cost model prior must be 4 non-negative coefficients, got {prior!r}")
        self._rows: deque[tuple[tuple[float, float, float, float], float]] = deque(maxlen=window)
        self._anchors: list[tuple[tuple[float, float, float, float], float]] = []
        self._prior = tuple(float(p) for p in prior)
        self._coefficients = self._prior
        self._stale = False
        self._learns = True

    @property
    def fitted(self) -> bool:
        """Whether predictions come from observed passes (at least 3) rather than the prior."""
        return len(self._rows) + len(self._anchors) >= _MIN_FIT_OBSERVATIONS

    def __repr__(self) -> str:
        fixed, per_seq, per_token, per_pair = self.coefficients
        return (
            f"CostModel(fixed={fixed * 1e3:.2f} ms, per_sequence={per_seq * 1e3:.2f} ms, "
            f"per_token={per_token * 1e6:.2f} us, per_token_pair={per_pair * 1e9:.3f} ns, fitted={self.fitted})"
        )

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """(fixed, per_sequence, per_token, per_pair) in use now."""
        if self._stale:
            self._coefficients = self._fit()
            self._stale = False
        return self._coefficients

    def predict(self, work: Sequence[tuple[int, int]]) -> float:
        """Predicted seconds of a pass; ``work`` holds (new tokens c, tokens before d) per sequence."""
        return sum(w * x for w, x in zip(self.coefficients, _features(work)))

    def remaining_s(self, num_tokens: int, num_done: int) -> float:
        """Predicted seconds to compute the rest of one prompt, as if in one pass alone."""
        return self.predict([(num_tokens - num_done, num_done)])

    def calibrate(self, passes: Sequence[tuple[Sequence[tuple[int, int]], Sequence[float]]]) -> None:
        """Seed the model from timed calibration passes, each (its sequences, its measured times).
        Each shape counts once, at its fastest time: whatever else runs on the device (the other
        tier starting beside this one, a first-call kernel plan) only slows a pass, so the fastest
        of several runs is the pass itself. These points stay in every later fit, beside the window
        of real passes, so a run of one kind of traffic cannot unlearn the shapes it does not visit."""
        if not passes or any(not work or not times or min(times) <= 0 for work, times in passes):
            raise InvalidArgument("calibrate() needs, for every pass, its sequences and positive measured times")
        self._anchors = [(_features(work), min(times)) for work, times in passes]
        self._stale = self.fitted

    def frozen(self) -> CostModel:
        """A copy that predicts with the coefficients in use now and learns nothing (to plan ahead)."""
        copy = CostModel(prior=self.coefficients)
        copy._learns = False
        return copy

    def observe(self, work: Sequence[tuple[int, int]], seconds: float) -> None:
        """Record a measured pass; the fit is redone on the next prediction."""
        if not work:
            raise InvalidArgument("observe() needs the pass's sequences; an empty pass has no measured cost")
        if not seconds > 0:
            raise InvalidArgument(f"a pass's measured time must be > 0 seconds, got {seconds}")
        if not self._learns:
            return
        self._rows.append((_features(work), seconds))
        self._stale = self.fitted

    def _fit(self) -> tuple[float, float, float, float]:
        # Relative error: row x/s should predict 1. Normal equations A beta = b.
        rows = [[x / s for x in feats] for feats, s in [*self._anchors, *self._rows]]
        a = [[sum(r[i] * r[j] for r in rows) for j in range(4)] for i in range(4)]
        b = [sum(r[i] for r in rows) for i in range(4)]
        # A feature that never varied from 0 carries no information: leave it out.
        active = [i for i in range(4) if a[i][i] > 0]
        while active:
            # Scale to a unit diagonal: the features differ by ~10 orders of magnitude.
            scale = [math.sqrt(a[i][i]) for i in active]
            sub = [
                [a[i][j] / (si * sj) + (_RIDGE if i == j else 0.0) for j, sj in zip(active, scale)]
                for i, si in zip(active, scale)
            ]
            beta = [y / si for y, si in zip(_solve(sub, [b[i] / si for i, si in zip(active, scale)]), scale)]
            worst = min(range(len(active)), key=lambda k: beta[k])
            if beta[worst] >= 0:
                coefficients = [0.0] * 4
                for i, v in zip(active, beta):
                    coefficients[i] = v
                return tuple(coefficients)
            # A negative cost is not physical (collinear or too little data): drop it and refit.
            del active[worst]
        return (0.0, 0.0, 0.0, 0.0)
