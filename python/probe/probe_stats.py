"""Binomial confidence intervals for the probe's accuracy tables (no dependencies).

The Wilson score interval (Wilson 1927) inverts the normal test of a proportion: p such that
|k/n - p| <= z sqrt(p (1 - p) / n). Unlike the Wald interval it stays inside [0, 1] and does
not collapse to a point at 0 or n correct: 200 of 200 gives [0.981, 1], 16 of 16 [0.806, 1].
"""
import math

Z95 = 1.959963984540054  # two-sided 95%: the 0.975 quantile of the standard normal


def wilson(k, n, z=Z95):
    """(low, high) of the Wilson score interval for k successes out of n trials."""
    if not (isinstance(k, int) and isinstance(n, int)) or n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: need integers 0 <= k <= n and n > 0, got k={k!r} n={n!r}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k = 0 or k = n one end is exactly 0 or 1; the formula gives it up to rounding.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high
