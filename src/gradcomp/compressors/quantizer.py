"""FP quantization of neural gradients: ``FPQuantizer`` (one layer, per-tensor scale),
``BlockQuantizer`` (one layer, a block-scaled format: MX, NVFP4, FP8 blockwise) and
``QuantizerGroup`` (every layer of a model: the model-wide format choice and the per-layer scale
refresh).

``q(x, generator)`` returns Q(x*s)/s in x's dtype (see
:func:`gradcomp.numerics.rounding.quantize_fp` for rounding, overflow, zeros and NaN), with s
from the scaling policy. On calls with ``measure=True`` the quantizer adds its own counts
(elements, overflow, underflow, NaN, zeros of the output) to device accumulators: no host sync in
``__call__``; ``metrics()`` reads them (one sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradcomp.compressors._counts import CountsMixin, read_floats
from gradcomp.compressors.scaling import AmaxCurrent, PerLayerEmpirical, ScalingPolicy, make_scaling
from gradcomp.numerics._checks import require_choice, require_float_tensor, require_int_range
from gradcomp.numerics.block import BLOCK_DTYPES, BlockFormat, quantize_block_unchecked
from gradcomp.numerics.fit import LayerStats
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.kernels import use_compiled
from gradcomp.numerics.random import Stream
from gradcomp.numerics.rounding import (
    COUNTS,
    ROUNDINGS,
    quantize_fp,
    quantize_fp_amax,
    quantize_fp_amax_unchecked,
    quantize_fp_unchecked,
)

__all__ = ["BLOCK_DIMS", "BlockQuantizer", "FPQuantizer", "QuantizerGroup", "SplitChoice",
           "SELECTS", "select_split"]

SELECTS = ("lognormal", "empirical")  # how a SplitChoice picks its split
BLOCK_DIMS = ("channels", "format")  # where a BlockQuantizer's blocks run
_COUNTS = ("elements", "overflow", "underflow", "nan", "zeros")


class FPQuantizer(CountsMixin):
    """Quantize tensors to ``fmt`` with ``rounding`` and a scaling policy.

    Args:
        fmt: FPFormat or format name (``"e5m2"``, ``"1-4-3"``, ...).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased).
        scaling: a ScalingPolicy, a registry name (``make_scaling``), or None (s = 1). A global
            policy object may be shared by many quantizers.
        track_metrics: the default of ``__call__``'s ``measure`` (extra reductions per call).

    Metrics (``metrics()``), over the measured calls since the last reset: ``overflow`` =
    fraction of |x*s| above max_normal (incl. inf), ``underflow`` = fraction of non-zero finite
    values flushed to 0, ``nan`` = fraction of NaN inputs, ``zeros`` = fraction of zeros in the
    output, ``elements`` = elements measured, ``scale`` = the scale of the last call.
    """

    def __init__(self, fmt, rounding: str = "nearest", scaling=None, track_metrics: bool = True):
        self.fmt = FPFormat.from_name(fmt) if isinstance(fmt, str) else fmt
        if not isinstance(self.fmt, FPFormat):
            raise TypeError(f"fmt must be an FPFormat or a format name, got {type(fmt).__name__}")
        self.rounding = require_choice(rounding, "rounding", ROUNDINGS)
        if scaling is None:
            scaling = make_scaling("none")
        elif isinstance(scaling, str):
            scaling = make_scaling(scaling)
        if not isinstance(scaling, ScalingPolicy):
            raise TypeError(f"scaling must be a ScalingPolicy or a name, got {scaling!r}")
        self.scaling = scaling
        self.scaling.bind(self.fmt)
        self.track_metrics = bool(track_metrics)
        self._acc: dict[str, torch.Tensor] = {}
        self._elements = 0
        self._last_scale: torch.Tensor | None = None

    def update(self, stats: LayerStats) -> None:
        """Refresh the scale from this layer's statistics (on the schedule)."""
        self.scaling.update(LayerStats.of(stats))

    @property
    def fusable(self) -> bool:
        """Whether a pruner may run this quantizer inside its own kernel (``Pruner.compress``'s
        ``then``): its scale is known before the pass, or it is the current amax, which the
        fused kernel derives from the input's (``numerics.pruning.prune_quantize_amax``)."""
        return self.scaling.amax_timing is None or self.fused_amax

    @property
    def fused_amax(self) -> bool:
        """Whether this quantizer's scale is the current amax (``AmaxCurrent``): its calls
        then find amax, scale and rounding in one compiled call (``quantize_fp_amax``)."""
        return isinstance(self.scaling, AmaxCurrent) and self.scaling.amax_timing == "current"

    def amax_rule(self) -> dict:
        """The ``margin`` and ``keep`` (current scale) that the fused amax kernels take for a
        ``fused_amax`` quantizer; its policy then ``commit``s the scale they return."""
        return {"margin": self.scaling.margin, "keep": self.scaling.scale}

    def compress(self, x: torch.Tensor, generator: torch.Generator | Stream | None = None,
                 measure: bool | None = None, check: bool = False, into: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(Q(x*s)/s, nonfinite)``: ``__call__`` that also says whether x held a NaN/inf.

        ``nonfinite``: a 0-d float64 device tensor, > 0 exactly when x held a NaN or +-inf
        (on measured calls: their number); None when neither ``check`` nor ``measure`` asked
        for it and no pass of the call gave it. It costs no extra pass: an amax scaling's amax
        is NaN/inf exactly then, otherwise the quantize kernel counts in its own loop (only
        what the call needs: the non-finite count for ``check``, every metric when measured).
        ``into``: the caller owns x and allows it to be overwritten: on the fused hot path
        the result is then written into x (and is x); otherwise a new tensor as without it.
        """
        require_float_tensor(x, "x")
        measure = self.track_metrics if measure is None else bool(measure)
        hot = use_compiled(None) and x.is_contiguous() and not x.requires_grad
        if self.fused_amax and x.numel():
            # the current amax, its scale and the rounding in one compiled call; the amax is
            # NaN/inf exactly when x holds a NaN/inf, so it is the call's flag
            names = self.count_names(measure, False)
            pol = self.scaling
            keep = pol.scale
            if (hot and keep.device == x.device and keep.dtype == torch.float64
                    and keep.dim() == 0):
                # the hot path (a layer's call per step): this quantizer's arguments were
                # checked when it was built, so the kernel is called without the checks
                res = quantize_fp_amax_unchecked(x, self.fmt, self.rounding, pol.margin, keep,
                                                 generator, names, True, into)
            else:
                res = quantize_fp_amax(x, self.fmt, self.rounding, generator=generator,
                                       counts=names or False, flag=True, **self.amax_rule())
            q, s, bad = res[0], res[-3], res[-1]
            pol.commit(s)
            got = dict(zip(names, res[1].unbind())) if names else {}
            return q, self.account(x.numel(), s, None, bad, measure, got)
        s, amax, bad = self.scale_for(x)
        names = self.count_names(measure, check and bad is None)
        if hot and x.numel() and s.dim() == 0:
            # the hot path: the policy's scale is a positive finite 0-d tensor on x's device
            # (its update rules keep it so), the format and rounding were checked when built
            res = quantize_fp_unchecked(x, self.fmt, self.rounding, s, generator, names, into)
            q, got = (res[0], dict(zip(names, res[1].unbind()))) if names else (res, {})
        elif names:
            q, c = quantize_fp(x, self.fmt, self.rounding, scale=s, generator=generator,
                               counts=names)
            got = dict(zip(names, c.unbind()))
        else:
            q, got = quantize_fp(x, self.fmt, self.rounding, scale=s, generator=generator), {}
        return q, self.account(x.numel(), s, amax, bad, measure, got)

    def scale_for(self, x: torch.Tensor):
        """``(scale, amax, nonfinite)`` of a call, before its kernel: the policy's scale; an
        amax scaling's amax of x (one min/max pass) and the NaN/inf flag it gives (else None)."""
        pol = self.scaling
        amax = bad = None
        if pol.amax_timing is not None and x.numel():
            # one min/max pass (max |x| = max(|min|, |max|)); a NaN/inf makes amax non-finite
            # and the policy then keeps its previous scale (as TransformerEngine does), so no
            # masking pass is needed; the same non-finite amax is the call's NaN/inf flag
            lo, hi = torch.aminmax(x.detach())
            amax = torch.maximum(lo.abs(), hi.abs()).double()
            bad = (~torch.isfinite(amax)).double()
        if pol.amax_timing == "current" and amax is not None:
            pol.observe(amax=amax)
        s = pol.scale
        return (s if s.device == x.device else s.to(x.device)), amax, bad

    def count_names(self, measure: bool, check: bool) -> tuple:
        """The kernel counts (``rounding.COUNTS`` names) a call needs: all of them when
        measured, overflow and NaN for a dynamic loss scale, the non-finite count for
        ``check``; each is a reduction in the kernel's loop, so the hot path asks for few."""
        if measure:
            return COUNTS
        names = ("overflow", "nan") if self.scaling.wants_overflow else ()
        return names + ("nonfinite",) if check else names

    def account(self, n: int, s, amax, bad, measure: bool, got: dict):
        """After the kernel: the policy's observations and the metrics from the kernel's counts
        ``got`` (name -> 0-d tensor, the names of ``count_names``) of a call on ``n`` elements;
        returns the call's non-finite flag."""
        pol = self.scaling
        if pol.amax_timing == "delayed" and amax is not None:
            pol.observe(amax=amax)
        if not got:
            return bad
        if pol.wants_overflow:
            pol.observe(overflow=(got["overflow"] > 0) | (got["nan"] > 0))  # inf overflows
        if measure:
            # the overflow count is on x*s in the kernel's dtype: it matches what saturated
            for k in ("overflow", "underflow", "nan", "zeros"):
                self._add(k, got[k])
            self._elements += n  # a host number: a device scalar would be a copy
            self._last_scale = s.detach()
        return got["nonfinite"].double() if "nonfinite" in got else bad

    def metrics(self, sync: bool = True, reset: bool = False) -> dict:
        """Fractions over the measured calls since the last reset (NaN before any) and the
        last scale; floats (one host sync), or 0-d tensors with ``sync=False``."""
        out = self._fractions(("overflow", "underflow", "nan", "zeros"))
        out["scale"] = (self._last_scale if self._last_scale is not None
                        else self.scaling.scale).detach().clone()
        if reset:
            self.reset_metrics()
        if not sync:
            return out
        return read_floats(out)

    def state_dict(self) -> dict:
        return {"fmt": self.fmt, "rounding": self.rounding, "scaling": self.scaling.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["fmt"] != self.fmt or state["rounding"] != self.rounding:
            raise ValueError(
                f"state is for format {state['fmt']} / {state['rounding']}, this quantizer is "
                f"{self.fmt} / {self.rounding}"
            )
        self.scaling.load_state_dict(state["scaling"])

    def __repr__(self) -> str:
        return f"FPQuantizer({self.fmt.name}, rounding={self.rounding!r}, scaling={self.scaling!r})"


class BlockQuantizer(CountsMixin):
    """Quantize tensors to a block-scaled format (``numerics.block.quantize_block``): each block
    of ``fmt.block`` elements gets its own scale from its amax by the format's rule, so there
    is no per-layer scaling policy (``update`` is a no-op kept for the group's contract).

    Args:
        fmt: a :class:`BlockFormat` or a block format name (``"mxfp8_e4m3"``, ``"nvfp4"``, ...).
        rounding: elements ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased inside
            the element range; a block maximum beyond the element maximum, possible with the
            OCP ``floor`` rule and with NVFP4's rounded E4M3 scale, saturates and is counted).
        dims: ``"channels"``: a 4-D or 5-D input (a conv output N, C, ...) has dim 1 moved last
            before blocking (blocks along the channels), other inputs are blocked as they are;
            ``"format"``: the format's own ``dims`` on the input as it is.
        track_metrics: the default of ``__call__``'s ``measure``.

    Metrics over the measured calls (``metrics()``; ``counts()`` raw device sums), from
    ``quantize_block_metrics`` in the same pass: ``underflow`` = finite non-zero inputs that
    became 0, ``overflow`` = finite inputs saturated at the element maximum (the block format's
    "saturated" count), ``nan`` = non-finite inputs (NaN and inf: a non-finite element spoils
    its whole block, see ``numerics.block``), ``zeros`` = zeros of the output, ``elements``.
    ``bits_per_element``: ``fmt.bits_per_element`` (elements plus block scales; the NVFP4
    per-tensor FP32 scale is not counted).
    """

    def __init__(self, fmt, rounding: str = "nearest", dims: str = "channels",
                 track_metrics: bool = True):
        self.fmt = BlockFormat.from_name(fmt) if isinstance(fmt, str) else fmt
        if not isinstance(self.fmt, BlockFormat):
            raise TypeError(f"fmt must be a BlockFormat or a block format name, got "
                            f"{type(fmt).__name__}")
        self.rounding = require_choice(rounding, "rounding", ROUNDINGS)
        self.dims = require_choice(dims, "dims", BLOCK_DIMS)
        # 1-D blocks along the last dimension of the channels-last tensor are blocks along
        # dim 1 of the tensor itself: the same blocks, values and random bits
        # (``numerics.block._strided``), without moving the channels and back (two copies,
        # and a channels-last result for the layer's backward)
        self._channel_fmt = (self.fmt.replace(dims=(1,))
                             if len(self.fmt.block) == 1 and self.fmt.dims == (-1,) else None)
        self.track_metrics = bool(track_metrics)
        self._acc: dict[str, torch.Tensor] = {}
        self._elements = 0

    @property
    def bits_per_element(self) -> float:
        return self.fmt.bits_per_element

    def update(self, stats: LayerStats) -> None:
        """Nothing to refresh: every block's scale is computed from the block itself."""

    def compress(self, x: torch.Tensor, generator: torch.Generator | Stream | None = None,
                 measure: bool | None = None, check: bool = False, into: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(quantized, nonfinite)`` as ``FPQuantizer.compress`` (``into`` allows x to be
        overwritten: unmeasured calls whose element kernel runs on x as it lies write their
        result into x, ``quantize_block_unchecked``: a conv output's channel blocks, and with
        stochastic rounding also a linear output's feature blocks; the others a new tensor):
        on measured calls the block kernel's own non-finite count; otherwise (``check``) the
        count of blocks holding a NaN/inf from the block kernel's own amax (channel blocks of
        a conv output, and any 1-D blocks along a dimension that is not the last:
        ``numerics.block``'s strided layout), else one min/max pass
        (``numerics.block.quantize_block_checked``)."""
        require_float_tensor(x, "x")
        if x.dtype not in BLOCK_DTYPES:
            require_choice(x.dtype, "x.dtype", BLOCK_DTYPES)
        measure = self.track_metrics if measure is None else bool(measure)
        move = self.dims == "channels" and x.dim() in (4, 5)
        fmt = self.fmt
        if move and self._channel_fmt is not None:
            fmt, move = self._channel_fmt, False
        y = x.movedim(1, -1) if move else x
        into = into and not move  # a moved y (a permuted view) is quantized through a copy
        bad = None
        # format and rounding were checked at construction, x just above: the numerics'
        # unchecked call (``quantize_block_metrics`` / ``_checked`` / ``quantize_block``)
        stochastic = self.rounding == "stochastic"
        if measure:
            q, m = quantize_block_unchecked(y, fmt, stochastic, generator, metrics=True)
            zeros = (q == 0).sum()
            self._add("underflow", m.underflow)
            self._add("overflow", m.saturated)
            self._add("nan", m.nonfinite)
            self._add("zeros", zeros)
            self._elements += x.numel()
            bad = m.nonfinite.detach().double().reshape(())
        else:
            if check:  # the count comes from the block kernel's own amax where it can
                q, bad = quantize_block_unchecked(y, fmt, stochastic, generator, flag=True,
                                                  into=into)
                bad = bad.double()
            else:
                q = quantize_block_unchecked(y, fmt, stochastic, generator, into=into)
        return (q.movedim(-1, 1) if move else q), bad

    def metrics(self, sync: bool = True, reset: bool = False) -> dict:
        """Fractions over the measured calls since the last reset (NaN before any) and
        ``bits_per_element``; floats (one host sync), or 0-d tensors with ``sync=False``."""
        out = self._fractions(("overflow", "underflow", "nan", "zeros"))
        out["bits_per_element"] = torch.tensor(self.bits_per_element, dtype=torch.float64)
        if reset:
            self.reset_metrics()
        if not sync:
            return out
        return read_floats(out)

    def state_dict(self) -> dict:
        return {"fmt": self.fmt.name, "rounding": self.rounding, "dims": self.dims}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state != mine:
            raise ValueError(f"state is for {state}, this quantizer is {mine}")

    def __repr__(self) -> str:
        return (f"BlockQuantizer({self.fmt.name}, rounding={self.rounding!r}, "
                f"dims={self.dims!r})")


@dataclass(frozen=True)
class SplitChoice:
    """A model-wide format of ``bits`` bits whose exponent/mantissa split is chosen from the
    first refresh's statistics (``select_split``), then shifted by ``exp_offset`` exponent bits
    (Table 3's E*+1, E*-1, E*-2; clamped to [1, bits-1]).

    select: ``"lognormal"``: the exact expected error of the lognormal model at the median
        sigma over layers (``optimal_format``, Table 2); ``"empirical"``: the least mean over
        layers of the error measured on each layer's refresh sample at its own best scale.
    semantics: ``"paper"`` (Eq. 2) or ``"ieee"``.
    """

    bits: int = 6
    exp_offset: int = 0
    select: str = "lognormal"
    semantics: str = "paper"

    def __post_init__(self):
        require_int_range(self.bits, "bits", 3, 16)
        require_int_range(self.exp_offset, "exp_offset", -15, 15)
        require_choice(self.select, "select", SELECTS)
        require_choice(self.semantics, "semantics", ("paper", "ieee"))

    def choose(self, stats: Sequence[LayerStats], rounding: str) -> tuple[FPFormat, dict]:
        """(format, record of the choice) from the layers' statistics; host work (refresh)."""
        ok = [s for s in stats if bool(s.fit.ok)]
        sel = select_split(self.bits, [s.fit for s in ok], [s.sample for s in ok],
                           select=self.select, semantics=self.semantics, rounding=rounding)
        e_star = sel["fmt"].exp_bits
        e = min(max(e_star + self.exp_offset, 1), self.bits - 1)
        make = FPFormat.paper if self.semantics == "paper" else FPFormat.ieee
        chosen = {"select": self.select, "sigma": sel["sigma"], "e_star": e_star,
                  "exp_bits": e, "man_bits": self.bits - 1 - e, "errors": sel["errors"]}
        return make(e, self.bits - 1 - e), chosen


class QuantizerGroup:
    """The FP quantizers of a model's layers: one format for all, chosen at the first refresh
    when ``fmt`` is a ``SplitChoice``; scales refreshed per layer by ``update``.

    Args:
        n_layers: number of layers. fmt: an FPFormat (fixed), a SplitChoice, or a BlockFormat
            (``BlockQuantizer`` per layer: the per-block scale replaces ``make_scaling``, which
            is then not called; ``shared_scaling`` must be False).
        rounding: as FPQuantizer. make_scaling: builds one layer's scaling policy.
        shared_scaling: one policy object for every layer (a global loss scale) instead.
        block_dims: a BlockFormat's ``dims`` argument of ``BlockQuantizer``.
    Before the first ``update`` there are no quantizers (``quantizers`` is None).
    """

    def __init__(self, n_layers: int, fmt: FPFormat | SplitChoice | BlockFormat, rounding: str,
                 make_scaling: Callable[[], ScalingPolicy], shared_scaling: bool = False,
                 block_dims: str = "channels"):
        if not isinstance(fmt, (FPFormat, SplitChoice, BlockFormat)):
            raise TypeError(f"fmt must be an FPFormat, a SplitChoice or a BlockFormat, got "
                            f"{type(fmt).__name__}")
        if isinstance(fmt, BlockFormat) and shared_scaling:
            raise ValueError("a block format is scaled per block: shared_scaling must be False")
        self.n_layers = int(n_layers)
        self.spec, self.rounding = fmt, require_choice(rounding, "rounding", ROUNDINGS)
        self.make_scaling, self.shared_scaling = make_scaling, bool(shared_scaling)
        self.block_dims = require_choice(block_dims, "block_dims", BLOCK_DIMS)
        self.format: FPFormat | BlockFormat | None = None
        self.chosen: dict | None = None
        self.global_scaling: ScalingPolicy | None = None
        self.quantizers: list[FPQuantizer | BlockQuantizer] | None = None

    @property
    def bits_per_element(self) -> float | None:
        """Bits per element of the chosen format (block formats: elements plus block scales);
        None before the format is known."""
        if self.format is None:
            return None
        if isinstance(self.format, BlockFormat):
            return self.format.bits_per_element
        return float(self.format.bits)

    def _build(self, fmt: FPFormat | BlockFormat) -> None:
        self.format = fmt
        if isinstance(fmt, BlockFormat):
            self.quantizers = [BlockQuantizer(fmt, self.rounding, self.block_dims,
                                              track_metrics=False)
                               for _ in range(self.n_layers)]
            return
        if self.shared_scaling:
            self.global_scaling = self.make_scaling()
        self.quantizers = [FPQuantizer(fmt, self.rounding,
                                       self.global_scaling or self.make_scaling(),
                                       track_metrics=False) for _ in range(self.n_layers)]

    def update(self, stats: Sequence[LayerStats | None]) -> None:
        """Refresh from one entry per layer (None: no statistics for that layer this time)."""
        if len(stats) != self.n_layers:
            raise ValueError(f"stats must have {self.n_layers} entries, got {len(stats)}")
        if self.quantizers is None:
            if isinstance(self.spec, SplitChoice):
                fmt, self.chosen = self.spec.choose([s for s in stats if s is not None],
                                                    self.rounding)
            else:
                fmt = self.spec
            self._build(fmt)
        for q, s in zip(self.quantizers, stats):
            if s is not None and bool(s.fit.ok):
                q.update(s)

    def step(self) -> torch.Tensor | None:
        """Close a training step of the shared policy (dynamic loss scale): a 0-d bool tensor,
        True = skip; None without a shared policy."""
        return None if self.global_scaling is None else self.global_scaling.step()

    def state_dict(self) -> dict:
        return {
            "format": self.format, "chosen": self.chosen,
            "global_scaling": None if self.global_scaling is None
            else self.global_scaling.state_dict(),
            "quantizers": None if self.quantizers is None
            else [q.state_dict() for q in self.quantizers],
        }

    def load_state_dict(self, state: dict) -> None:
        self.chosen = state["chosen"]
        if state["format"] is None:
            self.format, self.quantizers, self.global_scaling = None, None, None
            return
        self._build(state["format"])
        if self.global_scaling is not None:
            self.global_scaling.load_state_dict(state["global_scaling"])
        for q, st in zip(self.quantizers, state["quantizers"]):
            q.load_state_dict(st)


def select_split(bits: int, fits, samples=None, *, select: str = "lognormal",
                 semantics: str = "paper", rounding: str = "nearest") -> dict:
    """The 1-n2-n1 split E* of ``bits`` bits that a ``SplitChoice`` uses for a whole model.

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
