"""The compressors' hot path (a layer's call per step on the fused path: the bound kernels
called directly, arguments checked when the compressor was set up) gives the bits of the public
numerics functions, whose fused and eager paths the numerics tests already pin to each other."""

from __future__ import annotations

import pytest
import torch

from gradcomp.compressors.pruning import Pruner
from gradcomp.compressors.quantizer import BlockQuantizer, FPQuantizer
from gradcomp.numerics import kernels
from gradcomp.numerics.block import quantize_block_checked
from gradcomp.numerics.fit import LayerStats, fit_lognormal
from gradcomp.numerics.pruning import prune_quantize_amax, stochastic_prune
from gradcomp.numerics.random import StepStreams
from gradcomp.numerics.rounding import quantize_fp_amax


@pytest.fixture(autouse=True)
def _fused():
    kernels.set_compile(True)
    yield
    kernels.set_compile(None)


def _grad(n: int = 64 * 1024, seed: int = 0, bad: bool = False) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3
    g[::50] = 0.0
    if bad:
        g[17], g[400] = float("nan"), float("inf")
    return g.view(64, -1)  # a 2-D layer gradient: the result keeps its shape


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


def _streams(step: int = 3) -> StepStreams:
    st = StepStreams(11, 2)
    st.set_step(step)
    return st


def _pruner(sparsity: float = 0.8) -> Pruner:
    p = Pruner(sparsity, "lognormal")
    s = _grad(seed=1).reshape(-1)
    p.update(LayerStats(fit_lognormal(s), s.clone(), s.numel()))
    return p


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bad", [False, True])
def test_quantizer_hot_path_equals_quantize_fp_amax(rounding, bad):
    q = FPQuantizer("1-4-1", rounding=rounding, scaling="amax", track_metrics=False)
    for step in (3, 4):  # the second call keeps or replaces the first call's scale
        x = _grad(seed=step, bad=bad)
        keep = q.scaling.scale.clone()
        out, flag = q.compress(x, _streams(step).stream(1), check=True)
        want, s, amax = quantize_fp_amax(x, q.fmt, rounding, margin=q.scaling.margin,
                                         keep=keep, generator=_streams(step).stream(1),
                                         compile=False)
        assert out.shape == x.shape
        assert torch.equal(_bits(out), _bits(want))
        assert torch.equal(q.scaling.scale, s)
        assert flag.dtype == torch.float64 and flag.shape == ()
        assert (float(flag) > 0) is bad and bool(torch.isfinite(amax)) is not bad


def test_quantizer_hot_path_measured_counts():
    q = FPQuantizer("1-4-1", scaling="amax", track_metrics=True)
    x = _grad(bad=True)
    out, n = q.compress(x, measure=True)
    want = quantize_fp_amax(x, q.fmt, compile=False)[0]
    assert torch.equal(_bits(out), _bits(want))
    assert float(n) == 2  # measured: the exact number of NaN/inf
    assert q.metrics()["nan"] == 1 / x.numel()


@pytest.mark.parametrize("measure", [False, True])
def test_pruner_hot_path_equals_stochastic_prune(measure):
    p = _pruner()
    x = _grad(seed=5, bad=True)
    a = p.threshold.clone()
    out, flag = p.compress(x, _streams().stream(0), measure=measure, check=True)
    want = stochastic_prune(x, a, _streams().stream(0), compile=False)
    assert torch.equal(_bits(out), _bits(want))
    assert float(flag) == 2 if measure else float(flag) > 0


