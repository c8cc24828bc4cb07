"""compress_gradients writes a compressed neural gradient into the gradient's own memory only
when autograd alone holds it; every other gradient is left as it was for whoever else reads it.
The fused kernels are compiled here (the eager path never writes in place)."""

import pytest
import torch
from torch import nn

import gradcomp.integration.wrap as wrap
from gradcomp.integration.wrap import CompressionConfig, PruneSpec, QuantizeSpec, compress_gradients
from gradcomp.numerics import kernels


class _Branches(nn.Module):
    """Four hidden linears whose output gradients reach their hooks in four situations."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)  # -> ReLU: a new tensor, autograd's alone
        self.b = nn.Linear(16, 16)  # -> add: the same tensor also waits for the other branch
        self.c = nn.Linear(16, 16)  # -> ReLU, but an earlier hook keeps its gradient
        self.d = nn.Linear(16, 16)  # -> cat: its gradient is a view of the cat's
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        other = h * 0.5  # recorded before b: its backward runs after b's
        hb = self.b(h) + other
        hc = torch.relu(self.c(hb))
        hd = self.d(hc)
        return self.head(torch.cat([hd, hc, hb], 1))


def _run(config, sole: bool, monkeypatch):
    """Two steps (statistics, then compression) of _Branches; returns (the parameters'
    gradients of the second step, the gradient of c's output as the earlier hook kept it,
    {layer: owned} of the second step)."""
    torch.manual_seed(0)
    m = _Branches()
    kept = []

    def keep(module, inputs, out):  # a user's hook on c's output, registered before ours
        out.register_hook(kept.append)

    m.c.register_forward_hook(keep, prepend=True)
    if not sole:
        monkeypatch.setattr(wrap, "_sole_counts", lambda: None)
    owned = {}
    compress = wrap._Layer.compress

    def spy(self, g, own=False):
        out = compress(self, g, own)
        owned[self.name] = (own, out is g)  # permitted, and written into g
        return out

    monkeypatch.setattr(wrap._Layer, "compress", spy)
    h = compress_gradients(m, config)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        kept.clear()
        m.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
        h.step()
    h.remove()
    monkeypatch.undo()
    return [p.grad.clone() for p in m.parameters()], kept[0].clone(), owned


@pytest.mark.parametrize("config, written", [
    (CompressionConfig(quantize=QuantizeSpec(format="e3m2"), metrics_every=1000), True),
    (CompressionConfig(prune=PruneSpec(0.8, method="lognormal"),
                       quantize=QuantizeSpec(format="e3m2"), metrics_every=1000), True),
    # the empirical threshold's tracking counts the pruned zeros: written in place, then
    # counted in a read-only pass (``numerics.pruning.prune_unchecked``)
    (CompressionConfig(prune=PruneSpec(0.8), metrics_every=1000), True),
    # a metric step's rounding counts its own result: the kernel declines the write
    # (``numerics.rounding.in_place_fuses``), a new tensor
    (CompressionConfig(quantize=QuantizeSpec(format="e3m2"), metrics_every=1), False),
    # a block format's stochastic element kernel on the features of a linear output
    (CompressionConfig(quantize=QuantizeSpec(format="nvfp4", rounding="stochastic"),
                       metrics_every=1000), True),
], ids=["fp", "prune-eq8+fp", "prune-empirical", "fp-measured", "nvfp4"])
def test_in_place_only_where_autograd_alone_holds_the_gradient(config, written, monkeypatch):
    kernels.set_compile(True)
    try:
        grads, kept, owned = _run(config, True, monkeypatch)
        ref_grads, ref_kept, ref_owned = _run(config, False, monkeypatch)
    finally:
        kernels.set_compile(None)
    assert owned == {"a": (True, written), "b": (False, False), "c": (False, False),
                     "d": (False, False)}
    assert all(v == (False, False) for v in ref_owned.values())
    # the same compressed gradients reached every layer's backward, and the gradient the
    # earlier hook kept is the raw one (it was not overwritten by c's compression)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    assert torch.equal(kept, ref_kept)


def test_the_ownership_probe_matches_a_sole_gradient_and_not_a_kept_one():
    # the probe's counts are those of any gradient that autograd alone holds; a reference
    # kept by an earlier hook raises the Python count by one
    sole = wrap._sole_counts()
    assert sole is not None
    seen = []

    class Keeper:
        def grad(self, g):
            counts = wrap._ownership(g)
            seen.append(counts)

    x = torch.ones(3, requires_grad=True)
    y = x * 2.0
    y.register_hook(Keeper().grad)
    (y * 3.0).sum().backward()
    z = x * 2.0
    z.register_hook(lambda g: seen.append(g))  # a hook that keeps g, registered first
    z.register_hook(Keeper().grad)
    (z * 3.0).sum().backward()
    assert seen[0] == sole and seen[2][2] == sole[2] + 1
