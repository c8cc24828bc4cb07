"""Threshold solvers and cosine similarity of stochastic pruning (Eq. 6-8, section 5.3)."""

import math

import numpy as np
import pytest
import torch

from gradcomp.numerics.random import draw_seed, uniform_from_counter
from gradcomp.numerics.sparsity import (
    empirical_sparsity,
    empirical_threshold,
    expected_sparsity,
    lognormal_threshold,
    normal_threshold,
    pruned_cosine,
)

# reference Eq. 8 thresholds at mu = 0, quoted to 4 significant digits
CHECKS = [(1, 0.8, 7.822), (2, 0.5, 2.575), (2, 0.8, 16.99), (2, 0.9, 47.66), (3, 0.8, 38.06),
          (3, 0.9, 157.1)]


@pytest.mark.parametrize("sigma,s,a_ref", CHECKS)
def test_eq8_check_values(sigma, s, a_ref):
    a = lognormal_threshold(s, 0.0, sigma)
    assert a == pytest.approx(a_ref, rel=6e-4)  # 4 printed digits: half a unit of the last
    assert expected_sparsity(a, 0.0, sigma) == pytest.approx(s, abs=1e-12)


def test_vectorised_solve_matches_scalar_and_scales_with_mu():
    s = torch.tensor([0.5, 0.8, 0.95, 0.7])
    mu = torch.tensor([-3.0, 0.0, 2.0, -12.0])
    sig = torch.tensor([1.0, 2.0, 4.0, 0.3])
    a = lognormal_threshold(s, mu, sig)
    assert a.dtype == torch.float64 and a.shape == (4,)
    for i in range(4):
        ai = lognormal_threshold(float(s[i]), float(mu[i]), float(sig[i]))
        assert float(a[i]) == pytest.approx(ai, rel=1e-12)
        # a scales with e^mu
        assert ai == pytest.approx(math.exp(float(mu[i])) * lognormal_threshold(
            float(s[i]), 0.0, float(sig[i])), rel=1e-10)
    assert torch.allclose(expected_sparsity(a, mu, sig), s.double(), atol=1e-12)
    assert isinstance(lognormal_threshold(np.array([0.5, 0.6]), 0.0, 1.0), np.ndarray)


