import torch

from gradcomp.numerics.random import sample_values


def test_sample_values_returns_every_element_of_a_small_tensor():
    x = torch.arange(10.0).reshape(2, 5)
    assert torch.equal(sample_values(x, 10), x.reshape(-1))
    assert torch.equal(sample_values(x, None), x.reshape(-1))


def test_sample_values_draws_with_replacement_and_repeats_with_the_seed():
    big = torch.arange(20000.0) % 100  # 20000 elements holding 100 distinct values
    a = sample_values(big, 5000, torch.Generator().manual_seed(1))
    b = sample_values(big, 5000, torch.Generator().manual_seed(1))
    assert a.shape == (5000,) and torch.equal(a, b)
    assert bool(((a >= 0) & (a < 100)).all())
    assert not torch.equal(a, big[:5000])  # drawn, not a prefix
    # every value is hit (P(miss one) = 100 * 0.99^5000 ~ 1e-19): draws are spread over all
    assert a.unique().numel() == 100
