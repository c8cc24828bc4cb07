"""The same code on every available device (CPU always; CUDA where a GPU is present).

On a CUDA machine these tests also check that the hot path never synchronises with the host
(``torch.cuda.set_sync_debug_mode("error")`` turns a sync into an exception).
"""

import contextlib

import pytest
import torch
from torch import nn

from gradcomp.compressors.pruning import stochastic_prune
from gradcomp.integration.wrap import CompressionConfig, PruneSpec, QuantizeSpec, compress_gradients
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.random import StepStreams
from gradcomp.numerics.rounding import quantize_fp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def no_host_sync(device: str):
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_same_bits_as_cpu(device, rounding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp(3 * torch.randn(100_000, generator=g))
    seed_gen = torch.Generator(device=device).manual_seed(7)
    xd, sd = x.to(device), torch.tensor(4.0, device=device)
    # warm-up with the identical call: compilation and the device constants are one-off syncs
    quantize_fp(xd, "e4m3fn", rounding, scale=sd, generator=torch.Generator(device=device))
    with no_host_sync(device):
        q = quantize_fp(xd, "e4m3fn", rounding, scale=sd, generator=seed_gen)
    # the per-element random bits are a hash of (seed, index): the same on every device
    seed_cpu = torch.Generator(device=device).manual_seed(7)
    ref = quantize_fp(x, "e4m3fn", rounding, scale=4.0, generator=seed_cpu)
    assert torch.equal(q.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_on_device_is_unbiased_and_hits_sparsity(device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1_000_000, device=device, generator=g).exp()
    a = torch.tensor(1.0, device=device)
    stochastic_prune(x, a, torch.Generator(device=device))  # warm-up: compilation syncs once
    with no_host_sync(device):
        y = stochastic_prune(x, a, g)
    # E[T(x)] = x: the means agree within 5 standard errors of the pruned mean
    se = (y.double().std() / 1000.0).item()
    assert abs((y.double().mean() - x.double().mean()).item()) < 5 * se
    # lognormal(0, 1) at a = 1: S = Phi(0) - e^0.5 Phi(-1) = 0.2384
    assert abs((y == 0).double().mean().item() - 0.2384) < 0.003


@pytest.mark.parametrize("device", DEVICES)
def test_step_streams_give_the_same_bits_on_every_device_without_sync(device):
    # the keys are built on the host (an accelerator gets them in one non-blocking copy per
    # step and draw): the same streams as on the CPU, and no synchronisation
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    xd, a = x.to(device), torch.tensor(0.5, device=device)
    stochastic_prune(xd, a, StepStreams(1, 3).stream(0))  # warm-up: compilation syncs once
    dev, cpu = StepStreams(9, 3), StepStreams(9, 3)
    dev.set_step(7)
    cpu.set_step(7)
    with no_host_sync(device):
        got = [stochastic_prune(xd, a, dev.stream(i)) for i in (2, 0, 2)]
    want = [stochastic_prune(x, 0.5, cpu.stream(i)) for i in (2, 0, 2)]
    for p, q in zip(got, want):
        assert torch.equal(p.cpu(), q)
    assert not torch.equal(want[0], want[2])  # stream 2's second draw is new noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [
    CompressionConfig(quantize=QuantizeSpec(bits=6), metrics_every=1),
    CompressionConfig(prune=PruneSpec(0.8), metrics_every=1),
    CompressionConfig(prune=PruneSpec(0.8), quantize=QuantizeSpec(bits=6), metrics_every=1),
], ids=["fp6", "prune", "prune+fp6"])
def test_compressed_training_steps_without_host_sync(device, cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    m = m.to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    h = compress_gradients(m, cfg)
    x = torch.randn(32, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (32,), device=device)

    def step():
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()

    for _ in range(2):  # statistics step + refresh (allowed to sync), first compressed step
        step()
        h.step(opt)
    for _ in range(3):
        with no_host_sync(device):
            step()
        h.step(opt)
    met = h.metrics()["overall"]
    assert met["bits_per_element"] <= 32
    if cfg.prune is not None:
        assert 0.5 < met["sparsity"] < 1.0
    h.remove()


@pytest.mark.parametrize("device", DEVICES)
def test_fit_on_device_without_sync(device):
    x = torch.randn(10_000, device=device).exp()
    with no_host_sync(device):
        f = fit_lognormal(x)
    assert abs(float(f.sigma) - 1) < 0.05
