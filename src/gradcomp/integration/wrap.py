"""``compress_gradients(model, config)``: compressed neural gradients at every selected layer.

Contract (one line): forward is the identity; backward replaces the neural gradient dL/dA of each
selected layer by its compressed version *before* the layer's own backward, so one compressed
tensor feeds both the input-gradient and the weight-gradient products (notes, vocabulary; the
authors' code did the same at each conv output).

Data flow of one step::

    forward:  A = layer(x); A.register_hook(compress)     (identity, records nothing)
    backward: g = dL/dA -> [statistics on refresh steps] -> prune -> quantize -> layer backward
    handle.step(optimizer): optimizer.step() unless a dynamic loss scale saw an overflow, then,
                            after a statistics step, one host-side refresh of every layer:
                            thresholds (Eq. 8 / empirical / calibrated / ATP), heterogeneous
                            allocation, scales, and (once) the E* format (Table 2).

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

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from gradcomp.compressors.pruning import PRUNE_METHODS, Pruner, allocate_sparsity, topk_prune
from gradcomp.compressors.quantizer import FPQuantizer
from gradcomp.compressors.scaling import SCALING_POLICIES, PerLayerEmpirical, make_scaling
from gradcomp.integration.capture import select_layers
from gradcomp.numerics._checks import require_choice, require_open_unit
from gradcomp.numerics.fit import LognormalFit, fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.random import DeviceGenerators
from gradcomp.numerics.rounding import ROUNDINGS
from gradcomp.numerics.sparsity import empirical_threshold

__all__ = ["QuantizeSpec", "PruneSpec", "CompressionConfig", "CompressionHandle",
           "compress_gradients", "select_split", "SELECTS"]

LAYER_TYPES = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "batchnorm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}
GLOBAL_SCALINGS = ("static", "dynamic")  # one policy object shared by every layer
PRUNE_ALL_METHODS = PRUNE_METHODS + ("topk",)
SELECTS = ("lognormal", "empirical")  # how format "optimal" picks its split
HETEROGENEOUS_METHODS = ("lognormal", "empirical")
SAMPLE_SCALINGS = ("per_layer_optimal", "per_layer_empirical")  # take the spec's rounding


@dataclass(frozen=True)
class QuantizeSpec:
    """FP quantization of neural gradients.

    format: a format name (``"e5m2"``, ``"e4m3fn"``, ``"1-4-1"``, ``"e3m2"``...) or ``"optimal"``:
        the split E* with the least error, chosen once at the first refresh as ``select``
        says, then shifted by ``exp_offset`` exponent bits (Table 3's E*+1, E*-1, E*-2).
    select: how ``"optimal"`` picks E* (``select_split``): ``"lognormal"`` (default), the exact
        expected error of the lognormal model at the median sigma over layers
        (``optimal_format``, paper Table 2), or ``"empirical"``, the least mean over layers of
        the error measured on each layer's refresh sample at its own best scale (distribution
        free, issue 8). On real resnet20/Fashion-MNIST gradients both chose the same split at
        every width 4-8 (``gradcomp fitcheck``), so the model, which needs no sample and no
        search, is the default. A fixed format has no split to choose: ``select`` is unused.
    bits: total bits for ``"optimal"`` (4..8 in the paper).
    semantics: ``"paper"`` (Eq. 2) or ``"ieee"`` for ``"optimal"`` and ``"1-X-Y"`` names.
    rounding: ``"nearest"`` (ties to even) or ``"stochastic"``.
    scaling: a ``make_scaling`` name; ``static``/``dynamic`` are global (one shared loss scale);
        ``per_layer_optimal`` (lognormal exact error) and ``per_layer_empirical`` (error
        measured on the refresh sample) are optimised for ``rounding``.
    scaling_options: keyword arguments of the scaling policy (e.g. ``{"scale": 8192.0}``).
    """

    format: str = "optimal"
    bits: int | None = 6
    exp_offset: int = 0
    select: str = "lognormal"
    semantics: str = "paper"
    rounding: str = "nearest"
    scaling: str = "per_layer_optimal"
    scaling_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        require_choice(self.semantics, "quantize.semantics", ("paper", "ieee"))
        require_choice(self.select, "quantize.select", SELECTS)
        require_choice(self.rounding, "quantize.rounding", ROUNDINGS)
        require_choice(self.scaling, "quantize.scaling", tuple(SCALING_POLICIES))
        if self.format == "optimal":
            if not isinstance(self.bits, int) or not 3 <= self.bits <= 16:
                raise ValueError(f"quantize.bits must be an int in [3, 16] with format "
                                 f"'optimal', got {self.bits!r}")
        else:
            self.fixed_format()  # raises with the allowed names
            if self.exp_offset:
                raise ValueError("quantize.exp_offset applies to format 'optimal' only")

    def fixed_format(self) -> FPFormat:
        if self.format.count("-") == 2:  # the paper's 1-X-Y notation
            _, e, m = self.format.split("-")
            make = FPFormat.paper if self.semantics == "paper" else FPFormat.ieee
            return make(int(e), int(m))
        return FPFormat.from_name(self.format)

    def make_scaling(self):
        """A new scaling policy of this spec (the rounding-aware ones get ``rounding``)."""
        opts = dict(self.scaling_options)
        if self.scaling in SAMPLE_SCALINGS:
            opts.setdefault("rounding", self.rounding)
        return make_scaling(self.scaling, **opts)


@dataclass(frozen=True)
class PruneSpec:
    """Stochastic pruning of neural gradients (Eq. 5) at a target sparsity.

    method: ``empirical`` (default: the exact expected sparsity on the layer's refresh sample,
        distribution free; on real resnet20/Fashion-MNIST gradients it missed the target by
        0.2 points on average over layers and targets 0.5-0.95 with a 16384-value sample, Eq. 8
        by 1.4-1.6: see ``gradcomp fitcheck``), ``lognormal`` (the paper's Eq. 8),
        ``calibrated``, ``atp``
        (normal assumption), ``topk_stochastic`` (k-th largest |g| then the stochastic
        operator) or ``topk`` (deterministic top-k, biased: meProp/SAW).
    heterogeneous: per-layer sparsities S_i from ``allocate_sparsity`` (appendix A.9, lognormal
        closed forms) meeting the overall element-weighted target exactly; ``cos_target`` and
        ``cap`` as there. Method ``lognormal`` prunes each layer at the Eq. 8 threshold of S_i,
        ``empirical`` at ``empirical_threshold(sample_i, S_i)`` (each layer then meets its S_i
        up to sampling error, so the overall budget holds on non-lognormal gradients too).
    """

    sparsity: float = 0.8
    method: str = "empirical"
    heterogeneous: bool = False
    cos_target: float = 0.9
    cap: float = 0.95
    truncate_k: float | None = 2.7

    def __post_init__(self):
        require_open_unit(self.sparsity, "prune.sparsity")
        require_choice(self.method, "prune.method", PRUNE_ALL_METHODS)
        require_open_unit(self.cos_target, "prune.cos_target")
        require_open_unit(self.cap, "prune.cap")
        if self.heterogeneous and self.method not in HETEROGENEOUS_METHODS:
            raise ValueError("prune.heterogeneous needs prune.method 'lognormal' or 'empirical' "
                             f"(thresholds for the allocated sparsities), got {self.method!r}")


@dataclass(frozen=True)
class CompressionConfig:
    """What ``compress_gradients`` does, and where and when.

    quantize / prune: the steps (either, both: prune then quantize, or neither: a no-op wrap).
    types: layer kinds whose outputs are compressed: any of ``conv``, ``linear``, ``batchnorm``.
    names: if given, exactly these module names; exclude: names to skip.
    skip_first / skip_last: leave the first / last selected layer uncompressed.
    refresh_every: refresh statistics every N steps (None: only per epoch / first step).
    refresh_each_epoch: refresh at the first step of every epoch (the paper's schedule).
    sample_size: values per layer drawn (with replacement) on refresh steps for the sample-based
        methods: empirical thresholds, ATP, ``per_layer_empirical`` scaling and
        ``select="empirical"``. Default 16384: the empirical threshold's error shrinks as
        1/sqrt(size) (mean miss on real gradients 0.39 points at 4096, 0.22 at 16384, 0.10 at
        65536); between refreshes the gradients drift by more than that (3-4 points after 150
        steps), so a larger sample buys little: refresh more often instead. The sample is
        drawn and sorted only on refresh steps.
    metrics_every: count sparsity / overflow / underflow / non-finite every N steps (extra
        reductions cost time; metrics are then a systematic sample of the steps).
    nonfinite: ``keep`` or ``zero`` (module docstring).
    """

    quantize: QuantizeSpec | None = None
    prune: PruneSpec | None = None
    types: tuple = ("conv", "linear")
    names: tuple | None = None
    exclude: tuple = ()
    skip_first: bool = False
    skip_last: bool = False
    refresh_every: int | None = None
    refresh_each_epoch: bool = True
    sample_size: int = 16384
    metrics_every: int = 10
    nonfinite: str = "keep"

    def __post_init__(self):
        for t in self.types:
            require_choice(t, "types", tuple(LAYER_TYPES))
        require_choice(self.nonfinite, "nonfinite", ("keep", "zero"))
        for name in ("sample_size", "metrics_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.refresh_every is not None and (
            not isinstance(self.refresh_every, int) or self.refresh_every < 1
        ):
            raise ValueError(f"refresh_every must be a positive int or None, got "
                             f"{self.refresh_every!r}")
        if self.quantize is not None and not isinstance(self.quantize, QuantizeSpec):
            raise TypeError("quantize must be a QuantizeSpec or None")
        if self.prune is not None and not isinstance(self.prune, PruneSpec):
            raise TypeError("prune must be a PruneSpec or None")


class _Layer:
    """Per-layer state: compressors, pending statistics, metric accumulators (device tensors)."""

    def __init__(self, handle: CompressionHandle, name: str, index: int):
        self.handle, self.name, self.index = handle, name, index
        self.pruner: Pruner | None = None
        self.quantizer: FPQuantizer | None = None
        self.fit: LognormalFit | None = None
        self.sample: torch.Tensor | None = None
        self.numel = 0
        self.elements = 0  # elements measured since the last metrics reset
        self.acc: dict[str, torch.Tensor] = {}

    def compress(self, g: torch.Tensor) -> torch.Tensor:
        h = self.handle
        self.numel = g.numel()
        if h._collecting:
            self.fit = fit_lognormal(g)
            flat = g.detach().reshape(-1)
            k = h.config.sample_size
            if flat.numel() > k:
                idx = torch.randint(flat.numel(), (k,), device=flat.device,
                                    generator=h._generator(flat.device))
                flat = flat[idx]
            self.sample = flat.float().clone()
        if not h._active:
            return g
        measure = h._measuring
        if self.quantizer is not None:
            self.quantizer.track_metrics = measure
        out = g
        if measure:
            self.elements += g.numel()  # a host number: a device scalar would be a copy
            self._add("nonfinite", (~torch.isfinite(g)).sum().double())
        if h.config.nonfinite == "zero":
            out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        gen = h._generator(g.device)
        spec = h.config.prune
        if spec is not None:
            if spec.method == "topk":
                out = topk_prune(out, self.pruner.sparsity)
            else:
                self.pruner.track_sparsity = measure  # the wrapper counts zeros itself
                out = self.pruner(out, gen)
            if measure:
                th = self.pruner.threshold
                if th is not None and spec.method != "topk":
                    at = (out.abs() == th.to(out.dtype)).sum().double()
                    self._add("at_threshold", at)  # +-a symbols (for the entropy estimate)
        if self.quantizer is not None:
            out = self.quantizer(out, gen)
            if measure:
                m = self.quantizer.metrics(sync=False)
                n = float(g.numel())
                self._add("overflow", m["overflow"] * n)
                self._add("underflow", m["underflow"] * n)
        if measure:
            self._add("zeros", (out == 0).sum().double())
        return out

    def _add(self, key: str, v: torch.Tensor) -> None:
        cur = self.acc.get(key)
        self.acc[key] = v.detach().double() if cur is None else cur + v.detach().double()


class CompressionHandle:
    """Returned by ``compress_gradients``: drives the schedule, exposes metrics, undoes the wrap."""

    def __init__(self, model: nn.Module, config: CompressionConfig, seed: int = 0):
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        self.model, self.config, self.seed = model, config, seed
        types = tuple(t for name in config.types for t in LAYER_TYPES[name])
        sel = select_layers(model, types=types, names=list(config.names) if config.names else None,
                            exclude=config.exclude)
        if config.skip_first and sel:
            sel = sel[1:]
        if config.skip_last and sel:
            sel = sel[:-1]
        if not sel:
            raise ValueError("compress_gradients: no layer selected (check types/names/exclude)")
        self.layers = [_Layer(self, n, i) for i, (n, _) in enumerate(sel)]
        self.format: FPFormat | None = None
        self._global_scaling = None
        self._generator = DeviceGenerators(seed)
        self.step_count = 0
        self.refreshes = 0
        self.skipped_steps = 0
        self._collecting = True  # the first step gathers statistics
        self._active = False  # nothing is compressed before the first refresh
        self._measuring = False
        self._allocation = None
        self._hooks = [m.register_forward_hook(self._make_hook(layer))
                       for layer, (_, m) in zip(self.layers, sel)]

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
            self._collecting = True

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Finish a training step: optimizer step (unless a dynamic loss scale overflowed),
        then the scheduled refresh. Returns False when the step was skipped."""
        skip = False
        if self._global_scaling is not None and self._active:
            skip = bool(self._global_scaling.step())  # one sync, dynamic loss scaling only
        if optimizer is not None and not skip:
            optimizer.step()
        self.skipped_steps += int(skip)
        if self._collecting:
            self._refresh()
        self.step_count += 1
        every = self.config.refresh_every
        self._collecting = self._collecting_next or bool(every and self.step_count % every == 0)
        self._collecting_next = False
        self._measuring = self._active and self.step_count % self.config.metrics_every == 0
        return not skip

    _collecting_next = False

    def _refresh(self) -> None:
        live = [layer for layer in self.layers if layer.fit is not None]
        if not live:
            return  # no backward reached the layers yet: try again next step
        self._collecting = False
        cfg = self.config
        if cfg.quantize is not None:
            self._refresh_quantizers(live)
        if cfg.prune is not None:
            self._refresh_pruners(live)
        self._active = True
        self.refreshes += 1
        self._measuring = self.step_count % self.config.metrics_every == 0

    def _choose_format(self, live) -> FPFormat:
        spec = self.config.quantize
        if spec.format != "optimal":
            return spec.fixed_format()
        ok = [layer for layer in live if bool(layer.fit.ok)]
        sel = select_split(spec.bits, [layer.fit for layer in ok],
                           [layer.sample for layer in ok], select=spec.select,
                           semantics=spec.semantics, rounding=spec.rounding)
        e_star = sel["fmt"].exp_bits
        e = min(max(e_star + spec.exp_offset, 1), spec.bits - 1)
        make = FPFormat.paper if spec.semantics == "paper" else FPFormat.ieee
        self.chosen = {"select": spec.select, "sigma": sel["sigma"], "e_star": e_star,
                       "exp_bits": e, "man_bits": spec.bits - 1 - e, "errors": sel["errors"]}
        return make(e, spec.bits - 1 - e)

    def _refresh_quantizers(self, live) -> None:
        spec = self.config.quantize
        if self.format is None:
            self.format = self._choose_format(live)
            if spec.scaling in GLOBAL_SCALINGS:
                self._global_scaling = make_scaling(spec.scaling, **spec.scaling_options)
            for layer in self.layers:
                scaling = self._global_scaling or spec.make_scaling()
                layer.quantizer = FPQuantizer(self.format, spec.rounding, scaling,
                                              track_metrics=False)
        for layer in live:
            if bool(layer.fit.ok):
                pol = layer.quantizer.scaling
                if getattr(pol, "wants_sample", False):  # per_layer_empirical
                    pol.update(layer.fit, layer.quantizer.fmt, sample=layer.sample)
                else:
                    layer.quantizer.update(layer.fit)

    def _refresh_pruners(self, live) -> None:
        spec = self.config.prune
        if self.layers[0].pruner is None:
            for layer in self.layers:
                method = "lognormal" if spec.method == "topk" else spec.method
                layer.pruner = Pruner(spec.sparsity, method)
        if spec.method == "topk":
            return
        if spec.heterogeneous:
            ok = [layer for layer in live if bool(layer.fit.ok)]
            if ok:
                alloc = allocate_sparsity(
                    [layer.numel for layer in ok],
                    torch.stack([layer.fit.mu for layer in ok]).cpu(),
                    torch.stack([layer.fit.sigma for layer in ok]).cpu(),
                    torch.stack([layer.fit.zero_fraction for layer in ok]).cpu(),
                    spec.sparsity, cos_target=spec.cos_target, cap=spec.cap,
                    truncate_k=spec.truncate_k,
                )
                self._allocation = {layer.name: float(s) for layer, s in zip(ok, alloc.sparsities)}
                ths = alloc.thresholds
                if spec.method == "empirical":
                    # the allocation's S_i, met on each layer's own sample (not Eq. 8); a layer
                    # the allocation leaves unpruned (threshold 0, S_i = z_i) stays unpruned
                    pruned = alloc.thresholds > 0
                    s_i = torch.where(pruned, alloc.sparsities, torch.full_like(ths, 0.5))
                    emp = empirical_threshold([layer.sample for layer in ok], s_i).cpu()
                    ths = torch.where(pruned, emp, torch.zeros_like(emp))
                for layer, th in zip(ok, ths):
                    layer.pruner.threshold = th.to(layer.fit.mu.device).reshape(())
            return
        if spec.method == "empirical":
            # one padded sort per device solves every layer (issue 8: vectorised, no sync)
            by_device: dict[torch.device, list[_Layer]] = {}
            for layer in live:
                by_device.setdefault(layer.sample.device, []).append(layer)
            for group in by_device.values():
                ths = empirical_threshold([layer.sample for layer in group], spec.sparsity)
                for layer, th in zip(group, ths):
                    layer.pruner.threshold = th.reshape(())
            return
        for layer in live:
            layer.pruner.update(layer.fit, layer.sample)

    # -- metrics --------------------------------------------------------------------------
    def bits_per_element(self, layer: _Layer, acc: dict) -> float:
        """Bits per neural-gradient element of the compressed stream of one layer.

        FP only: the format's width. Pruning: the entropy bound of the symbol stream
        {0, +a, -a, escape} plus the escaped values (32 bits, or the FP width when quantized
        after pruning); the real encoder (``compressors.encoding``) lands within a few % of it.
        """
        n = float(acc.get("elements", 0.0))
        if n == 0:
            return math.nan
        width = float(self.format.bits) if self.format is not None else 32.0
        if self.config.prune is None:
            return width
        p0 = float(acc.get("zeros", 0.0)) / n
        pa = float(acc.get("at_threshold", 0.0)) / n
        pe = max(0.0, 1.0 - p0 - pa)
        if self.config.prune.method == "topk":
            pa, pe = 0.0, 1.0 - p0
        h = -sum(p * math.log2(p) for p in (p0, pa, pe) if p > 0)
        return h + pa + pe * width  # + one sign bit per +-a symbol

    def metrics(self, reset: bool = True) -> dict:
        """Per-layer and overall (element-weighted) metrics since the last reset; one sync.

        Keys: sparsity (fraction of zeros in the compressed gradient), overflow and underflow
        (fractions of elements, FP only), nonfinite (count), bits_per_element, threshold /
        target sparsity per layer where pruning.
        """
        layers = {}
        tot = {"elements": 0.0, "zeros": 0.0, "overflow": 0.0, "underflow": 0.0,
               "nonfinite": 0.0, "bits": 0.0}
        for layer in self.layers:
            acc = {k: float(v) for k, v in layer.acc.items()}
            acc["elements"] = n = float(layer.elements)
            row = {
                "sparsity": acc.get("zeros", 0.0) / n if n else math.nan,
                "overflow": acc.get("overflow", 0.0) / n if n else math.nan,
                "underflow": acc.get("underflow", 0.0) / n if n else math.nan,
                "nonfinite": acc.get("nonfinite", 0.0),
                "bits_per_element": self.bits_per_element(layer, acc),
            }
            if layer.pruner is not None:
                th = layer.pruner.threshold
                row["threshold"] = float(th) if th is not None else math.nan
                row["target_sparsity"] = (self._allocation or {}).get(layer.name,
                                                                      layer.pruner.sparsity)
            layers[layer.name] = row
            if n:
                tot["elements"] += n
                for k in ("zeros", "overflow", "underflow", "nonfinite"):
                    tot[k] += acc.get(k, 0.0)
                tot["bits"] += row["bits_per_element"] * n
            if reset:
                layer.acc, layer.elements = {}, 0
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
            "config": dataclasses.asdict(self.config),
            "step_count": self.step_count, "refreshes": self.refreshes,
            "skipped_steps": self.skipped_steps, "collecting": self._collecting,
            "active": self._active, "format": self.format,
            "chosen": getattr(self, "chosen", None), "allocation": self._allocation,
            "generators": self._generator.state_dict(),
            "global_scaling": None if self._global_scaling is None
            else self._global_scaling.state_dict(),
            "layers": {
                layer.name: {
                    "pruner": layer.pruner.state_dict() if layer.pruner else None,
                    "quantizer": layer.quantizer.state_dict() if layer.quantizer else None,
                    "numel": layer.numel,
                }
                for layer in self.layers
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != dataclasses.asdict(self.config):
            raise ValueError("compressor state was saved with another CompressionConfig")
        names = {layer.name for layer in self.layers}
        if set(state["layers"]) != names:
            raise ValueError(f"compressor state is for layers {sorted(state['layers'])}, "
                             f"this model has {sorted(names)}")
        self.step_count, self.refreshes = state["step_count"], state["refreshes"]
        self.skipped_steps = state["skipped_steps"]
        self._collecting, self._active = state["collecting"], state["active"]
        self._allocation = state["allocation"]
        if state["chosen"] is not None:
            self.chosen = state["chosen"]
        spec = self.config.quantize
        if state["format"] is not None:
            self.format = state["format"]
            if spec.scaling in GLOBAL_SCALINGS:
                self._global_scaling = make_scaling(spec.scaling, **spec.scaling_options)
                self._global_scaling.load_state_dict(state["global_scaling"])
        self._generator.load_state_dict(state["generators"])
        for layer in self.layers:
            ls = state["layers"][layer.name]
            layer.numel = ls["numel"]
            if ls["pruner"] is not None:
                layer.pruner = Pruner(self.config.prune.sparsity, ls["pruner"]["method"])
                layer.pruner.load_state_dict(ls["pruner"])
            if ls["quantizer"] is not None:
                scaling = self._global_scaling or spec.make_scaling()
                layer.quantizer = FPQuantizer(self.format, spec.rounding, scaling,
                                              track_metrics=False)
                layer.quantizer.load_state_dict(ls["quantizer"])
        self._measuring = self._active and self.step_count % self.config.metrics_every == 0

    def remove(self) -> None:
        """Remove every hook: the model is exactly as before (parameters were never touched)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def select_split(bits: int, fits, samples=None, *, select: str = "lognormal",
                 semantics: str = "paper", rounding: str = "nearest") -> dict:
    """The 1-n2-n1 split E* of ``bits`` bits that format ``"optimal"`` uses for a whole model.

    Args:
        bits: total bits (3..16). fits: one ``LognormalFit`` per layer (layers with fewer
            than two finite non-zero values are skipped). samples: one 1-D tensor per layer
            (same order), required by ``select="empirical"``.
        select: ``"lognormal"``: ``optimal_format`` at the median sigma over layers (paper
            Table 2; sigma 3 when no layer has a fit); ``"empirical"``: for each split, each
            layer's error measured on its sample at its own best scale (the
            ``per_layer_empirical`` search around the lognormal optimum), averaged over layers
            (unweighted: every layer's weight gradient counts, not only the largest tensors).
    Ties go to the smaller n2. Returns {"fmt": FPFormat, "sigma": median sigma, "errors":
    {split name: error}} (predicted by the model, or measured on the samples). Host work:
    meant for refresh steps only (one sync per layer and split for ``"empirical"``).
    """
    from gradcomp.numerics.fp_error import optimal_format, optimal_scale, split_formats

    require_choice(select, "select", SELECTS)
    fits = list(fits)
    samples = [None] * len(fits) if samples is None else list(samples)
    if len(samples) != len(fits):
        raise ValueError(f"samples must have one entry per fit: {len(samples)} != {len(fits)}")
    keep = [i for i, f in enumerate(fits) if bool(f.ok)]
    sig = torch.stack([fits[i].sigma.detach().cpu() for i in keep]) if keep else None
    sigma = float(sig.median()) if sig is not None else 3.0
    if select == "lognormal" or not keep:
        best = optimal_format(bits, sigma, semantics=semantics, rounding=rounding)
        return {"fmt": best.fmt, "sigma": sigma,
                "errors": {row[0]: float(row[3]) for row in best.table}}
    if any(samples[i] is None for i in keep):
        raise ValueError("select 'empirical' needs one sample per layer")
    fmts = split_formats(bits, semantics)
    errors = {}
    search = PerLayerEmpirical(rounding).search
    for fmt in fmts:
        errs = []
        for i in keep:
            # centred on the exact lognormal optimum (one host solve per layer and split: this
            # runs once, cheaper than the policy's interpolation table)
            mu, sg = float(fits[i].mu), max(float(fits[i].sigma), 1e-6)
            centre = torch.tensor(optimal_scale(fmt, mu, sg, rounding), dtype=torch.float64)
            errs.append(search(samples[i], fmt, centre)[1].detach().cpu())
        e = torch.stack(errs)
        e = e[torch.isfinite(e)]
        errors[fmt.name] = float(e.mean()) if e.numel() else math.inf
    i = min(range(len(fmts)), key=lambda k: (errors[fmts[k].name], fmts[k].exp_bits))
    return {"fmt": fmts[i], "sigma": sigma, "errors": errors}


def compress_gradients(model: nn.Module, config: CompressionConfig,
                       seed: int = 0) -> CompressionHandle:
    """Compress the neural gradients of ``model``'s selected layers as ``config`` says.

    Call ``handle.step(optimizer)`` in place of ``optimizer.step()`` (it drives the statistics
    schedule and the dynamic loss scale) and ``handle.on_epoch_start(epoch)`` at each epoch.
    ``seed`` seeds the compressors' generators (stochastic rounding/pruning, samples).
    """
    return CompressionHandle(model, config, seed)
