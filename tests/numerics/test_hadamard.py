import pytest
import scipy.linalg
import torch

from gradcomp.numerics.hadamard import (
    hadamard_matrix,
    hadamard_transform,
    pad_to_block,
    rht,
    rht_inverse,
    rht_signs,
)


@pytest.mark.parametrize("n", [2, 16, 32, 128])
def test_dense_matrix_is_sylvester_and_orthogonal(n):
    h = hadamard_matrix(n)
    ref = torch.from_numpy(scipy.linalg.hadamard(n)).double() / n**0.5
    assert torch.allclose(h, ref, rtol=1e-15, atol=0)
    assert torch.equal(torch.sign(h), torch.sign(ref))
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("n", [16, 32, 128])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_fast_transform_equals_dense(n, dim):
    g = torch.Generator().manual_seed(n)
    shape = [3, 2, 5]
    shape[dim] = 2 * n  # only the transformed dim needs whole blocks
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = hadamard_transform(x, n, dim)
    h = hadamard_matrix(n)
    xm = x.movedim(dim, -1)
    ref = (xm.reshape(*xm.shape[:-1], -1, n) @ h.T).reshape(xm.shape).movedim(-1, dim)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [16, 32, 128])
def test_rht_inverse_reproduces_input_to_float_rounding(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * n, 7, generator=g) * torch.exp(3 * torch.randn(4 * n, 7, generator=g))
    s = rht_signs(n, seed=3)
    y = rht(x, s, dim=0)
    back = rht_inverse(y, s, dim=0)
    # log2(n) butterfly stages each way plus one scaling: a few ulps of the block norm
    tol = 4 * (n.bit_length()) * torch.finfo(torch.float32).eps
    blocks = x.reshape(4, n, 7)
    norm = blocks.norm(dim=1, keepdim=True).expand_as(blocks).reshape_as(x)
    assert ((back - x).abs() <= tol * norm).all()
    # orthogonal: norms preserved per block
    assert torch.allclose(y.reshape(4, n, 7).norm(dim=1), blocks.norm(dim=1), rtol=1e-5)
    # and it is not the identity
    assert not torch.allclose(y, x)


def test_gemm_operands_cancel():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 5, generator=g, dtype=torch.float64)
    b = torch.randn(64, 3, generator=g, dtype=torch.float64)
    s = rht_signs(16, seed=9, dtype=torch.float64)
    prod = rht(a, s, 0).T @ rht(b, s, 0)
    assert torch.allclose(prod, a.T @ b, atol=1e-12)


def test_signs_are_deterministic_and_seeded():
    s1 = rht_signs(128, seed=5)
    assert torch.equal(s1, rht_signs(128, seed=5))
    assert set(s1.tolist()) == {-1.0, 1.0}
    assert not torch.equal(s1, rht_signs(128, seed=6))
    assert not torch.equal(s1, rht_signs(128, seed=5, step=1))
    # torch's global RNG plays no part
    torch.manual_seed(123)
    a = rht_signs(32, seed=0)
    torch.manual_seed(456)
    assert torch.equal(a, rht_signs(32, seed=0))
    # fair coin: 4096 signs within 5 standard errors of half
    big = rht_signs(4096, seed=1)
    assert abs(float((big > 0).double().mean()) - 0.5) < 5 * 0.5 / 64


def test_ragged_sizes_refused_and_padding():
    x = torch.randn(20, 4)
    with pytest.raises(ValueError, match="multiple of block 16"):
        hadamard_transform(x, 16, 0)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.randn(24), 24)
    with pytest.raises(ValueError, match="shape"):
        rht(torch.randn(32), torch.ones(4, 4), 0)
    with pytest.raises(TypeError):
        hadamard_transform(torch.arange(16), 16)
    p = pad_to_block(x, 16, 0)
    assert p.shape == (32, 4) and torch.equal(p[:20], x) and not p[20:].any()
    assert pad_to_block(p, 16, 0) is p


def test_nan_spreads_within_block_only():
    x = torch.zeros(32)
    x[3] = float("nan")
    y = hadamard_transform(x, 16)
    assert torch.isnan(y[:16]).all() and torch.equal(y[16:], torch.zeros(16))


@pytest.mark.parametrize(("dtype", "n", "fns"), [
    (torch.float32, 16, ("hadamard_transform", "rht", "rht_inverse")),
    (torch.float64, 32, ("hadamard_transform",)),  # odd log2(n): a rounded normalisation
    (torch.float64, 2, ("rht_inverse",)),  # the smallest unrolled block
    (torch.float32, 64, ("rht",)),  # above ``UNROLL_MAX``: the reshaping butterfly compiled
])
def test_fused_transforms_equal_the_eager_butterfly_bit_for_bit(dtype, n, fns):
    # the fused pass (blocks along any dim transformed where they lie, the signs in the same
    # pass; unrolled over a block's rows up to ``UNROLL_MAX``) computes the eager butterfly's
    # additions: the same bits, in x's own layout
    from gradcomp.numerics import kernels

    g = torch.Generator().manual_seed(n)
    s = rht_signs(n, 5)
    calls = {"hadamard_transform": (hadamard_transform, n), "rht": (rht, s),
             "rht_inverse": (rht_inverse, s)}
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    for shape, dim in (((4 * n, 24), 0), ((6, 2 * n), -1), ((3, 2 * n, 7), 1),
                       ((2 * n, 3, 5), 0)):
        x = (torch.randn(*shape, generator=g, dtype=dtype)
             * torch.rand(*shape, generator=g, dtype=dtype).pow(8) * 1e4)
        x.view(-1)[::11] = 0.0
        strided = x.transpose(0, -1).contiguous().transpose(0, -1)
        for name in fns:
            fn, arg = calls[name]
            for inp in (x, strided):
                results = []
                for fused in (True, False):
                    kernels.set_compile(fused)
                    try:
                        results.append(fn(inp, arg, dim))
                    finally:
                        kernels.set_compile(None)
                assert torch.equal(results[0].view(bits), results[1].view(bits)), (name, shape)
                assert results[0].shape == x.shape and results[0].is_contiguous()