def test_zero_correction_and_no_pruning():
    a = lognormal_threshold(0.8, 0.0, 2.0, zero_fraction=0.5)
    # S' = (0.8 - 0.5)/(1 - 0.5) = 0.6 on the non-zeros
    assert a == pytest.approx(lognormal_threshold(0.6, 0.0, 2.0), rel=1e-12)
    assert expected_sparsity(a, 0.0, 2.0, 0.5) == pytest.approx(0.8, abs=1e-12)
    assert lognormal_threshold(0.8, 0.0, 2.0, zero_fraction=0.8) == 0.0
    assert lognormal_threshold(0.5, 0.0, 2.0, zero_fraction=1.0) == 0.0
    # sigma = 0: every |x| = e^mu, S = 1 - e^mu/a
    assert lognormal_threshold(0.75, 1.0, 0.0) == pytest.approx(4 * math.e, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_sparsity_outside_open_unit_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        lognormal_threshold(bad, 0.0, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        normal_threshold(bad, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        empirical_threshold(torch.ones(10), bad)


def test_nonfinite_statistics_name_the_layer():
    with pytest.raises(ValueError, match="mu.*layer 1"):
        lognormal_threshold(0.8, torch.tensor([0.0, math.nan]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="sigma.*'conv2'"):
        lognormal_threshold(0.8, [0.0, 0.0], [1.0, math.inf], names=["conv1", "conv2"])
    with pytest.raises(ValueError, match="sigma"):
        lognormal_threshold(0.8, 0.0, -1.0)


def _lognormal_sample(n, mu, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))


def test_normal_threshold_reaches_target_on_normal_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    a = normal_threshold(0.8, x.abs().mean())
    # ATP's assumption holds here, so the *deterministic* fraction below a is the target;
    # std of a fraction over n = 2e5 draws is sqrt(.16/2e5) = 9e-4 -> 5 sigma < 0.005
    assert float((x.abs() < a).double().mean()) == pytest.approx(0.8, abs=0.005)
    assert normal_threshold(0.5, 0.0) == 0.0


def test_empirical_threshold_is_exact_on_its_sample():
    x = _lognormal_sample(5000, -4.0, 2.5, seed=2)
    for s in (0.5, 0.8, 0.95):
        a = empirical_threshold(x, s)
        assert float(empirical_sparsity(x, a)) == pytest.approx(s, abs=1e-12)
    # brute-force check of the formula at the returned threshold
    a = float(empirical_threshold(x, 0.7))
    assert float(np.mean(np.maximum(0, 1 - x.numpy() / a))) == pytest.approx(0.7, abs=1e-12)


def test_empirical_threshold_lists_padding_zeros_and_nonfinite():
    x1 = _lognormal_sample(3000, 0.0, 1.0, seed=3)
    x2 = torch.cat([torch.zeros(500, dtype=torch.float64), _lognormal_sample(500, 1.0, 2.0, 4)])
    x3 = torch.zeros(64)
    x4 = torch.tensor([1.0, 2.0, math.nan, math.inf, 3.0])
    a = empirical_threshold([x1, x2, x3, x4], 0.8)
    assert a.shape == (4,)
    assert float(a[0]) == pytest.approx(float(empirical_threshold(x1, 0.8)), rel=1e-12)
    # half zeros: the non-zeros need S' = 0.6 of their own
    assert float(empirical_sparsity(x2, a[1])) == pytest.approx(0.8, abs=1e-12)
    assert float(a[2]) == 0.0  # all zeros: no pruning
    fin = torch.tensor([1.0, 2.0, 3.0])
    assert float(a[3]) == pytest.approx(float(empirical_threshold(fin, 0.8)), rel=1e-12)
    # zeros beyond the target: no pruning
    assert float(empirical_threshold(torch.cat([torch.zeros(90), torch.ones(10)]), 0.8)) == 0.0
    # padded matrix + counts gives the same as the list
    mat = torch.zeros(2, 3000, dtype=torch.float64)
    mat[0] = x1
    mat[1, :1000] = x2
    b = empirical_threshold(mat, 0.8, counts=torch.tensor([3000, 1000]))
    assert torch.allclose(b, a[:2], rtol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_lognormal_threshold_on_sample_within_sampling_error(sigma):
    x = _lognormal_sample(400_000, -6.0, sigma, seed=5)
    for s in (0.5, 0.8, 0.95):
        a = lognormal_threshold(s, -6.0, sigma)
        # per-element zero probability p_i in [0,1]: std of the mean <= 0.5/sqrt(n) = 8e-4;
        # 0.004 is 5 of those
        assert float(empirical_sparsity(x, a)) == pytest.approx(s, abs=0.004)


def _monte_carlo_cosine(x, a, seed):
    u = uniform_from_counter(draw_seed(torch.Generator().manual_seed(seed), "cpu"), x.numel(),
                             dtype=torch.float64)
    t = torch.where(x < a, torch.where(x >= a * u, torch.full_like(x, a), 0.0), x)
    return float((x * t).sum() / (x.norm() * t.norm()))


def test_cosine_matches_monte_carlo_untruncated_and_truncated():
    # sigma = 1: light enough tail for the untruncated Monte Carlo to converge; n = 1e6 gives
    # a relative error of the moments ~ sqrt(Var(x^2)/n)/E[x^2] = sqrt(e^4 - 1)/1e3 = 7e-3,
    # halved by the square root in cos -> tolerance 5e-3
    x = _lognormal_sample(1_000_000, 0.0, 1.0, seed=6)
    for s in (0.5, 0.9):
        a = lognormal_threshold(s, 0.0, 1.0)
        assert _monte_carlo_cosine(x, a, 7) == pytest.approx(pruned_cosine(a, 0.0, 1.0), abs=5e-3)
    # sigma = 3, truncated at e^(2.7 sigma): the truncated moments are bounded, so the same
    # 1e6 samples give ~1e-3 accuracy
    x = _lognormal_sample(1_000_000, 0.0, 3.0, seed=8)
    k = 2.7
    xt = x[x <= math.exp(k * 3.0)]
    for s in (0.5, 0.9):
        a = lognormal_threshold(s, 0.0, 3.0)
        ref = _monte_carlo_cosine(xt, a, 9)
        assert ref == pytest.approx(pruned_cosine(a, 0.0, 3.0, truncate_k=k), abs=5e-3)
    # monotone decreasing in a, 1 at a = 0
    a = torch.tensor([0.0, 0.1, 1.0, 10.0, 100.0])
    c = pruned_cosine(a, torch.zeros(5), torch.full((5,), 2.0), 2.7)
    assert float(c[0]) == 1.0 and bool((c[1:] < c[:-1]).all())


# ---------------------------------------------------------------------------------------------
# Eq. 8 solver accuracy over a wide range, against an independent scipy oracle


def _eq8_oracle_t(s: float, sigma: float) -> float:
    """t = ln a - mu solving Eq. 8 with scipy's special functions and Brent's method.

    Solves in the quantity that is computed without cancellation: ln S (S <= 1/2, S a small
    difference there only for tiny sigma) or ln(1 - S) = ln(Phi(-u) + e^(s^2/2 - t) Phi(u - s))
    (S > 1/2, both terms positive), to Brent's xtol of a few ulp.
    """
    from scipy.optimize import brentq
    from scipy.special import log_ndtr, ndtr, ndtri

    def log_t2(t):
        return sigma * sigma / 2 - t + log_ndtr(t / sigma - sigma)

    if s > 0.5:
        def f(t):
            return np.logaddexp(log_ndtr(-t / sigma), log_t2(t)) - np.log1p(-s)
    else:
        def f(t):
            return np.log(ndtr(t / sigma) - np.exp(log_t2(t))) - np.log(s)
    lo = sigma * ndtri(s)
    hi = sigma * sigma / 2 - np.log1p(-s)
    return brentq(f, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 2.0, 4.0, 8.0])
def test_eq8_matches_oracle_from_near_zero_to_near_one(sigma):
    s = torch.tensor([1e-4, 0.01, 0.3, 0.5, 0.5 + 1e-9, 0.8, 0.99, 1 - 1e-6, 1 - 1e-12],
                     dtype=torch.float64)
    t = torch.log(lognormal_threshold(s, 0.0, sigma))
    ref = torch.tensor([_eq8_oracle_t(float(si), sigma) for si in s], dtype=torch.float64)
    # a few ulp of t (the error in t is the relative error of a); both sides round, so the
    # bound is 1e-13 * (1 + |t|), far below the 1e-12 the vectorised/scalar test pins
    assert torch.allclose(t, ref, rtol=1e-13, atol=1e-13), (t - ref).abs().max()


def test_eq8_targets_near_one_keep_relative_accuracy():
    # tiny sigma, a far above every |x| ~ e^mu: 1 - S = E|x|/a = e^(mu + sigma^2/2)/a exactly
    # (Phi((t - sigma^2)/sigma) = 1), so the solver must resolve 1 - S to full relative
    # precision at S = 1 - 1e-12 (a linear-domain S would give only ~1e-4 of it)
    for s in (1 - 1e-12, 0.999, 1 - 2.0**-52):
        a = lognormal_threshold(s, 0.0, 1e-6)
        assert a == pytest.approx(math.exp(0.5e-12) / (1 - s), rel=1e-14)  # 1 - s is exact


def test_eq8_many_layers_one_call_matches_per_layer_solves_and_handles_mixed_layers():
    g = torch.Generator().manual_seed(11)
    L = 100
    mu = -12 + 6 * torch.rand(L, generator=g, dtype=torch.float64)
    sig = 1 + 3 * torch.rand(L, generator=g, dtype=torch.float64)
    z = 0.5 * torch.rand(L, generator=g, dtype=torch.float64)
    sig[3], z[5], z[7] = 0.0, 0.9, 1.0  # point mass; zeros beyond the target; all zeros
    a = lognormal_threshold(0.8, mu, sig, z)
    assert float(a[3]) == pytest.approx(math.exp(float(mu[3])) / (1 - (0.8 - float(z[3]))
                                                                    / (1 - float(z[3]))))
    assert float(a[5]) == 0.0 and float(a[7]) == 0.0
    for i in (0, 3, 17, 42, 99):
        ai = lognormal_threshold(0.8, float(mu[i]), float(sig[i]), float(z[i]))
        assert float(a[i]) == pytest.approx(ai, rel=1e-12)
    live = (z < 0.8) & (sig > 0)
    assert torch.allclose(expected_sparsity(a[live], mu[live], sig[live], z[live]),
                          torch.full((int(live.sum()),), 0.8, dtype=torch.float64), atol=1e-12)


def test_eq8_extreme_sigma_still_meets_the_target():
    # sigma ~ 7e3: t ~ -93 is resolved only to ~1e-8 (relative rounding of sigma^2-sized
    # terms), where Newton's monotone steps stall and the bracketed solve finishes the job
    s, sigma = 0.49477031828932844, 7186.244051097342
    a = lognormal_threshold(s, 0.0, sigma)
    assert 0 < a < 1 and math.isfinite(math.log(a))
    assert expected_sparsity(a, 0.0, sigma) == pytest.approx(s, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# empirical threshold: against a plain per-row reference on random and degenerate samples


def _empirical_reference(x, s: float) -> float:
    """Scan the segments of one sample in float64 (the definition, one layer at a time)."""
    v = np.sort(np.abs(np.asarray(x, dtype=np.float64)))
    v = v[np.isfinite(v)]
    n = v.size
    if n == 0 or np.count_nonzero(v == 0) >= n * s:
        return 0.0
    P = np.cumsum(v)
    for j in range(1, n + 1):  # segment: a in [v_j, v_j+1) (unbounded for j = n)
        if j <= n * s:
            continue
        a = P[j - 1] / (j - n * s)
        if a >= v[j - 1] * (1 - 1e-15) and (j == n or a <= v[j] * (1 + 1e-15)):
            return a
    raise AssertionError("no segment holds the root")


def _random_sample(g, case: int):
    n = int(torch.randint(1, 400, (1,), generator=g))
    x = torch.exp(3 * torch.randn(n, generator=g, dtype=torch.float64))
    if case == 1:  # many exact zeros
        x[torch.rand(n, generator=g) < 0.6] = 0
    elif case == 2:  # ties
        x = torch.round(4 * x) / 4
    elif case == 3:  # all equal
        x = torch.full((n,), 2.5, dtype=torch.float64)
    elif case == 4:  # tiny sample
        x = x[:2]
    elif case == 5:  # excluded entries
        x[torch.rand(n, generator=g) < 0.2] = math.inf
        x[torch.rand(n, generator=g) < 0.1] = math.nan
    return x * torch.where(torch.rand(x.numel(), generator=g) < 0.5, -1.0, 1.0).double()


def test_empirical_threshold_matches_reference_on_random_and_degenerate_samples():
    g = torch.Generator().manual_seed(12)
    targets = (1e-9, 0.01, 0.37, 0.8, 0.999, 1 - 1e-9)
    for trial in range(60):
        x = _random_sample(g, trial % 6)
        for s in targets:
            a = float(empirical_threshold(x, s))
            ref = _empirical_reference(x.numpy(), s)
            assert a == pytest.approx(ref, rel=1e-13, abs=0.0), (trial, s, x.numel())
            if a > 0:  # the threshold solves its equation
                assert float(empirical_sparsity(x, a)) == pytest.approx(s, abs=1e-12)


def test_empirical_threshold_one_padded_solve_equals_per_layer_solves():
    g = torch.Generator().manual_seed(13)
    xs = [_random_sample(g, i % 6).float() for i in range(30)]
    xs.append(torch.tensor([0.0, -0.0]))  # all zeros
    s = 0.05 + 0.9 * torch.rand(len(xs), generator=g, dtype=torch.float64)
    a = empirical_threshold(xs, s)
    for i, x in enumerate(xs):
        assert float(a[i]) == pytest.approx(_empirical_reference(x.numpy(), float(s[i])),
                                            rel=1e-13, abs=0.0)
    # the same layers as one padded matrix with counts
    n = max(x.numel() for x in xs)
    mat = torch.zeros(len(xs), n)
    for i, x in enumerate(xs):
        mat[i, : x.numel()] = x
    counts = torch.tensor([x.numel() for x in xs])
    assert torch.equal(empirical_threshold(mat, s, counts=counts), a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_empirical_threshold_any_float_dtype_leaves_the_sample_unchanged(dtype):
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(257, generator=g) * 3).to(dtype)
    mat = torch.stack([x, x.flip(0)]).t().contiguous().t()  # a non-contiguous (2, 257) view
    before_x, before_mat = x.clone(), mat.clone()
    a = empirical_threshold(x, 0.7)
    b = empirical_threshold(mat, 0.7)
    c = empirical_threshold([x, x.flip(0)], 0.7)
    assert torch.equal(x, before_x) and torch.equal(mat, before_mat)  # sorted on a copy
    ref = _empirical_reference(x.double().numpy(), 0.7)  # the values, cast exactly
    assert float(a) == pytest.approx(ref, rel=1e-13)
    assert torch.equal(b, c) and float(b[0]) == float(a) == float(b[1])
