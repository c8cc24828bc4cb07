import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcomp.compressors.pruning import stochastic_prune
from gradcomp.integration.wrap import (
    CompressionConfig,
    PruneSpec,
    QuantizeSpec,
    compress_gradients,
)
from gradcomp.numerics.random import StepStreams
from gradcomp.numerics.rounding import quantize_fp


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin(x)))


def _grads(model, x, weights):
    model.zero_grad(set_to_none=True)
    (model(x) * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _warm(handle, model, x, weights):
    """One statistics step (the first step never compresses)."""
    _grads(model, x, weights)
    handle.step()


def test_quantized_gradient_equals_operator_applied_by_hand():
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(32, 6), torch.randn(32, 3)
    cfg = CompressionConfig(quantize=QuantizeSpec(format="e4m3fn", scaling="none"),
                            names=("lin",))
    h = compress_gradients(m, cfg)
    _warm(h, m, x, w)
    got = _grads(m, x, w)
    # by hand: the neural gradient at lin's output, quantized, through lin's backward
    h.remove()
    m.zero_grad(set_to_none=True)
    out = m.lin(x)
    out.retain_grad()
    (m.head(torch.relu(out)) * w).sum().backward()
    gq = quantize_fp(out.grad, "e4m3fn")
    assert torch.equal(got["lin.weight"], gq.t() @ x)
    assert torch.equal(got["lin.bias"], gq.sum(0))
    # layers after it are untouched (their gradient does not pass through lin's output)
    assert torch.equal(got["head.weight"], m.head.weight.grad)


def test_pruned_gradient_equals_operator_with_the_step_stream():
    # layer i's d-th stochastic call at step k is keyed by StepStreams(seed): stream i, draw d
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(64, 6), torch.randn(64, 3)
    cfg = CompressionConfig(prune=PruneSpec(0.7), names=("head",))
    h = compress_gradients(m, cfg, seed=5)
    _warm(h, m, x, w)
    th = h.pruners[0].threshold
    assert th is not None and float(th) > 0
    streams = StepStreams(5, 1)
    streams.set_step(h.step_count)
    hid = torch.relu(m.lin(x)).detach()
    # gradient accumulation: two backward passes in one step draw twice (different noise)
    pruned = []
    for _ in range(2):
        th = h.pruners[0].threshold  # the empirical method's tracking moves it per call
        got = _grads(m, x, w)
        pruned.append(stochastic_prune(w, th, streams.stream(0)))  # d(sum(out*w))/d(out) = w
        assert torch.equal(got["head.weight"], pruned[-1].t() @ hid)
    assert not torch.equal(pruned[0] != 0, pruned[1] != 0)
    h.step()  # the next step: its own keys, draw 0 again
    streams.set_step(h.step_count)
    th = h.pruners[0].threshold
    got = _grads(m, x, w)
    assert torch.equal(got["head.weight"], stochastic_prune(w, th, streams.stream(0)).t() @ hid)
    h.remove()


def test_remove_restores_bitwise_identical_training():
    def run(wrap):
        torch.manual_seed(0)
        m = Toy()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if wrap:
            h = compress_gradients(m, CompressionConfig(quantize=QuantizeSpec(bits=5)))
            for _ in range(3):
                _grads(m, torch.randn(8, 6), torch.randn(8, 3))
                h.step()
            h.remove()
            m.load_state_dict(init)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            m.zero_grad()
            (m(torch.randn(8, 6, generator=g)) ** 2).sum().backward()
            opt.step()
        return [p.detach().clone() for p in m.parameters()]

    torch.manual_seed(0)
    init = Toy().state_dict()
    a, b = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_first_step_only_collects_then_compresses():
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(16, 6), torch.randn(16, 3)
    h = compress_gradients(m, CompressionConfig(quantize=QuantizeSpec(format="e2m1fn")))
    h.remove()
    dense = _grads(m, x, w)
    h = compress_gradients(m, CompressionConfig(quantize=QuantizeSpec(format="e2m1fn")))
    assert all(torch.equal(a, b) for a, b in zip(_grads(m, x, w).values(), dense.values()))
    h.step()
    assert not all(torch.equal(a, b) for a, b in zip(_grads(m, x, w).values(), dense.values()))


def test_optimal_format_offsets_and_metrics():
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(64, 6), torch.randn(64, 3)
    chosen = {}
    for off in (0, -1, 1):
        h = compress_gradients(m, CompressionConfig(
            quantize=QuantizeSpec(bits=6, exp_offset=off), metrics_every=1))
        _warm(h, m, x, w)
        _grads(m, x, w)
        h.step()
        chosen[off] = h.format.exp_bits
        met = h.metrics()
        assert met["overall"]["bits_per_element"] == 6.0
        assert 0 <= met["overall"]["underflow"] <= 1
        h.remove()
    assert chosen[-1] == chosen[0] - 1 and chosen[1] == chosen[0] + 1


def test_metrics_read_every_device_count_in_one_transfer(monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 10))
    h = compress_gradients(m, CompressionConfig(
        prune=PruneSpec(0.8), quantize=QuantizeSpec(bits=6), metrics_every=1))
    x = torch.randn(256, 20)
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
        h.step()
    want = h.metrics(reset=False)
    p, q = h.pruners[0], h.quantizers.quantizers[0]
    want_p, want_q = p.metrics(), q.metrics()
    # no per-value conversion of a device scalar (each is a sync on an accelerator): the
    # counts go through one stack and one tolist per device
    lists = []
    real_tolist = torch.Tensor.tolist

    def no_float(t):
        raise AssertionError("float() of a tensor in metrics")

    monkeypatch.setattr(torch.Tensor, "__float__", no_float)
    monkeypatch.setattr(torch.Tensor, "item", no_float)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: lists.append(t.numel())
                        or real_tolist(t))
    got = h.metrics(reset=False)
    assert lists == [5 * 2 + 2]  # five counts and the threshold of two layers, one read
    assert got == want and p.metrics() == want_p and q.metrics() == want_q
    assert want["overall"]["sparsity"] > 0.5 and want["layers"]["0"]["threshold"] > 0
    h.remove()


