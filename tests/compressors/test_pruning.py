"""Stochastic / top-k pruning operators, the Pruner and heterogeneous allocation."""

import math

import pytest
import torch

from gradcomp.compressors.pruning import (
    PRUNE_METHODS,
    Pruner,
    allocate_sparsity,
    stochastic_prune,
    topk_prune,
    topk_stochastic_prune,
    topk_threshold,
)
from gradcomp.numerics.fit import LayerStats, fit_lognormal
from gradcomp.numerics.sparsity import expected_sparsity, lognormal_threshold, pruned_cosine


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    # the eager path gives the same numbers bit for bit (tested below) and needs no compile
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")


def _signed_lognormal(n, mu, sigma, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).to(dtype)


def test_unbiased():
    a = 1.0
    vals = torch.tensor([-1.5, -0.9, -0.5, -0.1, 0.0, 0.05, 0.3, 0.7, 0.99, 2.0])
    m = 65536
    x = vals.repeat(m)  # every copy gets its own hashed uniform
    y = stochastic_prune(x, a, torch.Generator().manual_seed(0)).view(m, -1)
    # Var T(x) = |x|(a - |x|) <= a^2/4 -> std of the mean <= a/(2 sqrt m) = a/512; 5 std
    assert torch.allclose(y.mean(0), vals, atol=5 * a / 512)
    # support: kept values, +-a or 0
    ok = (y == vals) | (y.abs() == a) | (y == 0)
    assert bool(ok.all())
    assert bool((y[:, vals.abs() >= a] == vals[vals.abs() >= a]).all())


@pytest.mark.parametrize("compile", [False, True])
def test_zeros_stay_zero_where_the_uniform_is_zero(compile):
    # generator seed 2 draws the call's seed whose hash gives u = 0 at element 920876
    # (probability 2^-24 per element): a*u <= |x| would keep a zero there as +-a (E[T(0)] > 0)
    from gradcomp.numerics.random import draw_seed, uniform_from_counter
    i = 920876
    u = uniform_from_counter(draw_seed(torch.Generator().manual_seed(2), "cpu"), i + 1)
    assert float(u[i]) == 0.0 and int((u == 0).sum()) == 1  # the premise
    x = torch.full((i + 1,), 0.25)
    x[i] = 0.0
    y = stochastic_prune(x, 1.0, torch.Generator().manual_seed(2), compile=compile)
    assert float(y[i]) == 0.0
    x[i] = -0.0
    y = stochastic_prune(x, 1.0, torch.Generator().manual_seed(2), compile=compile)
    assert float(y[i]) == 0.0
    # any nonzero value at u = 0 is kept as +-a, with its own sign
    x[i] = -1e-30
    y = stochastic_prune(x, 1.0, torch.Generator().manual_seed(2), compile=compile)
    assert float(y[i]) == -1.0


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0, 4.0])
def test_achieved_sparsity_on_synthetic_lognormal(sigma):
    n = 500_000
    x = _signed_lognormal(n, -8.0, sigma, seed=int(sigma))
    g = torch.Generator().manual_seed(1)
    for s in (0.5, 0.7, 0.8, 0.9, 0.95):
        a = lognormal_threshold(s, -8.0, sigma)
        achieved = float((stochastic_prune(x, a, g) == 0).double().mean())
        # two independent errors, each with std <= 0.5/sqrt(n) = 7e-4 (sample of |x|, then
        # the Bernoulli draws): combined 1e-3, so +-0.005 is a 5-std band
        assert achieved == pytest.approx(s, abs=0.005)


def test_reproducible_and_seed_sensitive():
    x = _signed_lognormal(10_000, 0.0, 2.0, seed=3)
    y1 = stochastic_prune(x, 5.0, torch.Generator().manual_seed(7))
    y2 = stochastic_prune(x, 5.0, torch.Generator().manual_seed(7))
    y3 = stochastic_prune(x, 5.0, torch.Generator().manual_seed(8))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(11)
    d1 = stochastic_prune(x, 5.0)
    torch.manual_seed(11)
    assert torch.equal(d1, stochastic_prune(x, 5.0))


def test_compiled_path_matches_eager_bit_for_bit(monkeypatch):
    x = _signed_lognormal(4099, 0.0, 2.0, seed=4).view(1, 4099)
    monkeypatch.setenv("GRADCOMP_COMPILE", "1")
    yc = stochastic_prune(x, 3.0, torch.Generator().manual_seed(5))
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")
    ye = stochastic_prune(x, 3.0, torch.Generator().manual_seed(5))
    assert yc.shape == x.shape
    assert torch.equal(yc.view(torch.int32), ye.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_tensor_threshold_and_special_values(dtype):
    x = _signed_lognormal(5000, 0.0, 1.0, seed=6, dtype=dtype)
    x[:3] = torch.tensor([math.nan, math.inf, 0.0], dtype=dtype)
    a = torch.tensor(1.3, dtype=torch.float64)
    y = stochastic_prune(x, a, torch.Generator().manual_seed(0))
    ad = a.to(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert math.isnan(float(y[0])) and float(y[1]) == math.inf and float(y[2]) == 0.0
    rest, xr = y[3:], x[3:]
    assert bool(((rest == xr) | (rest.abs() == ad) | (rest == 0)).all())
    assert bool((rest[xr.abs() >= ad] == xr[xr.abs() >= ad]).all())


def test_edge_inputs():
    z = torch.zeros(3, 4)
    assert torch.equal(stochastic_prune(z, 1.0), z)
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stochastic_prune(x, 0.0), x)
    assert torch.equal(stochastic_prune(x, torch.tensor(-1.0)), x)  # device-side: no pruning
    assert stochastic_prune(torch.empty(0), 1.0).numel() == 0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="threshold"):
            stochastic_prune(x, bad)
    with pytest.raises(TypeError, match="x must be"):
        stochastic_prune(torch.arange(5), 1.0)


