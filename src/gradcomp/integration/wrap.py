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
              (prune and quantize: one kernel when the quantizer's scale is known beforehand;
              written into g itself when autograd holds g's only reference, see below)
    handle.step(optimizer): optimizer.step() unless a dynamic loss scale saw an overflow, then,
                            after a statistics step, ``update(stats)`` of both groups with
                            every layer's ``LayerStats`` (fit + sample + numel).

Schedule: the first step of training only gathers statistics (no compression: nothing is known
yet); statistics are then refreshed at the start of each epoch (``refresh_each_epoch``, the
paper's schedule) and/or every ``refresh_every`` steps. On a refresh step the gradient is still
compressed with the previous thresholds; the statistics come from the raw gradient. The
statistics (``fit_lognormal``: mu, sigma, zero fraction, amax) are device reductions; the only
host synchronisation is the refresh itself (one per refresh, all layers at once).

Non-finite neural gradients (NaN, +-inf) are excluded from every statistic and counted on metric
steps; ``CompressionConfig.nonfinite`` says what happens to the step:

* ``"skip"`` (default, what ``torch.amp.GradScaler`` users expect): ``handle.step(optimizer)``
  does not call ``optimizer.step()`` when any compressed layer's neural gradient of the step (or,
  when an optimizer is given, any of its parameters' gradients) held a non-finite value; the step
  is counted in ``skipped_steps`` and ``step`` returns False. Detection costs no pass of its
  own and no extra host sync per step beyond the decision itself: each hook gets a 0-d device
  count from a pass that runs anyway (the first compressor's kernel counts the non-finite
  inputs in its own loop, an amax scaling's amax is NaN/inf exactly then, a statistics step's
  fit counts them; only a layer that no compressor touches takes one min/max pass), the
  optimizer's gradients are checked by GradScaler's own multi-tensor check (at an inverse scale
  of 1: no value changes), and ``step`` reads the OR of these flags once: the one host read per
  step, as GradScaler's ``found_inf``.
  Under torch.distributed (world > 1) the flag, with a dynamic loss scale's overflow, is
  all-reduced (MAX) first, so every rank skips the same steps (each rank's loss scale reacts to
  its own overflows: it scales its own neural gradients). A statistics step that is skipped
  gathers nothing:
  the refresh moves to the next step.
* ``"keep"``: non-finite values flow on unchanged and the step is taken (a dynamic loss scale
  still sees them as an overflow and skips); no per-step check.
* ``"zero"``: non-finite values are replaced by 0 (one extra pass) and the step is taken.

On a refresh, a layer whose statistics saw a non-finite value or fewer than two finite non-zero
values keeps its previous threshold and scale (its ``LayerStats`` is passed as None).

In place: the compressed gradient is written into g's own memory (the compressors' ``into``)
when nothing but autograd can read g afterwards: then the kernel reads and writes g where it
lies, instead of writing a new tensor that the layer's backward reads next (measured on a
ResNet-8 step, alternate steps of one process: a clone of every compressed gradient cost 2.9% of
the step, an in-place pass 1.0%; ``benchmarks/bench_hook_time.py --in-place alternate`` times
the hooks both ways). "Nothing else" is checked per call, at the hook's first statement, by
three reference counts compared with those of a gradient known to be autograd's alone
(``_sole_counts``, one probe backward per process): the tensor's (another input buffer holding
the same gradient, e.g. an add whose other branch has not run yet, or a gradient
``torch.autograd.grad`` captures), its storage's (a view of it elsewhere: a ``cat``'s split
gradient, an expanded one) and its Python object's (an earlier hook that kept it). Any other
count, a non-contiguous, grad-requiring or non-float g, a backward that records a graph
(``create_graph``), a GPU tensor (a read of g may still be queued on another stream: not
measured, not done): a new tensor, as before. Either way the same values. Not seen by the
counts: a C++ holder of a tensor that an earlier hook returned in place of g (its engine
reference is then missing, so one foreign reference brings the count back to the probe's); such
a hook should return a clone.
"""

from __future__ import annotations

import functools
import math
import operator
import sys

import torch
from torch import nn

from gradcomp.compressors._counts import nonfinite_flag, read_floats
from gradcomp.compressors.pruning import PrunerGroup
from gradcomp.compressors.quantizer import SELECTS, QuantizerGroup, select_split
from gradcomp.config import CompressionConfig, PruneSpec, QuantizeSpec
from gradcomp.integration.capture import select_layers
from gradcomp.numerics.fit import LayerStats, layer_stats
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.random import DeviceGenerators, StepStreams

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


def _check_seed(seed) -> int:
    """``seed`` as a Python int in torch.manual_seed's range [-2^63, 2^64) (numpy integers
    accepted); TypeError for a non-integer, ValueError outside the range."""
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {seed!r}") from None
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must be in [-2**63, 2**64) (torch.manual_seed's range), got {seed}")
    return seed


# what GradScaler's check takes (``_amp_foreach_non_finite_check_and_unscale_``): real float
# dtypes, dense strided tensors it can write (no element aliased by another: it stores every
# value back), on the device types that have the op
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHECKED_DEVICES = ("cpu", "cuda", "xpu")


def _amp_checkable(g: torch.Tensor) -> bool:
    return (g.dtype in _CHECKED_DTYPES and g.layout is torch.strided
            and g.device.type in _CHECKED_DEVICES and not g.requires_grad
            and torch._debug_has_internal_overlap(g) == 0)


def _grads_nonfinite(grads: list, device: torch.device) -> torch.Tensor:
    """1-element device tensor, > 0 when one of ``grads`` (tensors on ``device``) holds a NaN
    or +-inf; no host sync. GradScaler's own multi-tensor check
    (``torch._amp_foreach_non_finite_check_and_unscale_``) at an inverse scale of 1, one call
    per dtype as GradScaler groups them: its kernels store every value back unchanged at
    scale 1 (the same bits, subnormals under flush-to-zero included; measured on the CPU: no
    version-counter bump). ResNet-8's 29 gradients: 81 us on the CPU with the checks of each
    gradient (31 us the call itself) against 259 us for an inf-norm per tensor
    (``torch._foreach_norm``, a kernel call each), which still checks the others: complex,
    sparse or overlapping (expanded) gradients, gradients that require grad (a graph built
    with ``create_graph`` may have saved them), other device types."""
    found = torch.zeros(1, dtype=torch.float32, device=device)
    by_dtype: dict = {}
    other = []
    for g in grads:
        if _amp_checkable(g):
            by_dtype.setdefault(g.dtype, []).append(g)
        else:
            other.append(g)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, _one32(device))
    if other:
        norms = torch._foreach_norm(other, float("inf"))
        found = found + (~torch.isfinite(torch.stack(norms)).all()).to(found.dtype)
    return found


def _ownership(g) -> tuple:
    """(tensor, storage, Python object) reference counts of a gradient, for ``_Layer.grad``
    (called first thing in the hook, so the Python count holds only the call's own)."""
    return (g._use_count(), torch._C._storage_Use_Count(g.untyped_storage()._cdata),
            sys.getrefcount(g))


class _Probe:
    """``_sole_counts``' stand-in for a ``_Layer``: its hook has ``_Layer.grad``'s shape (a
    bound method whose first statement passes g to ``_ownership``)."""

    def __init__(self):
        self.seen: list = []

    def grad(self, g):
        counts = _ownership(g)
        self.seen.append(counts)


@functools.cache
def _sole_counts() -> tuple | None:
    """``_ownership`` of a gradient that autograd alone holds (the output of a node's backward,
    stored in the next node's input buffer, as a batch norm's input gradient reaches the conv
    before it): measured once per process on a two-node graph, so that it is this torch's and
    this interpreter's count; None (never in place) when the probe saw nothing."""
    probe = _Probe()
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            x = torch.ones(2, requires_grad=True)
            y = x * 2.0
            y.register_hook(probe.grad)
            (y * 3.0).sum().backward()  # y's gradient: MulBackward's new tensor
    except (RuntimeError, AttributeError):  # e.g. a torch without these private counts
        return None
    return probe.seen[0] if len(probe.seen) == 1 else None


@functools.lru_cache(maxsize=16)
def _one32(device: torch.device) -> torch.Tensor:
    # the check's inverse scale, kept per device (read only)
    return torch.ones((), dtype=torch.float32, device=device)


def _multi_rank() -> bool:
    """Whether torch.distributed runs more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_max(t: torch.Tensor) -> torch.Tensor:
    """``t`` all-reduced with MAX over the ranks when torch.distributed runs more than one
    process (NCCL: through the current CUDA device), else ``t`` itself."""
    if not _multi_rank():
        return t
    dist = torch.distributed
    dev = t.device
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(dev)


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
        # this step's non-finite flags (each > 0 when its call saw a NaN/inf), combined once in
        # ``CompressionHandle.step``: no device op per layer
        self.flags: list[torch.Tensor] = []

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        """The hook on the layer's output: ``compress``, in place when autograd alone holds g
        (module docstring)."""
        sole = _sole_counts()
        # the cheap checks first (they keep no reference to g); then the counts, before any
        # statement that stores g (the Python count must hold only this call's references).
        # CPU only: on a GPU a branch that dropped g may still have a read of it queued on
        # another stream, which no count shows (and no GPU run has tested the write there)
        owned = (sole is not None and type(g) is torch.Tensor and g.device.type == "cpu"
                 and g.layout == torch.strided and g.is_floating_point() and g.is_contiguous()
                 and not g.requires_grad and not torch.is_grad_enabled() and not g._is_view()
                 and not g._is_zerotensor() and _ownership(g) == sole)
        return self.compress(g, owned)

    def compress(self, g: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """g compressed (statistics, metrics and flags on their schedule); ``owned``: g may be
        overwritten with the result (``grad``'s check)."""
        h = self.handle
        if not h.registered:  # removed between this forward and its backward
            return g
        self.numel = g.numel()
        skip_mode = h.config.nonfinite == "skip"
        if h.collecting:
            self.stats = layer_stats(g, h.config.sample_size, h.generators(g.device))
        measure = h.measuring and h.active
        # bad: 0-d, > 0 exactly when g holds a NaN/inf (on metric steps: their number). Known
        # without a pass of its own: the refresh fit counts them; otherwise the first
        # compressor counts them in its own kernel pass (compressors' ``compress``)
        bad = self.stats.fit.nonfinite if h.collecting else None
        finite = None if bad is None else bad == 0
        if not h.active:
            if skip_mode and bad is None and g.numel():
                bad = nonfinite_flag(g)
            if skip_mode and bad is not None:
                self.flags.append(bad)
            return g
        out = g
        if h.config.nonfinite == "zero":
            if measure and bad is None:
                bad = (~torch.isfinite(g)).sum()
            out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
            finite = True
        gen = h.streams.stream(self.index)  # this layer's keys of the step: no generator call
        # the first compressor sees g itself, so its count is g's
        check = (skip_mode or measure) and bad is None
        q = h.quantizers.quantizers[self.index] if h.quantizers is not None else None
        # in place: into g when autograd alone holds it, into nan_to_num's new tensor always
        into = owned or out is not g
        if h.pruners is not None:  # the quantizer runs in the pruning kernel where it can
            out, b = h.pruners[self.index].compress(out, gen, measure=measure, finite=finite,
                                                    check=check, then=q, into=into)
            if check:
                bad, check = b, False
        elif q is not None:
            out, b = q.compress(out, gen, measure=measure, check=check, into=into)
            if check:
                bad, check = b, False
        if check and g.numel():  # no compressor counted (e.g. none configured)
            bad = (~torch.isfinite(g)).sum() if measure else nonfinite_flag(g)
        if measure:
            self.elements += g.numel()
            bad = torch.zeros((), dtype=torch.float64, device=g.device) if bad is None else \
                bad.double()
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        if skip_mode and bad is not None:
            self.flags.append(bad)
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
        seed = _check_seed(seed)
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
        self.generators = DeviceGenerators(seed)  # the statistics' samples
        # the stochastic compressors' hash keys: a function of (seed, step, layer, draw), so a
        # step calls no generator; a negative seed is taken modulo 2^64, as torch.manual_seed
        self.streams = StepStreams(seed % (1 << 64), max(n, 1))
        self.step_count = 0
        self.refreshes = 0
        self.skipped_steps = 0
        self._skipped_since_reset = 0
        self._metric_steps = 0  # metric steps since the last metrics reset
        self.collecting = True  # the first step gathers statistics
        self.active = False  # nothing is compressed before the first refresh
        self.measuring = False
        _sole_counts()  # the in-place check's reference counts, measured before any backward
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
                output.register_hook(layer.grad)

        return hook

    # -- schedule -------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Mark the next step as a statistics step (the paper refreshes at each epoch start)."""
        if self.config.refresh_each_epoch and epoch > 0:
            self.collecting = True

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Finish a training step: ``optimizer.step()`` unless the step must be skipped, then the
        scheduled refresh. Returns False when the step was skipped (call ``optimizer.step()``
        yourself only when it returns True if you pass no optimizer).

        Skipped: a dynamic loss scale overflowed, or (``nonfinite="skip"``) a non-finite value
        reached a compressed layer's neural gradient or ``optimizer``'s gradients. One host read
        of one device flag decides (none with ``"keep"``/``"zero"`` and no dynamic loss scale).
        """
        found = None  # 0-d bool device tensor: this rank's dynamic loss scale overflowed
        nonfinite_found = None  # 0-d bool device tensor: a non-finite gradient on this rank
        if self.quantizers is not None and self.active:
            found = self.quantizers.step()  # the dynamic loss scale's overflow (or None)
        if self.config.nonfinite == "skip":
            nonfinite_found = self._nonfinite_flag(optimizer)
        skip = bad = False
        if found is None and nonfinite_found is not None and not _multi_rank():
            # the usual case (no dynamic loss scale, one process): the one host read of the
            # step, of the non-finite flag alone
            skip = bad = bool(nonfinite_found)
        elif found is not None or nonfinite_found is not None:
            dev = (found if found is not None else nonfinite_found).device
            zero = torch.zeros((), dtype=torch.bool, device=dev)
            found = zero if found is None else found.reshape(()).to(dev)
            bad_t = zero if nonfinite_found is None else nonfinite_found.reshape(()).to(dev)
            # [skip, non-finite]: one all-reduce (MAX) under torch.distributed, so that every
            # rank skips the same steps (an overflow or a NaN on one rank may not reach the
            # others' neural gradients), then the one host read of the step
            flags = _all_ranks_max(torch.stack([found | bad_t, bad_t]).to(torch.int32))
            skip, bad = (bool(v) for v in flags.tolist())
        if optimizer is not None and not skip:
            optimizer.step()
        self.skipped_steps += int(skip)
        self._skipped_since_reset += int(skip)
        self._metric_steps += int(self.measuring)
        # a non-finite step's statistics are discarded; an incomplete refresh is retried
        pending = self.collecting and (bad or not self._refresh())
        self.step_count += 1
        self.streams.set_step(self.step_count)
        every = self.config.refresh_every
        self.collecting = pending or bool(every and self.step_count % every == 0)
        self.measuring = self.active and self.step_count % self.config.metrics_every == 0
        return not skip

    def _nonfinite_flag(self, optimizer) -> torch.Tensor | None:
        """OR of the hooks' per-layer flags and the optimizer's gradients' check (device work,
        this rank's); the layers' flags are reset."""
        flags = [f for layer in self._layers for f in layer.flags]
        for layer in self._layers:
            layer.flags = []
        if optimizer is not None:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None or g.is_sparse:
                        continue
                    # FSDP2 gradients are DTensors: each rank checks its own shard (the
                    # all-reduce below combines the ranks' verdicts)
                    if type(g) is not torch.Tensor and hasattr(g, "to_local"):
                        g = g.to_local()
                    by_device.setdefault(g.device, []).append(g)
            for dev, grads in by_device.items():
                flags.append(_grads_nonfinite(grads, dev))
        if not flags:
            return None
        dev = flags[0].device
        # a flag is > 0 (or True) when its check saw a NaN/inf; the hot path's flags (the
        # kernels' 0-d float64 flags or counts) are stacked as they are, the others (the
        # optimizer's float32 check, a refresh step's int64 counts) converted first
        flags = [f if f.dtype == torch.float64 and f.dim() == 0 and f.device == dev
                 else f.reshape(()).to(dev, torch.float64) for f in flags]
        return (torch.stack(flags) > 0).any()

    def _refresh(self) -> bool:
        """Update both groups from the layers' statistics; False when nothing was usable yet
        (no backward reached the layers, or only unusable statistics before the first refresh):
        the next step gathers statistics again."""
        stats = [layer.stats for layer in self._layers]
        live = [i for i, s in enumerate(stats) if s is not None]
        if not live:
            return False
        # one host read for all layers: a layer whose statistics saw a non-finite value or
        # fewer than two finite non-zero values keeps its previous threshold and scale
        dev = stats[live[0]].fit.count.device
        rows = torch.stack([torch.stack([stats[i].fit.nonfinite.reshape(()).to(dev),
                                         stats[i].fit.count.reshape(()).to(dev)]).double()
                            for i in live]).tolist()
        for i, (nonfinite, count) in zip(live, rows):
            if nonfinite > 0 or count < 2:
                stats[i] = None
        if self.refreshes == 0 and all(s is None for s in stats):
            return False
        if self.quantizers is not None:
            self.quantizers.update(stats)
        if self.pruners is not None:
            self.pruners.update(stats)
        self.active = True
        self.refreshes += 1
        return True

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
        """Per-layer and overall (element-weighted) metrics since the last reset; one host
        transfer per device (``compressors._counts.read_floats``).

        Keys: sparsity (fraction of zeros in the compressed gradient), overflow and underflow
        (fractions of elements, FP only), nonfinite (count), bits_per_element, threshold /
        target sparsity per layer where pruning. Overall also: ``metric_steps`` (steps measured
        since the last reset), ``skipped_steps`` (since the last reset) and
        ``skipped_steps_total``. Where no metric step ran (yet) the measured fractions and
        bits_per_element are None ("not measured"), never a number that reads as a result.
        """
        layers = {}
        tot = {"elements": 0.0, "zeros": 0.0, "overflow": 0.0, "underflow": 0.0,
               "nonfinite": 0.0, "bits": 0.0}
        # every layer's device counts first, read in one transfer (read_floats)
        raw = {}
        for layer in self._layers:
            i = layer.index
            pc = self.pruners[i].counts(reset) if self.pruners is not None else {}
            qz = self.quantizers.quantizers if self.quantizers is not None else None
            qc = qz[i].counts(reset) if qz is not None else {}
            final = qc if qz is not None else pc  # zeros of the last compressor's output
            raw[i, "zeros"] = final.get("zeros", 0.0)
            raw[i, "at_threshold"] = pc.get("at_threshold", 0.0)
            raw[i, "overflow"] = qc.get("overflow", 0.0)
            raw[i, "underflow"] = qc.get("underflow", 0.0)
            raw[i, "nonfinite"] = 0.0 if layer.nonfinite is None else layer.nonfinite
            if self.pruners is not None:
                raw[i, "threshold"] = self.pruners[i].threshold
        got = read_floats(raw)
        for layer in self._layers:
            i = layer.index
            n = float(layer.elements)
            acc = {"elements": n, **{k: got[i, k] for k in
                                     ("zeros", "at_threshold", "overflow", "underflow",
                                      "nonfinite")}}
            row = {
                "sparsity": acc["zeros"] / n if n else None,
                "overflow": acc["overflow"] / n if n else None,
                "underflow": acc["underflow"] / n if n else None,
                "nonfinite": acc["nonfinite"],
                "bits_per_element": self.bits_per_element(acc) if n else None,
            }
            if self.pruners is not None:
                row["threshold"] = got[i, "threshold"]  # None where no threshold
                row["target_sparsity"] = self.pruners[i].target
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
            "sparsity": tot["zeros"] / n if n else None,
            "overflow": tot["overflow"] / n if n else None,
            "underflow": tot["underflow"] / n if n else None,
            "nonfinite": tot["nonfinite"],
            "bits_per_element": tot["bits"] / n if n else None,
            "metric_steps": self._metric_steps,
            "skipped_steps": self._skipped_since_reset,
            "skipped_steps_total": self.skipped_steps,
        }
        if reset:
            self._metric_steps, self._skipped_since_reset = 0, 0
        if self.format is not None:
            overall["format"] = self.format.name
        return {"overall": overall, "layers": layers}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "layers": self.layers,
            "numels": [layer.numel for layer in self._layers],
            "seed": self.seed,  # the stochastic streams' run seed (StepStreams)
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
        if "seed" in state:  # the saved run's noise, whatever seed this handle was built with
            # (as the generators' saved states); a state without it keeps this handle's seed
            self.seed = _check_seed(state["seed"])
            self.streams = StepStreams(self.seed % (1 << 64), self.streams.n)
        self.streams.set_step(self.step_count)
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
    ``seed``: the run seed of the stochastic compressors (pruning, stochastic rounding: the
    hash keys of layer i's d-th draw at step k are ``random.stream_seed(seed, k, i, d)``'s, so
    no generator is called per step and a resumed run repeats them) and of the statistics
    samples' generators. Under data parallelism give each rank its own seed (the same seed is
    the same noise on every rank, which averaging across ranks then does not reduce).
    """
    return CompressionHandle(model, config, seed)