def test_tracking_in_place_takes_the_counted_calls_steps_bit_for_bit(monkeypatch):
    # the empirical threshold's unmeasured calls on x it may overwrite: the pruning writes x,
    # then one compiled call counts the written x and takes the Newton step
    # (``track_written``); a twin pruner writing new tensors counts in its pruning kernel and
    # steps through ``threshold_step``: the same outputs, thresholds and flags at every call,
    # a NaN/inf call holding the threshold in both
    s = _grad(seed=1).reshape(-1)
    twins = [Pruner(0.8, "empirical"), Pruner(0.8, "empirical")]
    for p in twins:  # a refresh, then a measured call: the slope dS/d ln a of the step
        p.update(LayerStats(fit_lognormal(s), s.clone(), s.numel()))
        p.compress(_grad(seed=2), _streams(2).stream(0), measure=True)
    assert twins[0].tracking and twins[0]._slope is not None
    import gradcomp.compressors.pruning as cp

    calls = []
    real = cp.track_written
    monkeypatch.setattr(cp, "track_written", lambda *a: calls.append(1) or real(*a))
    for step, bad in ((3, False), (4, True), (5, False), (6, False)):
        a0 = twins[0].threshold.clone()
        x = _grad(seed=step, bad=bad)
        outs = []
        for p, into in zip(twins, (True, False)):
            y = x.clone()
            out, flag = p.compress(y, _streams(step).stream(0), measure=False, check=True,
                                   into=into)
            assert (out is y) == into and (float(flag) > 0) == bad
            outs.append(out)
        assert torch.equal(_bits(outs[0]), _bits(outs[1]))
        assert torch.equal(_bits(twins[0].threshold), _bits(twins[1].threshold))
        assert torch.equal(twins[0].threshold, a0) == bad  # held on the NaN/inf call only
    assert len(calls) == 4  # the in-place twin's four calls, the other's none


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_prune_quantize_hot_path_equals_prune_quantize_amax(rounding):
    p = _pruner()
    q = FPQuantizer("1-4-1", rounding=rounding, scaling="amax", track_metrics=False)
    x = _grad(seed=6)
    a, keep = p.threshold.clone(), q.scaling.scale.clone()
    out, flag = p.compress(x, _streams().stream(1), measure=False, check=True, then=q)
    want, s, _ = prune_quantize_amax(x, a, q.fmt, rounding, keep=keep,
                                     generator=_streams().stream(1), compile=False)
    assert torch.equal(_bits(out), _bits(want))
    assert torch.equal(q.scaling.scale, s)
    assert float(flag) == 0


def test_hot_path_steps_aside_for_what_it_does_not_take():
    # a strided x, a half x (its threshold is rounded to it first) and a threshold on another
    # dtype take the public functions: the same results
    p = _pruner()
    x = _grad(seed=7)
    strided = x.t()
    out, _ = p.compress(strided, _streams().stream(0), measure=False)
    assert torch.equal(out, stochastic_prune(strided, p.threshold, _streams().stream(0),
                                             compile=False))
    half = x.to(torch.bfloat16)
    out, _ = p.compress(half, _streams().stream(0), measure=False)
    assert torch.equal(out, stochastic_prune(half, p.threshold, _streams().stream(0),
                                             compile=False))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "nvfp4_2d"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_block_quantizer_hot_path_calls_its_kernels_directly(monkeypatch, fmt, rounding):
    # conv outputs with channels shorter than one block, one block and several (1-D blocks:
    # along the channels in place; 16x16 tiles: channels moved last), and a linear layer's
    # gradient (blocks of a row): after a layer's first call the block kernels run without any
    # operator dispatch (their bound direct calls), bit for bit the public
    # quantize_block_checked's eager path, and the non-finite count is the eager path's
    q = BlockQuantizer(fmt, rounding, track_metrics=False)
    tiles = len(q.fmt.block) == 2
    along = q.fmt if tiles else q.fmt.replace(dims=(1,))
    grads = [_grad(2 * c * 36, seed=c).view(2, c, 6, 6) for c in (16, 32, 64)]
    grads.append(_grad(64 * 1024, seed=5))
    grads[1][1, 3, 2, 2] = float("nan")

    def reference(g, stream):
        if g.dim() == 2:
            return quantize_block_checked(g, q.fmt, rounding, stream, compile=False)
        if not tiles:
            return quantize_block_checked(g, along, rounding, stream, compile=False)
        out, bad = quantize_block_checked(g.movedim(1, -1), q.fmt, rounding, stream,
                                          compile=False)
        return out.movedim(-1, 1), bad

    def check():
        for i, g in enumerate(grads):
            out, bad = q.compress(g, _streams(i).stream(0), check=True)
            want, wbad = reference(g, _streams(i).stream(0))
            assert torch.equal(torch.isnan(out), torch.isnan(want))
            assert torch.equal(_bits(torch.nan_to_num(out).contiguous()),
                               _bits(torch.nan_to_num(want).contiguous()))
            assert (float(bad) > 0) == (int(wbad) > 0) == (i == 1)

    check()
    calls = []  # the operators' dispatch on the fused path (the reference calls it eager)
    real = kernels.FusedOp.__call__
    monkeypatch.setattr(kernels.FusedOp, "__call__",
                        lambda self, *a, **k: calls.append(k.get("compile")) or real(self, *a,
                                                                                    **k))
    check()
    assert calls and True not in calls