def test_topk_operators():
    x = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.0, 1.0, -2.5, 0.2, 0.3, 4.0])
    y = topk_prune(x, 0.7)  # keep 3
    assert torch.equal(y, torch.tensor([0, -3.0, 0, 0, 0, 0, -2.5, 0, 0, 4.0]))
    assert float(topk_threshold(x, 0.7)) == 2.5
    big = _signed_lognormal(100_000, 0.0, 2.0, seed=9)
    assert int((topk_prune(big, 0.9) != 0).sum()) == 10_000
    ys = topk_stochastic_prune(big, 0.9, torch.Generator().manual_seed(0))
    # the baseline keeps extra +-a values: its sparsity falls short of the target
    assert float((ys == 0).double().mean()) < 0.89
    with pytest.raises(ValueError, match="sparsity"):
        topk_prune(x, 1.0)


def _fit_and_sample(x, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n,), generator=g)
    return fit_lognormal(x), x.reshape(-1)[idx]


@pytest.mark.parametrize("method", ["lognormal", "empirical", "calibrated"])
def test_pruner_methods_reach_target_on_lognormal(method):
    x = _signed_lognormal(200_000, -5.0, 2.0, seed=10)
    fit, sample = _fit_and_sample(x)
    p = Pruner(0.8, method)
    assert torch.equal(p(x), x)  # dense until the first update
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        p.update(LayerStats(fit, sample))
        p.reset_metrics()
        y = p(x, g)
    s = float(p.metrics()["sparsity"])
    assert s == float((y == 0).double().mean())
    # sample of 4096 for 'empirical': std of its sparsity estimate <= 0.5/64 = 0.008; 0.025 = 3
    assert s == pytest.approx(0.8, abs=0.025 if method == "empirical" else 0.005)


def test_calibrated_corrects_a_non_lognormal_layer_and_resets_on_jumps():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g)  # normal, not lognormal: Eq. 8 misses the target
    fit = fit_lognormal(x)
    plain = Pruner(0.9, "lognormal")
    plain.update(fit)
    miss = abs(float((plain(x, g) == 0).double().mean()) - 0.9)
    assert miss > 0.01  # a clear miss (14x the 7e-4 draw noise) for calibration to fix
    cal = Pruner(0.9, "calibrated")
    for _ in range(8):
        cal.update(fit)
        y = cal(x, g)
    # std of the achieved sparsity of one draw: sqrt(.09/2e5) = 7e-4
    assert float((y == 0).double().mean()) == pytest.approx(0.9, abs=0.005)
    assert cal.metrics()["calibration_factor"] != 1.0
    cal.update(fit_lognormal(x * 100))  # statistics jump (ln 100 >> sigma): factor reset
    assert cal.metrics()["calibration_factor"] == 1.0


def test_atp_and_topk_stochastic_pruners_and_state_dict():
    x = _signed_lognormal(100_000, -5.0, 2.0, seed=11)
    fit, sample = _fit_and_sample(x)
    atp = Pruner(0.8, "atp")
    atp.update(LayerStats(fit, sample))
    assert float(atp.threshold) == pytest.approx(
        math.sqrt(math.pi / 2) * float(sample.abs().double().mean()) * 1.2815515655446004)
    tk = Pruner(0.8, "topk_stochastic")
    tk.update(fit)
    y = tk(x, torch.Generator().manual_seed(0))
    assert float((y == 0).double().mean()) < 0.8
    p = Pruner(0.7, "calibrated")
    p.update(LayerStats(fit, sample))
    q = Pruner(0.5, "lognormal")
    q.load_state_dict(p.state_dict())
    assert q.method == "calibrated" and q.sparsity == 0.7
    assert torch.equal(q.threshold, p.threshold.cpu())
    with pytest.raises(ValueError, match="method must be one of"):
        Pruner(0.8, "magic")
    with pytest.raises(ValueError, match="needs a sample"):
        Pruner(0.8, "empirical").update(fit)
    with pytest.raises(ValueError, match="sparsity"):
        Pruner(1.2)
    assert set(PRUNE_METHODS) == {"lognormal", "empirical", "calibrated", "atp",
                                  "topk_stochastic", "topk"}


