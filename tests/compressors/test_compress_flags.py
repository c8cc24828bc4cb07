"""``compress``: the compressors' non-finite flag (and counts) from the pass they run anyway."""

from __future__ import annotations

import pytest
import torch

from gradcomp.compressors.pruning import Pruner
from gradcomp.compressors.quantizer import BlockQuantizer, FPQuantizer
from gradcomp.numerics.fit import LayerStats, fit_lognormal


def _grad(bad: bool, seed: int = 0) -> torch.Tensor:
    g = torch.randn(3000, generator=torch.Generator().manual_seed(seed)) * 1e-3
    g[::50] = 0.0
    if bad:
        g[17] = float("nan")
        g[400] = float("-inf")
        g[999] = float("inf")
    return g


def _ready_pruner(method: str, sparsity: float = 0.8) -> Pruner:
    p = Pruner(sparsity, method)
    if method not in ("topk", "topk_stochastic"):
        s = _grad(False, seed=1)
        p.update(LayerStats(fit_lognormal(s), s.clone(), s.numel()))
    return p


@pytest.mark.parametrize("scaling", ["amax", "none", "per_layer_optimal"])
def test_quantizer_flag_and_exact_count_on_measured_calls(scaling):
    q = FPQuantizer("1-4-1", scaling=scaling, track_metrics=False)
    for bad in (False, True):
        out, flag = q.compress(_grad(bad), check=True)
        assert flag.dtype == torch.float64 and flag.shape == ()
        assert (float(flag) > 0) is bad
        same = q(_grad(bad))  # the same result as __call__ (bits: NaN stays NaN)
        assert torch.equal(out.view(torch.int32), same.view(torch.int32))
        _, n = q.compress(_grad(bad), measure=True)
        assert float(n) == (3 if bad else 0)  # measured: the exact number
    # unasked, a flag comes only where it is free (the amax of an amax scaling)
    assert (q.compress(_grad(False))[1] is None) is (scaling != "amax")


def test_quantizer_measured_counts_unchanged_by_the_fused_counts():
    q = FPQuantizer("1-3-2", scaling="none", track_metrics=True)
    x = _grad(True) * 1e4  # some overflow, some underflow, NaN and inf
    out = q(x)
    m = q.metrics()
    fin = torch.isfinite(x)
    n = x.numel()
    assert m["nan"] == 1 / n
    assert m["zeros"] == float((out == 0).sum()) / n
    assert m["underflow"] == float(((out == 0) & (x != 0) & fin).sum()) / n
    assert m["overflow"] == float((x.abs() > q.fmt.max_normal).sum()) / n
    assert m["overflow"] > 0 and m["underflow"] > 0


@pytest.mark.parametrize("method", ["empirical", "lognormal", "topk", "topk_stochastic"])
def test_pruner_flag_from_its_pass(method):
    for bad in (False, True):
        p = _ready_pruner(method)
        out, flag = p.compress(_grad(bad), torch.Generator().manual_seed(0), measure=False,
                               check=True)
        assert (float(flag) > 0) is bad
        p2 = _ready_pruner(method)
        ref = p2(_grad(bad), torch.Generator().manual_seed(0), measure=False)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
        _, n = _ready_pruner(method).compress(_grad(bad), torch.Generator().manual_seed(0),
                                              measure=True)
        assert float(n) == (3 if bad else 0)


def test_pruner_before_its_first_update_still_flags():
    p = Pruner(0.8, "lognormal")
    out, flag = p.compress(_grad(True), check=True, measure=False)
    assert float(flag) > 0 and torch.equal(out.nan_to_num(), _grad(True).nan_to_num())
    assert p.compress(_grad(False), measure=False)[1] is None


def test_tracking_with_the_kernel_counts_matches_an_explicit_finite_flag():
    # the pruner's own count (no ``finite``) and the caller's flag drive the same threshold
    a, b = _ready_pruner("empirical"), _ready_pruner("empirical")
    for step in range(6):
        x = _grad(step == 3, seed=10 + step)
        measure = step % 2 == 0
        a(x, torch.Generator().manual_seed(step), measure=measure)
        finite = torch.isfinite(x).all()
        b(x, torch.Generator().manual_seed(step), measure=measure, finite=finite)
        assert torch.equal(a.threshold, b.threshold)
    assert a.metrics() == b.metrics()


def test_block_quantizer_flag():
    q = BlockQuantizer("mxfp8_e4m3", track_metrics=False)
    for bad in (False, True):
        _, flag = q.compress(_grad(bad).reshape(30, 100), check=True)
        assert (float(flag) > 0) is bad
        _, n = q.compress(_grad(bad).reshape(30, 100), measure=True)
        assert float(n) == (3 if bad else 0)


@pytest.mark.parametrize("scaling", ["none", "per_layer_optimal", "amax", "dynamic"])
@pytest.mark.parametrize("method", ["empirical", "lognormal", "topk_stochastic"])
def test_pruner_then_quantizer_equals_the_two_calls(method, scaling, monkeypatch):
    """``Pruner.compress(then=q)``: one kernel where q's scale is known beforehand, else the
    two calls; either way the same output, flags, metrics and tracked threshold as
    pruning then quantizing with the same generator."""
    from gradcomp.compressors import pruning as P

    calls = []
    for name in ("prune_quantize", "prune_quantize_amax"):  # the current amax: its own kernel
        real = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    stats_src = _grad(False, seed=1)
    stats = LayerStats(fit_lognormal(stats_src), stats_src.clone(), stats_src.numel())
    pairs = []
    for _ in range(2):
        p = _ready_pruner(method)
        q = FPQuantizer("1-3-2", "stochastic", scaling=scaling, track_metrics=False)
        q.update(stats)
        pairs.append((p, q))
    (p1, q1), (p2, q2) = pairs
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step, (bad, measure, check) in enumerate([(False, False, True), (True, False, True),
                                                  (False, True, True), (False, False, False),
                                                  (True, True, False)]):
        x = _grad(bad, seed=10 + step)
        a, fa = p1.compress(x, g1, measure=measure, check=check, then=q1)
        b, fb = p2.compress(x, g2, measure=measure, check=check)
        b, _ = q2.compress(b, g2, measure=measure)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert (fa is None) == (fb is None) and (fa is None or float(fa) == float(fb))
        for u, v in ((p1.state_dict(), p2.state_dict()), (q1.counts(), q2.counts()),
                     (p1.counts(), p2.counts())):
            assert u.keys() == v.keys()
            for k in u:
                if isinstance(u[k], torch.Tensor):
                    assert torch.equal(u[k], v[k]), k
                else:
                    assert u[k] == v[k], k
    # every per-tensor scaling runs in the pruning kernel (the top-k method has no kernel)
    kernel = "prune_quantize_amax" if scaling == "amax" else "prune_quantize"
    assert set(calls) == ({kernel} if method != "topk_stochastic" else set())
    assert q1.fusable
    # a block quantizer is never fused: the two calls, the same bits
    p3, p4 = _ready_pruner(method), _ready_pruner(method)
    bq = BlockQuantizer("mxfp4", "stochastic")
    x = _grad(False, seed=30)
    a, _ = p3.compress(x, torch.Generator().manual_seed(4), then=bq)
    g = torch.Generator().manual_seed(4)
    b = bq(p4(x, g), g)
    assert torch.equal(a, b)

