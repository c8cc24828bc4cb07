"""compress_gradients and non-finite neural gradients: the skip policy (default), the refresh
that never learns from a non-finite step, and metrics that say when nothing was measured."""

import math

import pytest
import torch
from torch import nn

from gradcomp.config import NONFINITE_POLICIES
from gradcomp.integration.wrap import CompressionConfig, PruneSpec, QuantizeSpec, compress_gradients


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _backward(m, x, poison=False):
    """Backward of a fixed loss; ``poison`` puts one NaN into the neural gradient of m[2]'s
    output before the compressor sees it (a hook registered first)."""
    m.zero_grad(set_to_none=True)
    handles = []
    if poison:
        def fwd(module, inputs, out):
            def bad(g):
                g = g.clone()
                g[0, 0] = math.nan
                return g
            out.register_hook(bad)
        handles.append(m[2].register_forward_hook(fwd, prepend=True))
    m(x).pow(2).sum().backward()
    for h in handles:
        h.remove()


def test_default_skips_a_nonfinite_step_counts_it_and_keeps_thresholds():
    m = _model()
    assert CompressionConfig().nonfinite == "skip" and NONFINITE_POLICIES[0] == "skip"
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.8), refresh_every=2,
                                                metrics_every=1))
    x = torch.randn(64, 8)
    for _ in range(2):  # statistics step, then a compressed one
        _backward(m, x)
        assert h.step(opt) is True
    th = [p.threshold.clone() for p in h.pruners]
    before = [p.detach().clone() for p in m.parameters()]
    assert h.collecting  # step 2 is a refresh step (refresh_every=2)
    refreshes = h.refreshes
    _backward(m, x, poison=True)
    assert h.step(opt) is False
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert h.refreshes == refreshes and h.collecting  # the refresh moved to the next step
    assert all(torch.equal(a, p.threshold) for a, p in zip(th, h.pruners))
    met = h.metrics()["overall"]
    assert (met["skipped_steps"], met["skipped_steps_total"]) == (1, 1)
    assert met["nonfinite"] >= 1  # the NaN and what it spread to in the layer below
    _backward(m, x)
    assert h.step(opt) is True and h.refreshes == refreshes + 1
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    met = h.metrics()["overall"]
    assert (met["skipped_steps"], met["skipped_steps_total"]) == (0, 1)


def test_skip_also_sees_nonfinite_optimizer_gradients_of_uncompressed_layers():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.8)))
    x = torch.randn(16, 8)
    _backward(m, x)
    h.step(opt)
    _backward(m, x)
    m[4].weight.grad[0, 0] = math.inf  # the classifier: not compressed
    assert h.step(opt) is False and h.skipped_steps == 1


@pytest.mark.parametrize("spec", [dict(prune=PruneSpec(0.8)),
                                  dict(prune=PruneSpec(0.8, "empirical")),
                                  dict(prune=None, quantize=QuantizeSpec()),
                                  dict(prune=PruneSpec(0.8), quantize=QuantizeSpec()),
                                  dict(prune=None)])
def test_a_nan_on_a_plain_step_skips_it(spec):
    # a step that is neither a refresh nor a metric step: the layers' flags come from the
    # kernels (0-d float64; with no compressor, the wrapper's own flag) and the optimizer's
    # check, combined in one stack (the usual case)
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = compress_gradients(m, CompressionConfig(**spec, refresh_every=None, metrics_every=1000))
    x = torch.randn(16, 8)
    for _ in range(2):
        _backward(m, x)
        assert h.step(opt) is True
    assert not h.collecting and not h.measuring
    before = [p.detach().clone() for p in m.parameters()]
    _backward(m, x, poison=True)
    assert h.step(opt) is False and h.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    _backward(m, x)
    assert h.step(opt) is True and h.skipped_steps == 1


