"""When is a count of off channels more than noise gives? Pure functions of numbers, no torch.

A channel is off when its difference from the running stats is beyond `z` estimated sds of noise
(and beyond the effect-size limits). That sd comes from K batches, so under a healthy layer
the ratio follows Student's t with K − 1 degrees of freedom, not a normal: |t| > 4 has
probability 6.3e-5 for a normal, 0.028 with K = 4 batches. Each channel is tested twice (mean,
variance), so a healthy channel is off with probability at most p0 = 2·P(|t_{K−1}| > z) (a union
bound, whatever the dependence of the two tests). A layer is judged by the count of its off
channels against Binomial(C, p0): stale only when that count is also unlikely from noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_OFF_CHANNELS = 2  # one outlying channel is not a stale layer (fewer in a 1-channel layer)
TESTS_PER_CHANNEL = 2  # mean and variance


def normal_tail(z: float) -> float:
    """Two-sided P(|Z| > z) of a standard normal."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def t_tail(t: float, dof: float) -> float:
    """Two-sided P(|T| > t) of Student's t with `dof` degrees of freedom; normal when inf."""
    if not dof > 0:
        raise ValueError(f"t_tail needs dof > 0, got dof={dof}")
    if math.isinf(dof):
        return normal_tail(t)
    t = abs(t)
    if t == 0:
        return 1.0
    if math.isinf(t):
        return 0.0
    # P(|T| > t) = I_x(dof/2, 1/2) with x = dof/(dof + t²) (Abramowitz & Stegun 26.7.1); 1 − x
    # is computed on its own, since it is all that is left of x when t is tiny.
    total = dof + t * t
    return _beta_inc(dof / 2.0, 0.5, dof / total, t * t / total)


def beta_inc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 ≤ x ≤ 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"beta_inc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    return _beta_inc(a, b, x, 1.0 - x)


def _beta_inc(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) with y = 1 − x: Lentz's continued fraction (Numerical Recipes 6.4), on the
    side of x where it converges fast; the other side by I_x(a, b) = 1 − I_y(b, a)."""
    if x <= 0.0 or y <= 0.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_inc(b, a, y, x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)  # whichever of x, y is exact
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * log_y
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"beta_inc did not converge for a={a}, b={b}, x={x}")  # pragma: no cover


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return beta_inc(k, n - k + 1, p)  # the binomial tail as an incomplete beta (A&S 26.5.24)


def off_probability(z: float, batches: int) -> float:
    """p0: the most a healthy channel is off by noise alone at `z` sds with K batches.

    The t tail with K − 1 degrees of freedom, never less than the normal one it tends to,
    for each of the two tests of a channel.
    """
    if batches < 2:
        return 1.0  # no sd at all from one batch
    return min(1.0, TESTS_PER_CHANNEL * t_tail(z, batches - 1))


def noise_p(off: int, channels: int, batches: int, z: float) -> float:
    """P(noise alone puts at least `off` of `channels` channels off): the layer's p-value."""
    return binomial_tail(off, channels, off_probability(z, batches))


@dataclass(frozen=True)
class CountRule:
    """How many off channels make a layer verdict: the share, the minimum, the significance."""

    fraction: float  # at least this share of the channels (`stale_fraction`)
    alpha: float  # and a count noise alone reaches with probability below this (`stale_alpha`)

    def minimum(self, channels: int) -> int:
        """Fewest off channels for a verdict before significance: the share, and at least 2."""
        # The smallest k with k/C >= fraction, compared exactly as the fraction is (0.1·30
        # is 3.0000000000000004 in floating point, yet 3 of 30 channels are 10 %).
        k = max(math.ceil(self.fraction * channels), 0)
        while k > 0 and (k - 1) / channels >= self.fraction:
            k -= 1
        while channels and k / channels < self.fraction:
            k += 1
        return max(k, min(MIN_OFF_CHANNELS, channels), 1)

    def holds(self, off: int, channels: int, p: float) -> bool:
        """The count rule on `off` off channels of `channels`, whose noise p-value is `p`."""
        return off >= self.minimum(channels) and p < self.alpha

    def needed(self, channels: int, batches: int, z: float) -> int:
        """Fewest off channels that make a verdict with K batches (above C: none can)."""
        low = self.minimum(channels)
        if not judgeable(channels, batches, z, self.alpha):
            return max(low, channels + 1)
        p0 = off_probability(z, batches)
        high = max(low, channels)  # the tail falls with the count: bisect for the first below
        while low < high:
            mid = (low + high) // 2
            if binomial_tail(mid, channels, p0) < self.alpha:
                high = mid
            else:
                low = mid + 1
        return low


def judgeable(channels: int, batches: int, z: float, alpha: float) -> bool:
    """Could any count be significant? Not when even every channel off is likely noise."""
    return channels > 0 and binomial_tail(channels, channels, off_probability(z, batches)) < alpha


def fewest_batches(channels: int, z: float, alpha: float, most: int = 1 << 20) -> int | None:
    """Fewest batches K that make a layer of `channels` judgeable; None: no K does."""
    if not judgeable(channels, most, z, alpha):
        return None
    low, high = 2, most  # p0 falls as K grows: bisect
    while low < high:
        mid = (low + high) // 2
        if judgeable(channels, mid, z, alpha):
            high = mid
        else:
            low = mid + 1
    return low
