"""What ``compress_gradients`` does: the user-facing configuration, validated at construction.

``CompressionConfig(quantize=QuantizeSpec(...), prune=PruneSpec(...))`` says which steps run on
the neural gradients (prune, then quantize), where (which layers) and when (the refresh
schedule). Every field is checked when the object is built: a bad value raises a ValueError or
TypeError naming the field and what it accepts, never at the first refresh.

Modes are small frozen dataclasses rather than strings plus keyword bags:

* the format: an :class:`FPFormat` (or a format name), :class:`SplitChoice` (``"optimal"``:
  the split E* chosen from the first refresh's statistics, Table 2), or a :class:`BlockFormat`
  (or a block format name: ``"mxfp8_e4m3"``, ``"mxfp4"``, ``"nvfp4"``, ...): one scale per
  block, which replaces the per-layer scaling;
* the scale (section 4.4, Table 4): :class:`AmaxScaling` (default), :class:`AuthorsScaling`,
  :class:`OptimalScaling`, :class:`EmpiricalScaling`, :class:`LossScaling` (one global loss
  scale, static or dynamic), :class:`NoScaling`. A registry name (``"amax"``, ``"per_layer"``,
  ``"per_layer_optimal"``, ``"per_layer_empirical"``, ``"amax_delayed"``, ``"static"``,
  ``"dynamic"``, ``"none"``) plus ``scaling_options`` is accepted and converted.

Defaults are the choices the project measured best (README, "Choices measured"): amax per-layer
scaling (the analytic optimum of the lognormal model lost 3.8 points in FP6 and the authors' rule
diverged in FP4 on the paper's Eq. 2 formats), statistics refreshed every 100 steps and at each
epoch start, and the layer selection ``"auto"``: the conv outputs of a model that has convs (as
the authors' code), otherwise the hidden linear layers, never the last linear layer (the
classifier, whose neural gradient softmax - onehot is not lognormal and diverged in FP4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass

from gradcomp.compressors.pruning import HETEROGENEOUS_METHODS, PRUNE_METHODS
from gradcomp.compressors.quantizer import BLOCK_DIMS, SELECTS, SplitChoice
from gradcomp.compressors.scaling import ScalingPolicy, make_scaling
from gradcomp.numerics._checks import require_choice, require_open_unit
from gradcomp.numerics.block import NAMED_BLOCK_FORMATS, BlockFormat
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import ROUNDINGS

__all__ = [
    "AmaxScaling", "AuthorsScaling", "CompressionConfig", "EmpiricalScaling", "LAYER_TYPES",
    "LossScaling", "NONFINITE_POLICIES", "NoScaling", "OptimalScaling", "PruneSpec",
    "QuantizeSpec", "SCALINGS", "SplitChoice", "scaling_from_name",
]

LAYER_TYPES = ("conv", "linear", "batchnorm")
NONFINITE_POLICIES = ("skip", "keep", "zero")  # CompressionConfig.nonfinite


# --- scaling modes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoScaling:
    """s = 1."""

    policy = "none"

    def build(self, rounding: str) -> ScalingPolicy:
        return make_scaling("none")


@dataclass(frozen=True)
class AmaxScaling:
    """Per-layer, per-tensor s = max_normal / (amax * 2^margin): the largest |g| lands on the
    format's largest value (section 4.4's per-layer scaling; no overflow by construction).
    ``delayed``: use the max of the last ``history`` amaxes (TransformerEngine's delayed
    scaling) instead of the current tensor's."""

    margin: float = 0.0
    delayed: bool = False
    history: int = 16

    def __post_init__(self):
        self.build("nearest")

    @property
    def policy(self) -> str:
        return "amax_delayed" if self.delayed else "amax"

    def build(self, rounding: str) -> ScalingPolicy:
        if self.delayed:
            return make_scaling("amax_delayed", history=self.history, margin=self.margin)
        return make_scaling("amax", margin=self.margin)


@dataclass(frozen=True)
class AuthorsScaling:
    """The authors' per-layer rule s = 2^(-mean(log2|g|) - margin) (section 4.4)."""

    margin: float = 3.0
    policy = "per_layer"

    def build(self, rounding: str) -> ScalingPolicy:
        return make_scaling("per_layer", margin=self.margin)


