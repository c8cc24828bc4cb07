"""``compress_gradients(model, config)``: compressed neural gradients at every selected layer.

Contract (one line): forward is the identity; backward replaces the neural gradient dL/dA of each
selected layer by its compressed version *before* the layer's own backward, so one compressed
tensor feeds both the input-gradient and the weight-gradient products (the authors' code did the
same at each conv output). The wrapper only schedules: the compressors decide (a
``PrunerGroup`` refreshes every layer's threshold, a ``QuantizerGroup`` chooses the format and
the scales) and the numerics compute.

Data flow of one step::

    forward:  A = layer(x); A.register_hook(compress)     (identity, records nothing)
    backward: g = dL/dA -> [statistics on refresh steps] -> prune -> quantize -> layer backward
    handle.step(optimizer): optimizer.step() unless a dynamic loss scale saw an overflow, then,
                            after a statistics step, ``update(stats)`` of both groups with
                            every layer's ``LayerStats`` (fit + sample + numel).

Schedule: the first step of training only gathers statistics (no compression: nothing is known
yet); statistics are then refreshed at the start of each epoch (``refresh_each_epoch``, the
paper's schedule) and/or every ``refresh_every`` steps. On a refresh step the gradient is still
compressed with the previous thresholds; the statistics come from the raw gradient. The
statistics (``fit_lognormal``: mu, sigma, zero fraction, amax) are device reductions; the only
host synchronisation is the refresh itself (one per refresh, all layers at once).

Non-finite neural gradients: excluded from every statistic; with ``nonfinite="keep"`` (default)
they flow on unchanged (a dynamic loss scale sees them and skips the step), with ``"zero"`` they
are replaced by 0 (one extra pass). Either way they are counted on metric steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradcomp.compressors.pruning import PrunerGroup
from gradcomp.compressors.quantizer import SELECTS, QuantizerGroup, select_split
from gradcomp.config import CompressionConfig, PruneSpec, QuantizeSpec
from gradcomp.integration.capture import select_layers
from gradcomp.numerics.fit import LayerStats, layer_stats
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.random import DeviceGenerators

__all__ = ["QuantizeSpec", "PruneSpec", "CompressionConfig", "CompressionHandle",
           "compress_gradients", "select_split", "select_modules", "SELECTS"]

LAYER_TYPES = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "batchnorm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}


def select_modules(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``config`` selects in ``model``, in registration order.

    ``types="auto"``: the conv layers when the model has any, else every linear layer except
    the last one registered (the classifier, whose neural gradient softmax - onehot is not
    lognormal). Raises ValueError saying what to change when nothing is selected.
    """
    names = list(config.names) if config.names else None
    if config.types == "auto":
        convs = select_layers(model, types=LAYER_TYPES["conv"], names=names,
                              exclude=config.exclude)
        if convs:
            sel = convs
        else:
            lin = select_layers(model, types=LAYER_TYPES["linear"], names=names,
                                exclude=config.exclude)
            last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
            sel = [(n, m) for n, m in lin if n not in last]
    else:
        types = tuple(t for name in config.types for t in LAYER_TYPES[name])
        sel = select_layers(model, types=types, names=names, exclude=config.exclude)
    if config.skip_first and sel:
        sel = sel[1:]
    if config.skip_last and sel:
        sel = sel[:-1]
    if not sel:
        kinds = [type(m).__name__ for _, m in model.named_modules()][1:6]
        raise ValueError(
            f"compress_gradients: no layer selected with types={config.types!r}, "
            f"names={config.names!r}, exclude={config.exclude!r}, skip_first/skip_last="
            f"{config.skip_first}/{config.skip_last} (the model has {', '.join(kinds) or 'no'}"
            " ... modules). Set CompressionConfig(types=('linear',)) or names=(...) to choose "
            "the layers; types='auto' needs a conv, or at least two linear layers (the last "
            "one, the classifier, is never compressed)"
        )
    return sel


class _Layer:
    """Per-layer hot path: statistics on refresh steps, then the group's pruner and quantizer.

    Owns only what the wrapper measures itself (elements and non-finite values on metric steps,
    the last refresh's ``LayerStats``); the compressors count their own metrics.
    """

    def __init__(self, handle: CompressionHandle, name: str, index: int):
        self.handle, self.name, self.index = handle, name, index
        self.stats: LayerStats | None = None
        self.numel = 0
        self.elements = 0  # elements measured since the last metrics reset (a host int)
        self.nonfinite: torch.Tensor | None = None

    def compress(self, g: torch.Tensor) -> torch.Tensor:
        h = self.handle
        if not h.registered:  # removed between this forward and its backward
            return g
        self.numel = g.numel()
        if h.collecting:
            self.stats = layer_stats(g, h.config.sample_size, h.generators(g.device))
        if not h.active:
            return g
        measure = h.measuring
        out = g
        if measure:
            self.elements += g.numel()
            bad = (~torch.isfinite(g)).sum().double()
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        if h.config.nonfinite == "zero":
            out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        gen = h.generators(g.device)
        if h.pruners is not None:
            out = h.pruners[self.index](out, gen, measure=measure)
        qs = h.quantizers.quantizers if h.quantizers is not None else None
        if qs is not None:
            out = qs[self.index](out, gen, measure=measure)
        return out


