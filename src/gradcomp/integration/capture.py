"""Record neural gradients (and, for contrast, weights, activations, weight gradients).

A *neural gradient* is dL/dA at a layer's output (the paper's term): the ``grad_output`` a Conv or
Linear layer receives in backward. ``capture_gradients`` puts a forward hook on each selected
module; during a step opened with ``cap.record(step)`` the hook registers a tensor hook on the
output, so the gradient is seen exactly once, when autograd produces it. Outside ``record`` the
hooks return at once (one attribute test per layer call).

Memory: each record keeps cheap reductions (count, zeros, non-finite, amax) of the *whole* tensor
and a bounded random subsample (``sample_size`` values, drawn with replacement by an explicit
generator on the tensor's device, so capture never copies whole tensors of a large model and
never synchronises with the host). ``sample_size=None`` keeps the whole flattened tensor (useful
for small models, where achieved sparsity must be measured on every element).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradcomp.numerics._checks import require_choice
from gradcomp.numerics.random import DeviceGenerators, sample_values

__all__ = ["GradientRecord", "GradientCapture", "capture_gradients", "select_layers", "KINDS"]

KINDS = ("neural", "activation", "weight", "weight_grad")
DEFAULT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class GradientRecord:
    """One captured tensor: its identity, whole-tensor reductions, and a subsample."""

    name: str  # module name (qualified), '#k' appended for the k-th call within one step
    kind: str  # one of KINDS
    step: int
    shape: tuple
    numel: int
    sample: torch.Tensor  # 1-D float32 on the tensor's device
    zeros: torch.Tensor  # 0-d int64: exact zeros in the whole tensor
    nonfinite: torch.Tensor  # 0-d int64: NaN/inf in the whole tensor
    amax: torch.Tensor  # 0-d float32: max |finite value| in the whole tensor
    module_type: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def zero_fraction(self) -> float:
        return float(self.zeros) / max(self.numel, 1)


def select_layers(
    model: nn.Module,
    types: Iterable[type] | None = None,
    names: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    include_batchnorm: bool = False,
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules to instrument, in registration order.

    Args:
        types: module classes to select (default Conv1d/2d/3d and Linear).
        names: exact qualified names to keep, or a predicate ``(name, module) -> bool``.
        include_batchnorm: also select normalisation layers (BatchNorm, LayerNorm, GroupNorm).
        exclude: exact names to drop.
    Raises ValueError naming the unknown entries when ``names``/``exclude`` list a name that the
    model does not have (a typo must not silently select nothing).
    """
    types = tuple(types) if types is not None else DEFAULT_TYPES
    if include_batchnorm:
        types = types + NORM_TYPES
    all_names = {n for n, _ in model.named_modules()}
    exclude = set(exclude)
    unknown = exclude - all_names
    if isinstance(names, (list, tuple, set, frozenset)):
        unknown |= set(names) - all_names
    if unknown:
        raise ValueError(
            f"unknown layer name(s) {sorted(unknown)}; the model's layers are: "
            f"{', '.join(n for n in all_names if n)}"
        )
    out = []
    for n, m in model.named_modules():
        if n in exclude or not n:
            continue
        if callable(names) and not isinstance(names, (list, tuple, set, frozenset)):
            if not names(n, m):
                continue
        elif names is not None:
            if n not in names:
                continue
            out.append((n, m))
            continue
        if isinstance(m, types):
            out.append((n, m))
    return out


