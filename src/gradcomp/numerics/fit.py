"""Lognormal fit of neural gradients (section 3: ln|g| of the non-zeros ~ N(mu, sigma^2)).

``ln|g|`` of a layer's neural gradient is close to normal. The fit drops exact zeros (after a
ReLU many neural gradients are exactly 0) and non-finite values, and reports both counts, so a
consumer never sees a silent NaN: with no value left to fit, ``mu`` and ``sigma`` are NaN *and*
``count == 0`` says why; ``ok`` is the flag to branch on.

Everything is computed with tensor reductions on the tensor's device, in float64 for the
moments, with no host synchronisation (the result holds 0-d tensors); call ``.to_dict()`` or
read ``float(fit.mu)`` only where a host value is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from gradcomp.numerics._checks import require_float_tensor
from gradcomp.numerics.random import sample_values

__all__ = ["LayerStats", "LognormalFit", "fit_lognormal", "layer_stats", "lognormal_moments"]


@dataclass(frozen=True)
class LognormalFit:
    """Statistics of one tensor (or one batch of stacked tensors), all as tensors.

    Attributes:
        mu: mean of ln|g| over finite non-zero values (NaN when ``count == 0``).
        sigma: population std of ln|g| over the same values (NaN when ``count == 0``, 0 for 1).
        zero_fraction: exact zeros / finite values (NaN-free: 0 when there is no finite value).
        count: number of finite non-zero values used for mu and sigma.
        numel: number of elements in the input.
        nonfinite: number of NaN / +-inf values dropped.
        amax: max |g| over finite values (0 when none).
        mean_log2: mean of log2|g| over the used values (= mu / ln 2), the authors' scale statistic.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    zero_fraction: torch.Tensor
    count: torch.Tensor
    numel: torch.Tensor
    nonfinite: torch.Tensor
    amax: torch.Tensor

    @property
    def mean_log2(self) -> torch.Tensor:
        return self.mu / torch.log(torch.tensor(2.0, dtype=self.mu.dtype, device=self.mu.device))

    @property
    def ok(self) -> torch.Tensor:
        """True where there were at least two values to fit (a usable mu and sigma)."""
        return self.count >= 2

    def to_dict(self) -> dict:
        """Host copy (one sync) as plain Python numbers (lists when batched)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name).detach().cpu()
            out[f.name] = v.item() if v.dim() == 0 else v.tolist()
        return out

    def to(self, device) -> LognormalFit:
        return LognormalFit(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def fit_lognormal(t: torch.Tensor, dim: int | None = None) -> LognormalFit:
    """Fit ln|t| ~ N(mu, sigma^2) on the finite non-zero entries of ``t``.

    Args:
        t: any floating tensor (float16/bfloat16/float32/float64), any device, any shape.
            Integer tensors raise TypeError. An empty tensor gives count 0 (mu, sigma NaN).
        dim: None fits the whole tensor; an int fits each slice along ``dim`` independently
            (e.g. ``dim=1`` on a (layers, samples) matrix fits every row in one call).

    Returns:
        A LognormalFit of float64 0-d tensors (or 1-d along the kept dimension).
    Never raises on NaN/inf/zeros: they are counted and excluded.
    """
    require_float_tensor(t, "t")
    x = t.detach()
    if dim is None:
        x = x.reshape(-1)
        dim = 0
    x = x.to(torch.float64)
    finite = torch.isfinite(x)
    a = x.abs()
    used = finite & (a > 0)
    n_used = used.sum(dim)
    n_finite = finite.sum(dim)
    numel = torch.full_like(n_used, x.shape[dim]) if x.numel() else n_used.clone()
    # log of 1 where not used, so masked entries contribute exactly 0 to the sums
    logs = torch.where(used, a, torch.ones_like(a)).log()
    s1 = logs.sum(dim)
    cnt = n_used.to(torch.float64)
    mu = s1 / cnt  # NaN when cnt == 0: flagged by count, documented
    dev = torch.where(used, logs - mu.unsqueeze(dim), torch.zeros_like(logs))
    var = (dev * dev).sum(dim) / cnt
    sigma = var.sqrt()
    zero_fraction = torch.where(
        n_finite > 0, (n_finite - n_used).to(torch.float64) / n_finite.clamp_min(1), 0.0
    )
    amax = torch.where(finite, a, torch.zeros_like(a)).amax(dim) if x.numel() else cnt * 0
    return LognormalFit(
        mu=mu,
        sigma=sigma,
        zero_fraction=zero_fraction,
        count=n_used,
        numel=numel,
        nonfinite=numel - n_finite,
        amax=amax,
    )


def lognormal_moments(mu, sigma):
    """Mean and variance of a lognormal with ln-parameters (mu, sigma); works on tensors/floats."""
    mu = torch.as_tensor(mu, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    mean = torch.exp(mu + sigma**2 / 2)
    var = (torch.exp(sigma**2) - 1) * torch.exp(2 * mu + sigma**2)
    return mean, var


@dataclass(frozen=True)
class LayerStats:
    """What a refresh step knows about one layer's gradient: every compressor's ``update`` input.

    fit: ``fit_lognormal`` of the whole tensor (mu, sigma, zero fraction, amax, counts: device
        tensors). sample: a 1-D float32 sample of its values (zeros included; drawn with
        replacement, ``gradcomp.numerics.random.sample_values``), or None. numel: the tensor's
        element count as a host int (the element weights of the heterogeneous allocation),
        or None when unknown.
    """

    fit: LognormalFit
    sample: torch.Tensor | None = None
    numel: int | None = None

    def __post_init__(self):
        if not isinstance(self.fit, LognormalFit):
            raise TypeError(f"fit must be a LognormalFit, got {type(self.fit).__name__}")
        if self.sample is not None:
            require_float_tensor(self.sample, "sample")

    @property
    def amax(self) -> torch.Tensor:
        """max |g| over the finite values (0-d device tensor)."""
        return self.fit.amax

    @classmethod
    def of(cls, stats) -> LayerStats:
        """``stats`` itself, or ``LayerStats(stats)`` for a bare ``LognormalFit``."""
        if isinstance(stats, LayerStats):
            return stats
        if isinstance(stats, LognormalFit):
            return cls(stats)
        raise TypeError(f"stats must be a LayerStats or a LognormalFit, got {type(stats).__name__}")


def layer_stats(g: torch.Tensor, sample_size: int | None,
                generator: torch.Generator | None = None) -> LayerStats:
    """``LayerStats`` of a gradient: its lognormal fit and a sample of ``sample_size`` values
    (float32, a copy) drawn on ``generator`` (``sample_values``). Device work only."""
    sample = sample_values(g, sample_size, generator).float().clone()
    return LayerStats(fit_lognormal(g), sample, int(g.numel()))