@dataclass(frozen=True)
class OptimalScaling:
    """Per layer, the s minimising the lognormal model's exact expected relative error (Eq. 3)
    for the fitted (mu, sigma), the format and the spec's rounding."""

    policy = "per_layer_optimal"

    def build(self, rounding: str) -> ScalingPolicy:
        return make_scaling("per_layer_optimal", rounding=rounding)


@dataclass(frozen=True)
class EmpiricalScaling:
    """Per layer, the s minimising the relative error measured on the refresh sample (a grid
    of ``octaves`` binades either side of the lognormal optimum, ``steps_per_octave`` each)."""

    octaves: int = 3
    steps_per_octave: int = 4
    policy = "per_layer_empirical"

    def __post_init__(self):
        self.build("nearest")

    def build(self, rounding: str) -> ScalingPolicy:
        return make_scaling("per_layer_empirical", rounding=rounding, octaves=self.octaves,
                            steps_per_octave=self.steps_per_octave)


@dataclass(frozen=True)
class LossScaling:
    """One global loss scale shared by every layer (Table 4's baselines): static ``scale``, or
    dynamic (torch.amp.GradScaler's rule: start at ``scale``, x ``backoff`` and skip the step on
    overflow, x ``growth`` after ``interval`` clean steps)."""

    dynamic: bool = False
    scale: float = 2.0**16
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000

    def __post_init__(self):
        self.build("nearest")

    @property
    def policy(self) -> str:
        return "dynamic" if self.dynamic else "static"

    def build(self, rounding: str) -> ScalingPolicy:
        if self.dynamic:
            return make_scaling("dynamic", init_scale=self.scale, growth=self.growth,
                                backoff=self.backoff, interval=self.interval)
        return make_scaling("static", scale=self.scale)


SCALINGS = (NoScaling, AmaxScaling, AuthorsScaling, OptimalScaling, EmpiricalScaling,
            LossScaling)


def scaling_from_name(name: str, **options):
    """The scaling mode of a registry name and its options (the recipe-file spelling)."""
    table = {
        "none": lambda: NoScaling(**options),
        "amax": lambda: AmaxScaling(**options),
        "amax_delayed": lambda: AmaxScaling(delayed=True, **options),
        "per_layer": lambda: AuthorsScaling(**options),
        "per_layer_optimal": lambda: OptimalScaling(**options),
        "per_layer_empirical": lambda: EmpiricalScaling(**options),
        "static": lambda: LossScaling(**options),
        "dynamic": lambda: LossScaling(dynamic=True, **options),
    }
    require_choice(name, "quantize.scaling", tuple(table))
    if "init_scale" in options:  # the policy's own keyword for the dynamic scale's start
        options["scale"] = options.pop("init_scale")
    try:
        return table[name]()
    except TypeError as exc:
        raise TypeError(f"quantize.scaling_options for {name!r}: {exc}") from None


def scaling_to_dict(mode) -> dict:
    """``{"policy": name, **fields}``: the recipe-file spelling of a scaling mode."""
    return {"policy": mode.policy, **dataclasses.asdict(mode)}