class GradientCapture:
    """Holds the hooks and the records; see ``capture_gradients``."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        kinds: Iterable[str],
        sample_size: int | None,
        seed: int,
    ):
        self.kinds = tuple(kinds)
        for k in self.kinds:
            require_choice(k, "kinds", KINDS)
        if sample_size is not None and (not isinstance(sample_size, int) or sample_size < 1):
            raise ValueError(f"sample_size must be a positive int or None, got {sample_size!r}")
        self.model = model
        self.layers = layers
        self.sample_size = sample_size
        self.seed = seed
        self.records: list[GradientRecord] = []
        self._step: int | None = None
        self._calls: dict[str, int] = {}
        self._generator = DeviceGenerators(seed)
        self._handles = []
        self._leaf_hooks = []
        for name, module in layers:
            self._handles.append(module.register_forward_hook(self._make_hook(name, module)))

    # -- hot path ---------------------------------------------------------------------------
    def _make_hook(self, name: str, module: nn.Module):
        def hook(mod, inputs, output):
            if self._step is None or not isinstance(output, torch.Tensor):
                return
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            rname = name if k == 0 else f"{name}#{k + 1}"
            step = self._step
            mtype = type(mod).__name__
            if "activation" in self.kinds:
                self._add(rname, "activation", step, output, mtype)
            if "weight" in self.kinds and getattr(mod, "weight", None) is not None and k == 0:
                self._add(name, "weight", step, mod.weight, mtype)
            if "weight_grad" in self.kinds and k == 0:
                w = getattr(mod, "weight", None)
                if isinstance(w, torch.Tensor) and w.requires_grad:
                    # hooks on leaf tensors persist: removed when the record block closes
                    self._leaf_hooks.append(w.register_hook(
                        lambda g, n=name, s=step: self._add(n, "weight_grad", s, g, mtype)
                    ))
            if "neural" in self.kinds and output.requires_grad:
                output.register_hook(lambda g, n=rname, s=step: self._add(n, "neural", s, g, mtype))

        return hook

    def _add(self, name, kind, step, t: torch.Tensor, mtype: str):
        x = t.detach().reshape(-1)
        a = x.abs()
        finite = torch.isfinite(a)
        zeros = (a == 0).sum()
        nonfinite = (~finite).sum()
        amax = torch.where(finite, a, torch.zeros_like(a)).amax() if x.numel() else a.sum()
        # the one with-replacement sampler; a copy, so records never alias the live gradient
        sample = sample_values(x, self.sample_size, self._generator(x.device)).float().clone()
        self.records.append(
            GradientRecord(
                name=name, kind=kind, step=step, shape=tuple(t.shape), numel=x.numel(),
                sample=sample, zeros=zeros, nonfinite=nonfinite, amax=amax.float(),
                module_type=mtype,
            )
        )

    # -- control ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self, step: int):
        """Record every selected tensor produced inside this block, tagged with ``step``.

        Run the forward *and* the backward of the step inside the block.
        """
        self._step = int(step)
        self._calls = {}
        try:
            yield self
        finally:
            self._step = None
            for h in self._leaf_hooks:
                h.remove()
            self._leaf_hooks = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def by(self, kind: str = "neural", step: int | None = None) -> list[GradientRecord]:
        return [r for r in self.records if r.kind == kind and (step is None or r.step == step)]

    @property
    def steps(self) -> list[int]:
        return sorted({r.step for r in self.records})


@contextlib.contextmanager
def capture_gradients(
    model: nn.Module,
    layers: Iterable[str] | Callable | None = None,
    *,
    types: Iterable[type] | None = None,
    include_batchnorm: bool = False,
    kinds: Iterable[str] = ("neural",),
    sample_size: int | None = 100_000,
    seed: int = 0,
):
    """Context manager recording neural gradients of selected layers at chosen steps.

    Example::

        with capture_gradients(model, sample_size=100_000) as cap:
            for step, (x, y) in enumerate(loader):
                ctx = cap.record(step) if step in (0, 100) else contextlib.nullcontext()
                with ctx:
                    loss_fn(model(x), y).backward()
        cap.by("neural", step=100)  # one GradientRecord per selected layer call

    Args:
        layers: names (or predicate) of the modules; default every Conv and Linear.
        include_batchnorm: also record normalisation-layer outputs.
        kinds: any of "neural" (dL/dA), "activation" (A), "weight" (W), "weight_grad" (dL/dW).
        sample_size: values kept per tensor (with replacement, seeded); None keeps every value.
    The hooks are removed on exit; the records stay available on the returned object.
    """
    sel = select_layers(model, types=types, names=layers, include_batchnorm=include_batchnorm)
    cap = GradientCapture(model, sel, kinds, sample_size, seed)
    try:
        yield cap
    finally:
        cap.remove()
