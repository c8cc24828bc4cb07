import math

import numpy as np
import pytest
import torch

from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.luq import (
    luq_alpha,
    luq_grid,
    luq_mse_lognormal,
    luq_quantize,
    prune_variance_lognormal,
    sr_mse_lognormal,
)
from gradcomp.numerics.rounding import quantize_fp


def _lognormal(n, mu=-8.0, sigma=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).to(dtype)


def test_alpha_and_grid_paper_definition():
    x = torch.tensor([0.5, -3.0, 2.0, float("inf"), float("nan")])
    assert float(luq_alpha(x, 4)) == 3.0 / 2**8  # alpha = max|g| / 2^(2^(b-1)), inf/NaN out
    assert float(luq_alpha(x, 4, range_exponent=7)) == 3.0 / 2**7
    grid = luq_grid(1.0, 4)
    assert grid[0] == 0 and grid[-1] == 256 and len(grid) == 10


def test_exact_grid_and_specials():
    x = _lognormal(20000)
    x[:3] = torch.tensor([0.0, float("nan"), float("-inf")])
    q = luq_quantize(x, 4, generator=torch.Generator().manual_seed(1))
    assert q.dtype == x.dtype and q.shape == x.shape
    assert q[0] == 0 and math.isnan(q[1]) and q[2] == float("-inf")
    fin = q[3:].double()
    alpha = float(luq_alpha(x, 4))
    nz = fin[fin != 0]
    j = torch.log2(nz.abs() / alpha)
    assert torch.equal(j, torch.round(j)) and j.min() >= 0 and j.max() <= 8
    assert torch.equal(torch.sign(nz), torch.sign(x[3:].double()[fin != 0]))
    assert float(fin.abs().max()) <= float(x[3:].abs().max())
    # the max is representable: it maps to itself
    i = int(x[3:].abs().argmax()) + 3
    assert q[i] == x[i]
    # all zero stays all zero
    assert torch.equal(luq_quantize(torch.zeros(5)), torch.zeros(5))


@pytest.mark.parametrize("samples", [1, 4])
def test_unbiased_within_5_standard_errors(samples):
    x = _lognormal(2000, seed=2)
    gen = torch.Generator().manual_seed(3)
    reps = 400
    draws = torch.stack([luq_quantize(x, 4, samples=samples, generator=gen).double()
                         for _ in range(reps)])
    # per binade of |x| / alpha (each a sum of many elements: a normal z-test is valid), and in
    # total: the mean error over the repetitions within 5 standard errors of 0
    alpha = float(luq_alpha(x, 4))
    k = torch.floor(torch.log2(x.abs().double() / alpha)).clamp(-1, 8)
    err = draws - x.double()
    for level in k.unique().tolist():
        tot = err[:, k == level].sum(1)
        if float(tot.std()) == 0:
            continue
        assert abs(float(tot.mean())) <= 5 * float(tot.std()) / math.sqrt(reps), level
    tot = err.sum(1)
    assert abs(float(tot.mean())) <= 5 * float(tot.std()) / math.sqrt(reps)
    # and a deterministic check that no binade is skipped: most binades hold random elements
    assert len(k.unique()) >= 8


def test_repeated_sampling_divides_variance():
    x = _lognormal(4000, seed=4)
    gen = torch.Generator().manual_seed(5)
    v1 = torch.stack([luq_quantize(x, 4, generator=gen) - x for _ in range(50)]).var(0).sum()
    v4 = torch.stack([luq_quantize(x, 4, samples=4, generator=gen) - x
                      for _ in range(50)]).var(0).sum()
    assert 0.15 < float(v4 / v1) < 0.35