def test_heterogeneous_meets_budget_on_layers():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 10))
    h = compress_gradients(m, CompressionConfig(
        prune=PruneSpec(0.8, heterogeneous=True), metrics_every=1))
    x = torch.randn(256, 20)
    m(x).pow(2).sum().backward()
    h.step()
    targets = h.metrics()["layers"]
    numel = {n: s.numel for n, s in h.stats.items()}
    overall = sum(targets[n]["target_sparsity"] * numel[n] for n in numel) / sum(numel.values())
    assert overall == pytest.approx(0.8, abs=1e-6)
    assert all(t["target_sparsity"] <= 0.95 + 1e-12 for t in targets.values())
    h.remove()


def test_nonfinite_policy_zero_and_count():
    m = Toy()
    cfg = CompressionConfig(quantize=QuantizeSpec(format="e5m2", scaling="none"),
                            nonfinite="zero", metrics_every=1, names=("head",))
    h = compress_gradients(m, cfg)
    x = torch.randn(4, 6)
    _warm(h, m, x, torch.ones(4, 3))
    _grads(m, x, torch.tensor([[math.nan, 1, 1]] * 4))
    assert torch.isfinite(m.head.weight.grad).all()
    h.step()
    assert h.metrics()["layers"]["head"]["nonfinite"] == 4


def test_dynamic_loss_scale_skips_on_overflow():
    m = Toy()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    cfg = CompressionConfig(quantize=QuantizeSpec(
        format="e2m1fn", scaling="dynamic", scaling_options={"init_scale": 2.0**40}))
    h = compress_gradients(m, cfg)
    _warm(h, m, torch.randn(4, 6), torch.ones(4, 3))
    before = [p.detach().clone() for p in m.parameters()]
    _grads(m, torch.randn(4, 6), torch.ones(4, 3))
    assert h.step(opt) is False  # 2^40 * g overflows e2m1 (max 6): skipped, scale halved
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert float(h.quantizers.global_scaling.scale) == 2.0**39


def test_state_dict_round_trip_and_mismatch():
    torch.manual_seed(0)
    m = Toy()
    cfg = CompressionConfig(prune=PruneSpec(0.6), quantize=QuantizeSpec(bits=6))
    h = compress_gradients(m, cfg, seed=3)
    _warm(h, m, torch.randn(32, 6), torch.randn(32, 3))
    sd = h.state_dict()
    h.remove()
    h2 = compress_gradients(m, cfg)
    h2.load_state_dict(sd)
    assert h2.format == h.format and h2.active
    assert torch.equal(h2.pruners[0].threshold, h.pruners[0].threshold.cpu())
    h2.remove()
    h3 = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.7)))
    with pytest.raises(ValueError, match="another CompressionConfig"):
        h3.load_state_dict(sd)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="prune.method"):
        PruneSpec(0.8, method="magic")
    with pytest.raises(ValueError, match="prune.sparsity"):
        PruneSpec(1.5)
    with pytest.raises(ValueError, match="quantize.scaling"):
        QuantizeSpec(scaling="global")
    with pytest.raises(ValueError, match="types"):
        CompressionConfig(types=("attention",))
    with pytest.raises(ValueError, match="unknown layer"):
        compress_gradients(Toy(), CompressionConfig(names=("nope",)))