# --- specs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizeSpec:
    """FP quantization of neural gradients: Q(g*s)/s per layer, or a block-scaled format (one
    scale per block of each layer's neural gradient, ``numerics.block.quantize_block``).

    format: a :class:`SplitChoice` (``"optimal"``, the default: the split E* of ``bits`` bits
        chosen at the first refresh, then shifted by ``exp_offset`` exponent bits), an
        :class:`FPFormat`, a format name (``"e5m2"``, ``"e4m3fn"``, ``"1-4-1"``, ...), a
        :class:`BlockFormat` or a block format name (``"mxfp8_e4m3"``, ``"mxfp4"``, ``"nvfp4"``,
        ``"e4m3fn:32:e8m0:rceil"``: any name ``BlockFormat.from_name`` accepts).
    rounding: ``"nearest"`` (ties to even) or ``"stochastic"``.
    scaling: a scaling mode (default :class:`AmaxScaling`) or a registry name. With a block
        format the per-block scale (from each block's amax, the format's rule) IS the scaling:
        only the default ``AmaxScaling()`` or ``"none"`` are accepted, both stored as
        :class:`NoScaling` (no per-layer pre-scale); anything else raises ValueError.
    block_dims: block formats only: ``"channels"`` (default: a 4-D/5-D neural gradient, a conv
        output (N, C, H, W), has its channel dim 1 moved last before blocking, so blocks run
        along the output channels, the reduction dimension of the input-gradient GEMM; 2-D/3-D
        tensors, linear outputs (..., features), are blocked along their last dim as they are)
        or ``"format"`` (the BlockFormat's own ``dims`` on the tensor as it is).
    bits, exp_offset, select, semantics: shorthands building the ``SplitChoice`` of
        ``format="optimal"`` (``semantics`` also picks the meaning of a ``"1-X-Y"`` name);
        scaling_options: the options of a ``scaling`` given by name. After construction
        ``format`` is an FPFormat or a SplitChoice and ``scaling`` a mode object.
    """

    format: str | FPFormat | SplitChoice | BlockFormat = "optimal"
    rounding: str = "nearest"
    scaling: object = "amax"
    block_dims: str = "channels"
    bits: InitVar[int | None] = None
    exp_offset: InitVar[int | None] = None
    select: InitVar[str | None] = None
    semantics: InitVar[str | None] = None
    scaling_options: InitVar[dict | None] = None

    def __post_init__(self, bits, exp_offset, select, semantics, scaling_options):
        require_choice(self.rounding, "quantize.rounding", ROUNDINGS)
        if semantics is not None:
            require_choice(semantics, "quantize.semantics", ("paper", "ieee"))
        if select is not None:
            require_choice(select, "quantize.select", SELECTS)
        fmt = self.format
        if isinstance(fmt, str) and fmt.strip().lower() == "optimal":
            kw = {k: v for k, v in dict(bits=bits, exp_offset=exp_offset, select=select,
                                        semantics=semantics).items() if v is not None}
            try:
                fmt = SplitChoice(**kw)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"quantize: {exc}") from None
        else:
            if exp_offset or bits is not None or select is not None:
                raise ValueError("quantize.bits / exp_offset / select apply to format "
                                 "'optimal' only")
            if isinstance(fmt, str):
                key = fmt.strip().lower()
                if key.count("-") == 2 and semantics == "ieee":  # 1-X-Y, IEEE-like
                    _, e, m = key.split("-")
                    fmt = FPFormat.ieee(int(e), int(m))
                elif key in NAMED_BLOCK_FORMATS or ":" in key:
                    try:
                        fmt = BlockFormat.from_name(key)
                    except (TypeError, ValueError) as exc:
                        raise type(exc)(f"quantize.format: {exc}") from None
                else:
                    try:
                        fmt = FPFormat.from_name(fmt)
                    except ValueError as exc:
                        raise ValueError(f"quantize.format: {exc}; or a block format: "
                                         f"{', '.join(NAMED_BLOCK_FORMATS)}") from None
            elif not isinstance(fmt, (FPFormat, SplitChoice, BlockFormat)):
                raise TypeError(f"quantize.format must be 'optimal', a format name, an "
                                f"FPFormat, a SplitChoice or a BlockFormat, got "
                                f"{type(fmt).__name__}")
        object.__setattr__(self, "format", fmt)
        require_choice(self.block_dims, "quantize.block_dims", BLOCK_DIMS)
        is_block = isinstance(fmt, BlockFormat)
        if not is_block and self.block_dims != "channels":
            raise ValueError("quantize.block_dims applies to block formats only")
        sc = self.scaling
        if isinstance(sc, str):
            sc = scaling_from_name(sc, **dict(scaling_options or {}))
        elif scaling_options:
            raise ValueError("quantize.scaling_options applies to a scaling given by name")
        if not isinstance(sc, SCALINGS):
            names = ", ".join(c.__name__ for c in SCALINGS)
            raise TypeError(f"quantize.scaling must be a registry name or one of {names}, "
                            f"got {type(sc).__name__}")
        if is_block:
            # the per-block scale is the scaling: a per-layer policy on top would only move
            # the E8M0/E4M3 scales (powers of two or rounded) and is not what MX/NVFP4 define
            if sc not in (AmaxScaling(), NoScaling()):
                raise ValueError(
                    f"quantize.scaling: a block format ({fmt.name}) is scaled per block by its "
                    f"own rule; scaling must be 'amax' (the default) or 'none', got "
                    f"{sc.policy!r} {sc!r}")
            sc = NoScaling()
        object.__setattr__(self, "scaling", sc)

    @property
    def is_block(self) -> bool:
        """The format is a :class:`BlockFormat` (one scale per block, no per-layer scaling)."""
        return isinstance(self.format, BlockFormat)

    @property
    def shared_scaling(self) -> bool:
        """One global policy object for every layer (a loss scale)."""
        return isinstance(self.scaling, LossScaling)

    def make_scaling(self) -> ScalingPolicy:
        """A new scaling policy of this spec (the rounding-aware ones get ``rounding``)."""
        return self.scaling.build(self.rounding)

    def to_dict(self) -> dict:
        fmt = self.format
        if isinstance(fmt, BlockFormat):
            if BlockFormat.from_name(fmt.name) != fmt:
                raise ValueError(f"block format {fmt!r} has no name that rebuilds it")
            return {"format": fmt.name, "rounding": self.rounding, "scaling": "none",
                    "scaling_options": {}, "block_dims": self.block_dims}
        out = {"format": fmt.name if isinstance(fmt, FPFormat) else "optimal",
               "rounding": self.rounding}
        if isinstance(fmt, FPFormat) and FPFormat.from_name(fmt.name) != fmt:
            raise ValueError(f"format {fmt!r} has no name that rebuilds it")
        if isinstance(fmt, SplitChoice):
            out.update(dataclasses.asdict(fmt))
        sc = scaling_to_dict(self.scaling)
        out["scaling"] = sc.pop("policy")
        sc.pop("delayed", None)  # implied by the policy name
        sc.pop("dynamic", None)
        if out["scaling"] == "amax":
            sc.pop("history")  # only the delayed rule keeps a history
        out["scaling_options"] = sc
        return out