def test_the_gradient_check_leaves_every_bit_and_sees_any_dtype():
    # the optimizer's gradients are checked by GradScaler's multi-tensor check at an inverse
    # scale of 1: subnormals, -0 and every other value keep their bits, in every float dtype
    # and in flush-to-zero mode; a NaN/inf in any dtype (complex and expanded gradients take
    # the inf-norm) skips the step
    m = _model()
    extra = {
        torch.float64: torch.tensor([5e-324, -0.0, 1.0], dtype=torch.float64),
        torch.float16: torch.tensor([6e-8, -6e-8, -0.0, 2.0], dtype=torch.float16),
        torch.bfloat16: torch.tensor([1e-40, -1e-39, -0.0, 2.0], dtype=torch.bfloat16),
        torch.complex64: torch.tensor([1e-40 + 0j, -0.0 + 1j]),
    }
    params = {dt: nn.Parameter(torch.zeros(v.shape, dtype=dt)) for dt, v in extra.items()}
    wide = nn.Parameter(torch.zeros(4, 3))  # its gradient is set as an expanded view
    opt = torch.optim.SGD([*m.parameters(), *params.values(), wide], lr=0.0)
    h = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.8)))
    x = torch.randn(16, 8)
    special = torch.tensor([1e-40, -1e-45, -0.0, 0.0, 2.0**-149, -3.5])
    assert bool((special.abs() < 1e-38).logical_and(special != 0).any())  # real subnormals
    for flush in (False, True):
        _backward(m, x)
        m[4].bias.grad[:4] = special[:4]
        m[0].weight.grad[0, :6] = special
        for dt, p in params.items():
            p.grad = extra[dt].clone()
        wide.grad = special[:3].expand(4, 3)
        bits = [p.grad.clone() for p in opt.param_groups[0]["params"]]
        # (False where the CPU has no flush-to-zero mode: the same check then)
        torch.set_flush_denormal(flush)
        try:
            assert h.step(opt) is True
        finally:
            torch.set_flush_denormal(False)
        for b, p in zip(bits, opt.param_groups[0]["params"]):
            assert torch.equal(b.view(torch.uint8), p.grad.view(torch.uint8))
    bad = {torch.float64: math.nan, torch.float16: math.inf, torch.bfloat16: -math.inf,
           torch.complex64: complex(math.inf, 0.0)}
    for dt, value in [*bad.items(), (None, math.nan)]:
        _backward(m, x)
        for d, p in params.items():
            p.grad = torch.zeros(p.shape, dtype=d)
        wide.grad = torch.zeros(3).expand(4, 3)
        if dt is None:
            wide.grad = torch.tensor([0.0, value, 0.0]).expand(4, 3)
        else:
            params[dt].grad[1] = value
        skipped = h.skipped_steps
        assert h.step(opt) is False and h.skipped_steps == skipped + 1, dt


@pytest.mark.parametrize("policy", ["keep", "zero"])
def test_keep_and_zero_take_the_step_and_a_garbage_refresh_keeps_old_values(policy):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # weights fixed: only the policy matters
    h = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.8), nonfinite=policy,
                                                refresh_every=2, metrics_every=1))
    x = torch.randn(64, 8)
    for _ in range(2):
        _backward(m, x)
        h.step(opt)
    th = [p.threshold.clone() for p in h.pruners]
    assert h.collecting
    _backward(m, x, poison=True)
    assert h.step(opt) is True and h.skipped_steps == 0
    # m[2] is the second compressed layer: its refresh saw a NaN and kept the old threshold
    # (with "zero" its call saw finite zeros and made its tracking step: still finite)
    if policy == "keep":
        assert torch.equal(h.pruners[1].threshold, th[1])
    assert bool(torch.isfinite(h.pruners[1].threshold)) and h.refreshes == 2
    grad_ok = bool(torch.isfinite(m[0].weight.grad).all())
    assert grad_ok == (policy == "zero")


def test_metrics_before_any_metric_step_say_so():
    m = _model()
    h = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.8)))
    _backward(m, torch.randn(16, 8))
    h.step()  # the statistics step compresses nothing, measures nothing
    met = h.metrics()
    assert met["overall"]["metric_steps"] == 0
    assert met["overall"]["sparsity"] is None and met["overall"]["bits_per_element"] is None
    assert all(row["sparsity"] is None for row in met["layers"].values())
    for _ in range(10):  # metrics_every=10: step 10 is measured
        _backward(m, torch.randn(16, 8))
        h.step()
    met = h.metrics()["overall"]
    assert met["metric_steps"] == 1 and 0.5 < met["sparsity"] < 1


def test_bad_policy_names_the_field():
    with pytest.raises(ValueError, match="nonfinite"):
        CompressionConfig(nonfinite="ignore")