LAYERS = dict(numels=[1000, 50_000, 200_000, 3000, 80_000], mus=[-5, -8, -3, -10, -6],
              sigmas=[1.0, 2.0, 3.0, 4.0, 1.5], zero_fractions=[0.0, 0.3, 0.5, 0.9, 0.1])


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("cos_target", [0.9, 0.99])
def test_allocation_meets_budget_and_caps(target, cos_target):
    al = allocate_sparsity(**LAYERS, target=target, cos_target=cos_target, cap=0.95)
    n = torch.tensor(LAYERS["numels"], dtype=torch.float64)
    z = torch.tensor(LAYERS["zero_fractions"], dtype=torch.float64)
    overall = float((n * al.sparsities).sum() / n.sum())
    assert overall == pytest.approx(target, abs=1e-6) and al.overall == pytest.approx(overall)
    assert bool((al.sparsities <= torch.clamp(z, min=0.95) + 1e-12).all())
    assert bool((al.sparsities >= z - 1e-12).all())
    mus = torch.tensor(LAYERS["mus"], dtype=torch.float64)
    sig = torch.tensor(LAYERS["sigmas"], dtype=torch.float64)
    # thresholds reproduce the sparsities through Eq. 8
    assert torch.allclose(expected_sparsity(al.thresholds, mus, sig, z), al.sparsities,
                          atol=1e-9)
    c = pruned_cosine(al.thresholds, mus, sig, 2.7)
    if al.level is None:
        assert bool((c >= cos_target - 1e-9).all())
    else:  # budget too tight: every pruned layer shares one cosine level below the target
        assert al.level < cos_target
        assert bool((c >= al.level - 1e-6).all())


def test_allocation_phase_two_and_infeasible():
    al = allocate_sparsity(**LAYERS, target=0.93, cos_target=0.999, cap=0.95)
    assert al.level is not None and al.overall == pytest.approx(0.93, abs=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        allocate_sparsity(**LAYERS, target=0.96, cap=0.95)
    low = allocate_sparsity([10, 10], [0, 0], [1, 1], [0.6, 0.7], target=0.5)
    assert bool((low.thresholds == 0).all())  # zeros already beyond the target
    with pytest.raises(ValueError, match="sigma.*layer 1"):
        allocate_sparsity([10, 10], [0, 0], [1, math.nan], [0, 0], target=0.5)


def test_topk_is_a_pruner_method_with_its_own_state():
    x = _signed_lognormal(10_000, -5.0, 2.0, seed=12)
    p = Pruner(0.9, "topk")
    assert p.active and p.threshold is None
    y = p(x)
    assert torch.equal(y, topk_prune(x, 0.9))
    assert p.metrics()["sparsity"] == pytest.approx(0.9)
    assert p.state_dict()["method"] == "topk"
    p.update(fit_lognormal(x))  # no threshold to refresh
    assert p.threshold is None
    with pytest.raises(ValueError, match="takes its threshold from each call"):
        p.assign(torch.tensor(1.0))


def test_metrics_accumulate_only_measured_calls():
    x = _signed_lognormal(10_000, -5.0, 2.0, seed=13)
    fit, sample = _fit_and_sample(x)
    p = Pruner(0.8, "lognormal")
    p.update(LayerStats(fit, sample))
    g = torch.Generator().manual_seed(0)
    y1 = p(x, g)
    p(x, g, measure=False)
    y3 = p(x, g)
    m = p.metrics(reset=True)
    assert m["elements"] == 2 * x.numel()
    assert m["sparsity"] == pytest.approx(float(((y1 == 0).sum() + (y3 == 0).sum()) / 20_000))
    assert math.isnan(p.metrics()["sparsity"]) and p.metrics()["elements"] == 0


def test_group_empirical_refresh_equals_each_pruners_own():
    from gradcomp.compressors.pruning import PrunerGroup

    xs = [_signed_lognormal(5000, mu, 2.0, seed=20 + i) for i, mu in enumerate((-6, -3, -8))]
    stats = [LayerStats(*_fit_and_sample(x, seed=i), numel=x.numel()) for i, x in enumerate(xs)]
    group = PrunerGroup(3, 0.8, "empirical")
    group.update(stats)
    for p, s in zip(group, stats):
        own = Pruner(0.8, "empirical")
        own.update(s)
        assert float(p.threshold) == pytest.approx(float(own.threshold), rel=1e-12)
    het = PrunerGroup(3, 0.8, "lognormal", heterogeneous=True, cos_target=0.99)
    het.update([stats[0], None, stats[2]])  # a layer without statistics keeps no threshold
    assert het[1].threshold is None and het[0].threshold is not None
    n0, n2 = stats[0].numel, stats[2].numel
    overall = (het[0].target * n0 + het[2].target * n2) / (n0 + n2)
    assert overall == pytest.approx(0.8, abs=1e-6)
    other = PrunerGroup(3, 0.8, "lognormal", heterogeneous=True)
    other.load_state_dict(het.state_dict())
    assert other[0].target == het[0].target
    assert torch.equal(other[2].threshold, het[2].threshold.cpu().double())
    with pytest.raises(ValueError, match="heterogeneous needs"):
        PrunerGroup(2, 0.8, "atp", heterogeneous=True)
