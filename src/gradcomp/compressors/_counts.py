"""Device-side metric accumulators shared by the stateful compressors.

Each compressor adds the counts of its measured calls as 0-d float64 device tensors (no host
sync per call) and the number of elements measured as a host int (a device scalar would cost a
copy); ``metrics()`` turns them into fractions, ``counts()`` hands them to the wrapper raw.
"""

from __future__ import annotations

import math

import torch

from gradcomp.numerics.random import Stream
from gradcomp.numerics.rounding import nonfinite_flag

__all__ = ["CountsMixin", "nonfinite_flag", "read_floats"]


class CountsMixin:
    """``__call__`` / ``_add`` / ``counts`` / ``reset_metrics`` over ``self._acc`` (key -> 0-d
    tensor) and ``self._elements`` (int); the class sets both in its ``__init__``
    (``reset_metrics()``)."""

    _acc: dict
    _elements: int

    def __call__(self, x: torch.Tensor, generator: torch.Generator | Stream | None = None,
                 *args, **kwargs):
        """The compressed tensor alone: ``compress(x, generator, ...)[0]`` (``measure`` adds
        the call to the metrics; see the class's ``compress``)."""
        return self.compress(x, generator, *args, **kwargs)[0]

    def _add(self, key: str, v: torch.Tensor) -> None:
        cur = self._acc.get(key)
        v = v.detach().double()
        self._acc[key] = v if cur is None else cur + v

    def _fractions(self, keys) -> dict:
        """0-d float64 tensors: each count in ``keys`` over the elements measured (NaN before
        any measured call), plus ``elements``."""
        n = self._elements
        out = {}
        for k in keys:
            v = self._acc.get(k)
            out[k] = v / n if (v is not None and n) else torch.tensor(math.nan,
                                                                     dtype=torch.float64)
        out["elements"] = torch.tensor(float(n), dtype=torch.float64)
        return out

    def counts(self, reset: bool = False) -> dict:
        """Raw accumulated counts as 0-d device tensors (no sync), plus ``elements`` (int)."""
        out = dict(self._acc)
        out["elements"] = self._elements
        if reset:
            self.reset_metrics()
        return out

    def reset_metrics(self) -> None:
        self._acc, self._elements = {}, 0


def read_floats(values: dict) -> dict:
    """``values`` (key -> 0-d tensor, number or None) as Python floats, None kept, in the same
    order, with one host transfer per device that holds any of the tensors: ``float()`` on each
    would synchronise an accelerator once per value (the metrics of a 100-layer model read
    several hundred)."""
    out = {}
    by_device: dict = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
        else:
            out[k] = None if v is None else float(v)
    for keys in by_device.values():
        got = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, got.tolist()))
    return {k: out[k] for k in values}