def test_works_under_torch_compile():
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(16, 6), torch.randn(16, 3)
    cfg = CompressionConfig(quantize=QuantizeSpec(format="e4m3fn", scaling="none"))
    h = compress_gradients(m, cfg)
    _warm(h, m, x, w)
    ref = _grads(m, x, w)
    cm = torch.compile(m, backend="eager")  # dynamo tracing; inductor is covered elsewhere
    cm.zero_grad(set_to_none=True)
    (cm(x) * w).sum().backward()
    assert all(torch.equal(p.grad, ref[n]) for n, p in m.named_parameters())
    h.remove()


def test_remove_between_forward_and_backward_leaves_the_gradient_alone():
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(16, 6), torch.randn(16, 3)
    h = compress_gradients(m, CompressionConfig(quantize=QuantizeSpec(format="e2m1fn",
                                                                      scaling="none"),
                                                names=("head",)))
    _warm(h, m, x, w)
    ref = Toy()
    ref.load_state_dict(m.state_dict())
    m.zero_grad()
    loss = (m(x) * w).sum()  # forward with the hooks in place
    h.remove()  # ... removed before the backward
    loss.backward()
    (ref(x) * w).sum().backward()
    assert not h.registered
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("scaling", ["per_layer_optimal", "amax"])
def test_prune_then_quantize_uses_one_kernel_where_the_scale_is_known(scaling, monkeypatch):
    """The wrapper hands the quantizer to the pruner: one pass for a scale known beforehand,
    the two calls for a current-amax scale (it needs the pruned tensor's maximum first)."""
    from gradcomp.compressors import pruning as P

    calls = []
    real = P.prune_quantize
    monkeypatch.setattr(P, "prune_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = Toy()
    x, w = torch.randn(64, 6), torch.randn(64, 3)
    cfg = CompressionConfig(prune=PruneSpec(0.6), quantize=QuantizeSpec(bits=6, scaling=scaling),
                            names=("lin",), metrics_every=2)
    h = compress_gradients(m, cfg, seed=1)
    _warm(h, m, x, w)
    for _ in range(3):
        _grads(m, x, w)
        h.step()
    assert bool(calls) is (scaling != "amax")
    met = h.metrics()["layers"]["lin"]
    assert 0.3 < met["sparsity"] < 0.9 and met["nonfinite"] == 0.0


@pytest.mark.parametrize("seed, error", [(1.5, TypeError), (True, TypeError), ("3", TypeError),
                                         (2**64, ValueError), (-(2**63) - 1, ValueError)])
def test_seed_outside_torch_manual_seed_range_is_rejected(seed, error):
    with pytest.raises(error, match="seed"):
        compress_gradients(Toy(), CompressionConfig(prune=PruneSpec(0.7)), seed=seed)


def test_a_numpy_integer_seed_is_that_seed():
    h = compress_gradients(Toy(), CompressionConfig(prune=PruneSpec(0.7)), seed=np.int64(7))
    assert h.seed == 7 and type(h.seed) is int


def test_a_restored_state_brings_its_run_seed():
    # the noise after a restore is the saved run's, whatever seed the new handle was built with
    x, w = torch.randn(64, 6), torch.randn(64, 3)

    def build(seed):
        torch.manual_seed(0)
        m = Toy()
        return m, compress_gradients(m, CompressionConfig(prune=PruneSpec(0.7, "lognormal")),
                                     seed=seed)

    m, h = build(7)
    _warm(h, m, x, w)
    state, weights = h.state_dict(), {k: v.clone() for k, v in m.state_dict().items()}
    want = _grads(m, x, w)["lin.weight"]
    m2, h2 = build(0)
    m2.load_state_dict(weights)
    h2.load_state_dict(state)
    assert h2.seed == 7 and torch.equal(_grads(m2, x, w)["lin.weight"], want)
    m3, h3 = build(0)  # the same restore without the seed (an older state): its own seed
    m3.load_state_dict(weights)
    h3.load_state_dict({k: v for k, v in state.items() if k != "seed"})
    assert h3.seed == 0 and not torch.equal(_grads(m3, x, w)["lin.weight"], want)


def test_a_negative_seed_is_its_value_modulo_two_to_the_64():
    # as torch.manual_seed: -1 and 2**64 - 1 are the same seed (the same compressed gradients)
    x, w = torch.randn(64, 6), torch.randn(64, 3)
    got = []
    for seed in (-1, 2**64 - 1, 0):
        torch.manual_seed(0)
        m = Toy()
        h = compress_gradients(m, CompressionConfig(prune=PruneSpec(0.7, "lognormal")),
                               seed=seed)
        _warm(h, m, x, w)
        got.append(_grads(m, x, w)["lin.weight"])
        h.remove()
    assert torch.equal(got[0], got[1])
    assert not torch.equal(got[0], got[2])  # the seed reaches the noise