@dataclass(frozen=True)
class PruneSpec:
    """Stochastic pruning of neural gradients (Eq. 5) at a target sparsity.

    method: ``empirical`` (default: the exact expected sparsity on the layer's refresh sample,
        distribution free; on real resnet20/Fashion-MNIST gradients it missed the target by
        0.2 points on average over layers and targets 0.5-0.95 with a 16384-value sample, Eq. 8
        by 1.4-1.6: see ``gradcomp fitcheck``), ``lognormal`` (the paper's Eq. 8),
        ``calibrated``, ``atp`` (normal assumption), ``topk_stochastic`` (k-th largest |g| then
        the stochastic operator) or ``topk`` (deterministic top-k, biased: meProp/SAW).
    heterogeneous: per-layer sparsities S_i from ``allocate_sparsity`` (appendix A.9, lognormal
        closed forms) meeting the overall element-weighted target exactly; ``cos_target``,
        ``cap`` and ``truncate_k`` as there (methods ``lognormal`` and ``empirical``).
    """

    sparsity: float = 0.8
    method: str = "empirical"
    heterogeneous: bool = False
    cos_target: float = 0.9
    cap: float = 0.95
    truncate_k: float | None = 2.7

    def __post_init__(self):
        _require_number(self.sparsity, "prune.sparsity")
        require_open_unit(self.sparsity, "prune.sparsity")
        require_choice(self.method, "prune.method", PRUNE_METHODS)
        _require_bool(self.heterogeneous, "prune.heterogeneous")
        _require_number(self.cos_target, "prune.cos_target")
        _require_number(self.cap, "prune.cap")
        require_open_unit(self.cos_target, "prune.cos_target")
        require_open_unit(self.cap, "prune.cap")
        if self.truncate_k is not None:
            _require_number(self.truncate_k, "prune.truncate_k")
        if self.heterogeneous and self.method not in HETEROGENEOUS_METHODS:
            raise ValueError("prune.heterogeneous needs prune.method 'lognormal' or 'empirical' "
                             f"(thresholds for the allocated sparsities), got {self.method!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _require_number(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")


def _require_bool(v, name: str) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be true or false, got {type(v).__name__} {v!r}")


