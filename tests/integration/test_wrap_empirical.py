"""Sample-based methods in the wrapper: heterogeneous + empirical thresholds, select="empirical",
defaults."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradcomp.compressors.scaling import PerLayerEmpirical
from gradcomp.integration.wrap import (
    CompressionConfig,
    PruneSpec,
    QuantizeSpec,
    compress_gradients,
    select_split,
)
from gradcomp.numerics import kernels as rounding
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.fp_error import optimal_scale
from gradcomp.numerics.sparsity import empirical_threshold

BATCH, WIDTH = 256, 256  # 65536 neural-gradient elements per layer


@pytest.fixture(autouse=True)
def _eager():
    rounding.set_compile(False)
    yield
    rounding.set_compile(None)


def _signed(mag, g):
    return mag * torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)


def _layers(seed=0):
    """Neural gradients of three kinds: lognormal, bimodal ln|x| (far from lognormal: two
    clusters 6 apart), lognormal with 30% exact zeros."""
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, WIDTH)
    a = _signed(torch.exp(-8 + 2.0 * torch.randn(shape, generator=g)), g)
    centre = torch.where(torch.rand(shape, generator=g) < 0.5, -10.0, -4.0)
    b = _signed(torch.exp(centre + 0.5 * torch.randn(shape, generator=g)), g)
    c = _signed(torch.exp(-6 + 3.0 * torch.randn(shape, generator=g)), g)
    c = c * (torch.rand(shape, generator=g) >= 0.3)
    return [a, b, c]


class Heads(nn.Module):
    """Parallel linear heads; the loss sum(head_k(x) * G_k) makes dL/d(out_k) = G_k exactly."""

    def __init__(self, grads):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, WIDTH) for _ in grads)
        self.grads = grads

    def loss(self, x):
        return sum((h(x) * g).sum() for h, g in zip(self.heads, self.grads))


def _run(spec: PruneSpec, steps=2, sample_size=16384):
    torch.manual_seed(0)
    m = Heads(_layers())
    h = compress_gradients(m, CompressionConfig(prune=spec, sample_size=sample_size, types="linear",
                                                metrics_every=1))
    x = torch.randn(BATCH, 4)
    for _ in range(steps):
        m.zero_grad()
        m.loss(x).backward()
        h.step()
    met = h.metrics()["layers"]
    h.remove()
    return h, met


def _tol(target, m=16384, n=BATCH * WIDTH):
    """5 standard deviations of achieved - allocated sparsity for one layer.

    achieved - allocated = (the sample's estimate of the expected sparsity at a minus its value
    on the layer: per-element terms max(0, 1 - |x|/a) in [0, 1] with mean S, so variance
    <= S(1 - S), over m sample values) + (the operator's Bernoulli draws: variance <= S(1 - S)
    over n elements); so sd <= sqrt(S(1 - S)) sqrt(1/m + 1/n).
    """
    return 5 * math.sqrt(target * (1 - target)) * math.sqrt(1 / m + 1 / n)


def test_heterogeneous_empirical_meets_each_layers_allocation():
    # cos_target 0.99 makes the allocation unequal on these layers
    h, met = _run(PruneSpec(0.8, "empirical", heterogeneous=True, cos_target=0.99))
    numel = {n: s.numel for n, s in h.stats.items()}
    got = {k: (v["sparsity"], v["target_sparsity"]) for k, v in met.items()}
    assert len(set(round(t, 6) for _, t in got.values())) > 1  # really heterogeneous
    for name, (achieved, target) in got.items():
        assert achieved == pytest.approx(target, abs=_tol(target)), name
    overall = sum(got[k][0] * numel[k] for k in got) / sum(numel.values())
    assert overall == pytest.approx(0.8, abs=_tol(0.8))


def test_heterogeneous_lognormal_misses_where_empirical_does_not():
    # at cos_target 0.9 every layer is allocated 0.8; Eq. 8 misses on the bimodal layer
    _, emp = _run(PruneSpec(0.8, "empirical", heterogeneous=True))
    _, ln = _run(PruneSpec(0.8, "lognormal", heterogeneous=True))
    for v in emp.values():
        assert v["sparsity"] == pytest.approx(v["target_sparsity"], abs=_tol(0.8))
    miss = abs(ln["heads.1"]["sparsity"] - ln["heads.1"]["target_sparsity"])
    assert miss > 2 * _tol(0.8)


def test_homogeneous_default_method_is_empirical_and_exact():
    spec = PruneSpec(0.9)
    assert spec.method == "empirical"
    assert CompressionConfig().sample_size == 16384
    h, met = _run(spec)
    for v in met.values():
        assert v["sparsity"] == pytest.approx(0.9, abs=_tol(0.9))
    # the one vectorised solve gives each layer's own empirical threshold (read right after
    # the refresh: each compressed call then moves it by its tracking step)
    h, _ = _run(spec, steps=1)
    for pruner, stats in zip(h.pruners, h.stats.values()):
        own = empirical_threshold(stats.sample, 0.9)
        assert float(pruner.threshold) == pytest.approx(float(own), rel=1e-12)


def test_heterogeneous_needs_a_threshold_for_each_sparsity():
    PruneSpec(0.8, "lognormal", heterogeneous=True)
    with pytest.raises(ValueError, match="prune.heterogeneous"):
        PruneSpec(0.8, "atp", heterogeneous=True)
    with pytest.raises(ValueError, match="quantize.select"):
        QuantizeSpec(select="median")


def _quantized_handle(spec: QuantizeSpec, seed=1):
    g = torch.Generator().manual_seed(seed)
    grads = [_signed(torch.exp(mu + 3.0 * torch.randn(BATCH, WIDTH, generator=g)), g)
             for mu in (-9.0, -6.0)]
    m = Heads(grads)
    h = compress_gradients(m, CompressionConfig(quantize=spec, sample_size=8192, types="linear"))
    m.loss(torch.randn(BATCH, 4)).backward()
    h.step()
    return h


def test_select_empirical_picks_the_least_measured_split():
    h = _quantized_handle(QuantizeSpec(bits=4, select="empirical"))
    errors = h.chosen["errors"]
    assert h.chosen["select"] == "empirical" and len(errors) == 3  # 1-1-2 .. 1-3-0
    best = min(errors, key=errors.get)
    assert h.format.name == best and h.format.bits == 4
    # on lognormal layers the measured choice agrees with the model's (Table 2)
    ln = _quantized_handle(QuantizeSpec(bits=4, select="lognormal"))
    assert ln.format == h.format
    # and the offsets shift it as for the lognormal choice
    off = _quantized_handle(QuantizeSpec(bits=4, select="empirical", exp_offset=-1))
    assert off.format.exp_bits == h.format.exp_bits - 1


def test_select_split_validates_and_uses_each_layer_sample():
    x = torch.exp(-5 + 2.5 * torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    fit = fit_lognormal(x)
    with pytest.raises(ValueError, match="select"):
        select_split(4, [fit], [x], select="mean")
    with pytest.raises(ValueError, match="sample"):
        select_split(4, [fit], select="empirical")
    res = select_split(4, [fit, fit], [x, x], select="empirical")
    centre = optimal_scale(res["fmt"], float(fit.mu), float(fit.sigma))
    _, err = PerLayerEmpirical().search(x, res["fmt"], torch.tensor(centre, dtype=torch.float64))
    assert res["errors"][res["fmt"].name] == pytest.approx(float(err), rel=1e-12)
    assert res["errors"][res["fmt"].name] == min(res["errors"].values())


def test_per_layer_empirical_scaling_in_the_wrapper_and_checkpoint():
    spec = QuantizeSpec(format="1-3-0", scaling="per_layer_empirical")
    h = _quantized_handle(spec)
    pols = [q.scaling for q in h.quantizers.quantizers]
    assert all(isinstance(p, PerLayerEmpirical) and math.isfinite(float(p.error)) for p in pols)
    # mu differs by 3 between the layers: so do the scales (by about e^3)
    ratio = float(pols[0].scale) / float(pols[1].scale)
    assert 10 < ratio < 40
    h2 = _quantized_handle(spec, seed=2)
    h2.load_state_dict(h.state_dict())
    assert all(torch.equal(a.scaling.scale, b.scaling.scale)
               for a, b in zip(h.quantizers.quantizers, h2.quantizers.quantizers))
