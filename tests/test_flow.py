"""Training sigma laws against their closed-form distributions (independent of the sampling code)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from iconface_jax import flow

N = 200_000


def unshift(x: np.ndarray, shift: float) -> np.ndarray:
    """The base value whose shift s' = shift s / (1 + (shift - 1) s) is x."""
    return x / (shift - (shift - 1) * x)


def base_cdf(law: str, s: np.ndarray, mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29) -> np.ndarray:
    """P(base sigma <= s) by hand: logit-normal through Phi, uniform, and SD3's mode law by bisection of its
    decreasing map u -> 1 - u - c (cos^2(pi u / 2) - 1 + u)."""
    if law == "logit_normal":
        return stats.norm.cdf((np.log(s / (1 - s)) - mean) / std)
    if law == "uniform":
        return s
    g = lambda u: 1 - u - mode_scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    lo, hi = np.zeros_like(s), np.ones_like(s)
    for _ in range(60):  # g(u) <= s  <=>  u >= u*(s)
        mid = (lo + hi) / 2
        lo, hi = np.where(g(mid) > s, mid, lo), np.where(g(mid) > s, hi, mid)
    return 1 - hi


@pytest.mark.parametrize("law, shift, fraction", [("logit_normal", 1.0, 0.0), ("logit_normal", 7.2, 0.0),
                                                  ("logit_normal", 7.2, 0.5), ("uniform", 3.0, 0.0),
                                                  ("mode", 1.0, 0.0), ("mode", 3.0, 0.25)])
def test_sigma_laws_follow_their_distribution(law, shift, fraction):
    sigma = np.asarray(flow.sample_sigma(jax.random.key(0), N, 0.0, 1.0, shift, law, fraction))
    x = np.linspace(0.02, 0.98, 49)
    want = fraction * base_cdf(law, x) + (1 - fraction) * base_cdf(law, unshift(x, shift))
    got = np.searchsorted(np.sort(sigma), x) / N
    assert np.abs(got - want).max() < 0.006  # Kolmogorov-Smirnov: 3 / sqrt(N) = 0.0067 at N = 200,000
    assert sigma.min() >= 0 and sigma.max() <= 1


def test_unknown_sigma_law():
    with pytest.raises(ValueError, match="sigma law"):
        flow.sample_sigma(jax.random.key(0), 4, law="cosine")
