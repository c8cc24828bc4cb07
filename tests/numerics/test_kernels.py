"""One compile policy for every fused operator; stochastic_prune lives in numerics."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from gradcomp.numerics import kernels
from gradcomp.numerics.pruning import stochastic_prune
from gradcomp.numerics.rounding import quantize_fp

SRC = Path(__file__).resolve().parents[2] / "src"


def test_exactly_one_module_reads_the_compile_switch():
    out = subprocess.run(["grep", "-rl", "GRADCOMP_COMPILE\"", str(SRC)], capture_output=True,
                         text=True).stdout.split()
    readers = [p for p in out if "environ" in Path(p).read_text()
               and "os.environ.get(\"GRADCOMP_COMPILE\"" in Path(p).read_text()]
    assert [Path(p).name for p in readers] == ["kernels.py"]


def test_set_compile_switches_every_fused_operator(monkeypatch):
    calls = []
    real = torch.compile

    def spy(fn, **kw):
        calls.append(fn.__name__)
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    x = torch.randn(100)
    kernels.set_compile(False)
    try:
        stochastic_prune(x, 0.5, torch.Generator().manual_seed(0))
        quantize_fp(x, "e5m2")
        assert calls == []  # eager everywhere, whatever GRADCOMP_COMPILE says
    finally:
        kernels.set_compile(None)
    with pytest.raises(TypeError, match="enabled"):
        kernels.set_compile("yes")


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPILE", "maybe")
    with pytest.raises(ValueError, match="GRADCOMP_COMPILE must be one of"):
        kernels.compile_enabled()


def test_prune_is_importable_from_every_public_home():
    import gradcomp
    from gradcomp.compressors import pruning

    assert gradcomp.stochastic_prune is stochastic_prune is pruning.stochastic_prune


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_chunks_give_identical_bits_and_bound_the_temporaries(monkeypatch, dtype):
    x = torch.randn(10_007, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1e-3

    def run():
        g = torch.Generator().manual_seed(1)
        return (quantize_fp(x, "e4m3fn", "stochastic", scale=2.0**9, generator=g, compile=False),
                quantize_fp(x, "1-4-1", "nearest", compile=False),
                stochastic_prune(x, 1e-3, g, compile=False))

    whole = run()
    seen = []
    monkeypatch.setattr(kernels, "EAGER_CHUNK", 1000)
    orig_fn = {}

    def wrap(op):
        orig_fn[op] = op.fn

        def fn(x, *rest, start=0):
            seen.append(x.numel())  # the body never sees more than one chunk
            return orig_fn[op](x, *rest, start=start)
        return fn

    from gradcomp.numerics import pruning

    ops = list(kernels._VARIANTS.values()) + [pruning._PRUNE]
    for op in ops:
        monkeypatch.setattr(op, "fn", wrap(op))
    chunked = run()
    for a, b in zip(whole, chunked):
        assert torch.equal(a.view(torch.int64 if dtype == torch.float64 else torch.int32),
                           b.view(torch.int64 if dtype == torch.float64 else torch.int32))
    assert seen and max(seen) == 1000 and len(seen) == 3 * 11