@dataclass(frozen=True)
class CompressionConfig:
    """What ``compress_gradients`` does, and where and when.

    quantize / prune: the steps (either, both: prune then quantize, or neither: a no-op wrap).
    types: ``"auto"`` (default: conv outputs when the model has convs, else every linear layer
        but the last, the classifier), or a tuple of layer kinds whose outputs are compressed:
        any of ``conv``, ``linear``, ``batchnorm``.
    names: if given, exactly these module names; exclude: names to skip.
    skip_first / skip_last: leave the first / last selected layer uncompressed.
    refresh_every: refresh statistics every N steps (None: only per epoch / first step).
        Default 100: scales and thresholds then follow the gradients within an epoch.
    refresh_each_epoch: refresh at the first step of every epoch (the paper's schedule).
    sample_size: values per layer drawn (with replacement) on refresh steps for the sample-based
        methods: empirical thresholds, ATP, ``EmpiricalScaling`` and ``select="empirical"``.
        Default 16384: the empirical threshold's error shrinks as 1/sqrt(size) (mean miss on
        real gradients 0.39 points at 4096, 0.22 at 16384, 0.10 at 65536); between refreshes
        the gradients drift by more than that (3-4 points after 150 steps), so a larger sample
        buys little: refresh more often instead.
    metrics_every: count sparsity / overflow / underflow / non-finite every N steps (extra
        reductions cost time; metrics are then a systematic sample of the steps).
    nonfinite: what a step does when a NaN or inf reaches a compressed layer's neural
        gradient (they are excluded from every statistic in every mode):
        ``"skip"`` (default, as ``torch.amp.GradScaler``): ``handle.step(optimizer)`` skips the
        optimizer step (also when the optimizer's gradients are non-finite), counts it in
        ``skipped_steps`` and returns False; a refresh due on that step moves to the next one.
        Costs one device reduction per layer and step and one host read per step (the
        decision). ``"keep"``: the values flow on unchanged and the step is taken (the weights
        become non-finite unless a dynamic loss scale skips the step). ``"zero"``: they are
        replaced by 0 (one extra pass) and the step is taken.
    """

    quantize: QuantizeSpec | None = None
    prune: PruneSpec | None = None
    types: str | tuple = "auto"
    names: tuple | None = None
    exclude: tuple = ()
    skip_first: bool = False
    skip_last: bool = False
    refresh_every: int | None = 100
    refresh_each_epoch: bool = True
    sample_size: int = 16384
    metrics_every: int = 10
    nonfinite: str = "skip"

    def __post_init__(self):
        if isinstance(self.types, str):
            require_choice(self.types, "types", ("auto",) + LAYER_TYPES)
            if self.types != "auto":
                object.__setattr__(self, "types", (self.types,))
        else:
            object.__setattr__(self, "types", tuple(self.types))
            if not self.types:
                raise ValueError("types must be 'auto' or a non-empty tuple of layer kinds")
            for t in self.types:
                require_choice(t, "types", LAYER_TYPES)
        for name in ("names", "exclude"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, str) or not all(isinstance(n, str) for n in v):
                    raise TypeError(f"{name} must be a tuple of module names, got {v!r}")
                object.__setattr__(self, name, tuple(v))
        require_choice(self.nonfinite, "nonfinite", NONFINITE_POLICIES)
        for name in ("skip_first", "skip_last", "refresh_each_epoch"):
            _require_bool(getattr(self, name), name)
        for name in ("sample_size", "metrics_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.refresh_every is not None and (
            isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int)
            or self.refresh_every < 1
        ):
            raise ValueError(f"refresh_every must be a positive int or None, got "
                             f"{self.refresh_every!r}")
        if self.quantize is not None and not isinstance(self.quantize, QuantizeSpec):
            raise TypeError("quantize must be a QuantizeSpec or None")
        if self.prune is not None and not isinstance(self.prune, PruneSpec):
            raise TypeError("prune must be a PruneSpec or None")

    def to_dict(self) -> dict:
        """Plain data (the recipe-file spelling): ``recipe_from_dict`` rebuilds an equal config."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["quantize"] = None if self.quantize is None else self.quantize.to_dict()
        out["prune"] = None if self.prune is None else self.prune.to_dict()
        for k in ("names", "exclude", "types"):
            if isinstance(out[k], tuple):
                out[k] = list(out[k])
        return out