class CompressionHandle:
    """Returned by ``compress_gradients``: drives the schedule, exposes metrics, undoes the wrap.

    Public state: ``layers`` (names in order), ``pruners`` (a ``PrunerGroup`` or None),
    ``quantizers`` (a ``QuantizerGroup`` or None), ``format`` (the FP format once chosen),
    ``chosen`` (how the split was chosen), ``step_count``, ``refreshes``, ``skipped_steps``,
    and the schedule flags ``collecting`` (this step gathers statistics), ``active``
    (compression is on), ``measuring`` (this step counts metrics), ``registered``.
    """

    def __init__(self, model: nn.Module, config: CompressionConfig, seed: int = 0):
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        self.model, self.config, self.seed = model, config, seed
        sel = select_modules(model, config)
        self._layers = [_Layer(self, n, i) for i, (n, _) in enumerate(sel)]
        self.layers = [n for n, _ in sel]
        n = len(sel)
        q, p = config.quantize, config.prune
        self.quantizers = None if q is None else QuantizerGroup(
            n, q.format, q.rounding, q.make_scaling, shared_scaling=q.shared_scaling,
            block_dims=q.block_dims)
        self.pruners = None if p is None else PrunerGroup(
            n, p.sparsity, p.method, heterogeneous=p.heterogeneous, cos_target=p.cos_target,
            cap=p.cap, truncate_k=p.truncate_k)
        self.generators = DeviceGenerators(seed)
        self.step_count = 0
        self.refreshes = 0
        self.skipped_steps = 0
        self.collecting = True  # the first step gathers statistics
        self.active = False  # nothing is compressed before the first refresh
        self.measuring = False
        self._collect_next = False
        self._hooks = [m.register_forward_hook(self._make_hook(layer))
                       for layer, (_, m) in zip(self._layers, sel)]

    @property
    def registered(self) -> bool:
        """False after ``remove()``: a pending backward then passes its gradient unchanged."""
        return bool(self._hooks)

    @property
    def stats(self) -> dict[str, LayerStats | None]:
        """Each layer's statistics of the last refresh step (None before its first backward)."""
        return {layer.name: layer.stats for layer in self._layers}

    @property
    def format(self) -> FPFormat | None:
        return None if self.quantizers is None else self.quantizers.format

    @property
    def chosen(self) -> dict | None:
        return None if self.quantizers is None else self.quantizers.chosen

    # -- hot path -------------------------------------------------------------------------
    @staticmethod
    def _make_hook(layer: _Layer):
        # A gradient hook on the output tensor rather than an identity autograd.Function: the
        # effect is the same (the hook's return value is what the layer's backward receives),
        # but a custom Function's output is a view that an in-place op after the layer (e.g.
        # ReLU(inplace=True)) may not modify. A hook registered before an in-place op receives
        # dL/dA of the layer's own output, so it stays exact there too.
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(layer.compress)

        return hook

    # -- schedule -------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Mark the next step as a statistics step (the paper refreshes at each epoch start)."""
        if self.config.refresh_each_epoch and epoch > 0:
            self.collecting = True

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Finish a training step: optimizer step (unless a dynamic loss scale overflowed),
        then the scheduled refresh. Returns False when the step was skipped."""
        skip = False
        if self.quantizers is not None and self.active:
            found = self.quantizers.step()
            if found is not None:
                skip = bool(found)  # one sync, global loss scaling only
        if optimizer is not None and not skip:
            optimizer.step()
        self.skipped_steps += int(skip)
        if self.collecting:
            self._refresh()
        self.step_count += 1
        every = self.config.refresh_every
        self.collecting = self._collect_next or bool(every and self.step_count % every == 0)
        self._collect_next = False
        self.measuring = self.active and self.step_count % self.config.metrics_every == 0
        return not skip

    def _refresh(self) -> None:
        stats = [layer.stats for layer in self._layers]
        if all(s is None for s in stats):
            return  # no backward reached the layers yet: try again next step
        self.collecting = False
        if self.quantizers is not None:
            self.quantizers.update(stats)
        if self.pruners is not None:
            self.pruners.update(stats)
        self.active = True
        self.refreshes += 1
        self.measuring = self.step_count % self.config.metrics_every == 0

    # -- metrics --------------------------------------------------------------------------
    def _width(self) -> float:
        bpe = None if self.quantizers is None else self.quantizers.bits_per_element
        return 32.0 if bpe is None else bpe  # block formats: elements + block scales

    def bits_per_element(self, counts: dict) -> float:
        """Bits per neural-gradient element of one layer's compressed stream, from its counts
        (``elements``, ``zeros``, ``at_threshold``).

        FP only: the format's width. Pruning: the entropy bound of the symbol stream
        {0, +a, -a, escape} plus the escaped values (32 bits, or the FP width when quantized
        after pruning); the real encoder (``compressors.encoding``) lands within a few % of it.
        """
        n = float(counts.get("elements", 0.0))
        if n == 0:
            return math.nan
        width = self._width()
        if self.pruners is None:
            return width
        p0 = float(counts.get("zeros", 0.0)) / n
        pa = float(counts.get("at_threshold", 0.0)) / n
        pe = max(0.0, 1.0 - p0 - pa)
        h = -sum(p * math.log2(p) for p in (p0, pa, pe) if p > 0)
        return h + pa + pe * width  # + one sign bit per +-a symbol

    def metrics(self, reset: bool = True) -> dict:
        """Per-layer and overall (element-weighted) metrics since the last reset; one sync.

        Keys: sparsity (fraction of zeros in the compressed gradient), overflow and underflow
        (fractions of elements, FP only), nonfinite (count), bits_per_element, threshold /
        target sparsity per layer where pruning. NaN where no metric step ran yet.
        """
        layers = {}
        tot = {"elements": 0.0, "zeros": 0.0, "overflow": 0.0, "underflow": 0.0,
               "nonfinite": 0.0, "bits": 0.0}
        for layer in self._layers:
            i = layer.index
            pc = self.pruners[i].counts(reset) if self.pruners is not None else {}
            qz = self.quantizers.quantizers if self.quantizers is not None else None
            qc = qz[i].counts(reset) if qz is not None else {}
            n = float(layer.elements)
            final = qc if qz is not None else pc  # zeros of the last compressor's output
            acc = {"elements": n, "zeros": float(final.get("zeros", 0.0)),
                   "at_threshold": float(pc.get("at_threshold", 0.0)),
                   "overflow": float(qc.get("overflow", 0.0)),
                   "underflow": float(qc.get("underflow", 0.0)),
                   "nonfinite": float(layer.nonfinite) if layer.nonfinite is not None else 0.0}
            row = {
                "sparsity": acc["zeros"] / n if n else math.nan,
                "overflow": acc["overflow"] / n if n else math.nan,
                "underflow": acc["underflow"] / n if n else math.nan,
                "nonfinite": acc["nonfinite"],
                "bits_per_element": self.bits_per_element(acc),
            }
            if self.pruners is not None:
                p = self.pruners[i]
                row["threshold"] = float(p.threshold) if p.threshold is not None else math.nan
                row["target_sparsity"] = p.target
            layers[layer.name] = row
            if n:
                tot["elements"] += n
                for k in ("zeros", "overflow", "underflow", "nonfinite"):
                    tot[k] += acc[k]
                tot["bits"] += row["bits_per_element"] * n
            if reset:
                layer.elements, layer.nonfinite = 0, None
        n = tot["elements"]
        overall = {
            "sparsity": tot["zeros"] / n if n else math.nan,
            "overflow": tot["overflow"] / n if n else math.nan,
            "underflow": tot["underflow"] / n if n else math.nan,
            "nonfinite": tot["nonfinite"],
            "bits_per_element": tot["bits"] / n if n else 32.0,
            "skipped_steps_total": self.skipped_steps,
        }
        if self.format is not None:
            overall["format"] = self.format.name
        return {"overall": overall, "layers": layers}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "layers": self.layers,
            "numels": [layer.numel for layer in self._layers],
            "step_count": self.step_count, "refreshes": self.refreshes,
            "skipped_steps": self.skipped_steps, "collecting": self.collecting,
            "active": self.active,
            "generators": self.generators.state_dict(),
            "quantizers": None if self.quantizers is None else self.quantizers.state_dict(),
            "pruners": None if self.pruners is None else self.pruners.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError("compressor state was saved with another CompressionConfig")
        if list(state["layers"]) != self.layers:
            raise ValueError(f"compressor state is for layers {list(state['layers'])}, "
                             f"this model has {self.layers}")
        self.step_count, self.refreshes = state["step_count"], state["refreshes"]
        self.skipped_steps = state["skipped_steps"]
        self.collecting, self.active = state["collecting"], state["active"]
        self.generators.load_state_dict(state["generators"])
        for layer, n in zip(self._layers, state["numels"]):
            layer.numel = n
        if self.quantizers is not None:
            self.quantizers.load_state_dict(state["quantizers"])
        if self.pruners is not None:
            self.pruners.load_state_dict(state["pruners"])
        self.measuring = self.active and self.step_count % self.config.metrics_every == 0

    def remove(self) -> None:
        """Remove every hook: the model is exactly as before (parameters were never touched)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def compress_gradients(model: nn.Module, config: CompressionConfig,
                       seed: int = 0) -> CompressionHandle:
    """Compress the neural gradients of ``model``'s selected layers as ``config`` says.

    Call ``handle.step(optimizer)`` in place of ``optimizer.step()`` (it drives the statistics
    schedule and the dynamic loss scale) and ``handle.on_epoch_start(epoch)`` at each epoch.
    ``seed`` seeds the compressors' generators (stochastic rounding/pruning, samples).
    """
    return CompressionHandle(model, config, seed)