def test_seeded_reproducible():
    x = _lognormal(1000)
    a = luq_quantize(x, 4, generator=torch.Generator().manual_seed(7))
    b = luq_quantize(x, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        luq_quantize(torch.ones(3), 9)
    with pytest.raises(ValueError, match="samples"):
        luq_quantize(torch.ones(3), 4, samples=0)
    with pytest.raises(TypeError):
        luq_quantize(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="sigma"):
        sr_mse_lognormal(0.0, 0.0, [0, 1])
    with pytest.raises(ValueError, match="grid"):
        sr_mse_lognormal(0.0, 1.0, [1, 0.5])


def _mc(x, q, reps):
    return float(torch.stack([(q() - x).double().square().mean() for _ in range(reps)]).mean())


def test_closed_form_pruning_variance_monte_carlo():
    mu, sigma, n = -1.0, 1.5, 200000
    x = _lognormal(n, mu, sigma, seed=8, dtype=torch.float64).abs()
    a = math.exp(mu)
    pred = prune_variance_lognormal(mu, sigma, a)
    gen = torch.Generator().manual_seed(9)

    def prune():
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        return torch.where(x < a, torch.where(x >= u * a, a, 0.0), x)

    # exact per-sample conditional variance gives the sampling error of the prediction
    cond = torch.where(x < a, x * (a - x), 0.0)
    se = float(cond.std()) / math.sqrt(n)
    assert abs(float(cond.mean()) - pred) < 5 * se
    mc = _mc(x, prune, 4)
    assert abs(mc - pred) < 5 * se + 0.02 * pred


def _cond_var(x, grid):
    """Exact per-element SR variance (b - x)(x - a) for the grid neighbours a <= |x| <= b."""
    ax = x.abs().double().numpy()
    i = np.clip(np.searchsorted(grid, ax, side="right") - 1, 0, len(grid) - 2)
    a, b = grid[i], grid[i + 1]
    return np.clip((b - ax) * (ax - a), 0, None)


@pytest.mark.parametrize("kind", ["luq", "fp"])
def test_closed_form_sr_variance_monte_carlo(kind):
    mu, sigma, n, reps = -6.0, 1.5, 100000, 4
    x = _lognormal(n, mu, sigma, seed=10, dtype=torch.float64)
    amax = float(x.abs().max())
    gen = torch.Generator().manual_seed(11)
    if kind == "luq":
        grid = luq_grid(amax / 2**8, 4)
        pred = luq_mse_lognormal(mu, sigma, amax, 4)

        def q():
            return luq_quantize(x, 4, generator=gen)
    else:  # SR onto e2m1 scaled so that max|x| is its top value
        fmt = FPFormat.from_name("e2m1fn")
        s = fmt.max_normal / amax
        grid = fmt.grid() / s
        pred = sr_mse_lognormal(mu, sigma, grid)

        def q():
            return quantize_fp(x, fmt, "stochastic", scale=s, generator=gen, compile=False)
    cond = _cond_var(x, grid)
    # 1) the quantizer: Monte Carlo error equals the exact conditional variance of this sample
    errs = torch.stack([(q() - x).square() for _ in range(reps)]).numpy()
    per = errs.mean(0) - cond  # zero-mean per element, independent across elements
    assert abs(per.mean()) < 5 * per.std() / math.sqrt(n)
    # 2) the closed form: the lognormal integral equals the sample mean of (b-x)(x-a)
    assert abs(cond.mean() - pred["variance"]) < 5 * cond.std() / math.sqrt(n)


def test_closed_form_single_interval():
    single = sr_mse_lognormal(0.0, 1.0, [0.5, 2.0])
    xs = np.exp(np.random.default_rng(0).standard_normal(400000))
    vals = np.where((xs >= 0.5) & (xs < 2.0), (2.0 - xs) * (xs - 0.5), 0.0)
    assert abs(single["variance"] - vals.mean()) < 5 * vals.std() / math.sqrt(len(xs))
    # values outside [0.5, 2] are clamped to the ends: their squared error is "clamp"
    clamp = np.where(xs > 2, (xs - 2) ** 2, 0) + np.where(xs < 0.5, (0.5 - xs) ** 2, 0)
    assert abs(single["clamp"] - clamp.mean()) < 5 * clamp.std() / math.sqrt(len(xs))


@pytest.mark.parametrize(("bits", "samples"), [(4, 1), (2, 2), (8, 1)])
def test_fused_luq_equals_the_eager_operator_bit_for_bit(bits, samples):
    # the fused call finds alpha and runs the operator in one compiled call, the binades on
    # float operations (Veltkamp's splitting instead of frexp; the 8-bit format's range keeps
    # frexp and the eager path): the same bits, specials and subnormals included; 20 480
    # elements take the CPU's 2-D counter layout (``random.counter_layout``), 20 000 a flat one
    from gradcomp.numerics import kernels
    from gradcomp.numerics.random import counter_columns

    g = torch.Generator().manual_seed(bits)
    assert counter_columns(20_480, "cpu") and not counter_columns(20_000, "cpu")
    x = torch.randn(20_480, generator=g) * torch.rand(20_480, generator=g).pow(8) * 10
    x[::97] = 0.0
    x[3], x[9], x[11], x[13] = float("nan"), float("inf"), -float("inf"), -0.0
    x[17], x[19] = 1e-40, -3e-39
    for scale, n in ((1.0, 20_480), (1e30, 20_480), (1e-30, 20_000), (1.0, 20_000)):
        x = x[:n]
        outs = []
        for fused in (True, False):
            kernels.set_compile(fused)
            try:
                outs.append(luq_quantize(x * scale, bits, samples=samples,
                                         generator=torch.Generator().manual_seed(7)))
            finally:
                kernels.set_compile(None)
        assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32)), scale
