"""Per-GEMM backward quantization: ``quantize_backward(model, config) -> BackwardQuantHandle``.

A Linear/Conv2d layer y = x W^T (+ b) has two backward products, each with two operands:

    dgrad = dL/dx = Q_g1(G) @ Q_w(W)           reduction over the output features
    wgrad = dL/dW = Q_g2(G)^T @ Q_x(x)         reduction over batch * tokens (or positions)

with G = dL/dy. Each of the four operands gets its own :class:`OperandSpec` (kind "none", "fp",
"block", "luq" or "int"), so a recipe can e.g. stochastically round G to FP4 in both products while
keeping W and x in 8 bits, as NVIDIA's NVFP4 recipe, Quartet and LUQ do. The bias gradient is
sum(G) in the input precision (no quantization). The forward is the layer's own product, so
forward quantization (``quantize_forward``: PACT inputs and SAWB weights, or block formats such
as NVFP4) composes: the operands saved for the backward are the forward-quantized x and W that
the layer really multiplied (so a block-format backward spec re-quantizes them, e.g. along the
other dimension); the gradients returned for them reach W and x through quantize_forward's
straight-through estimator.

Randomized Hadamard transform (RHT) on wgrad, optional (:class:`RHTSpec`): both wgrad operands
are multiplied by H D (``numerics.hadamard``) along the reduction dimension before they are
quantized; in exact arithmetic the transform cancels, (H D G)^T (H D X) = G^T X, and it spreads
outliers across each block before quantization. Linear: along the flattened batch*token rows
(padded with zero rows to a multiple of the block: zero rows add nothing). Conv2d: along the
batch dimension N (padded with zero samples): the weight gradient is a sum over samples of a
bilinear map of (x_n, G_n), so a shared orthogonal mix of samples cancels exactly as well; mixing
spatial positions would not (overlapping patches). Signs: ``"fixed"`` (one vector from the seed,
as in NVIDIA's recipe) or ``"per_step"`` (fresh each forward call of the layer, Quartet).

How the layer is reached: a forward pre-hook enters a ``TorchFunctionMode`` that routes the
layer's one ``F.linear`` / ``F.conv2d`` call through this module's autograd Function; a forward
hook (``always_call``) leaves it. No module, forward, parameter or state_dict key is replaced,
so the order of ``quantize_forward``, ``compress_gradients`` and ``quantize_backward`` does not
matter (``compress_gradients`` hooks the layer's output: G arrives here already compressed) and
each ``remove()`` undoes only its own hooks. Under ``torch.no_grad`` nothing is intercepted.

Exactness: with every operand "none" and no RHT the gradients equal the unmodified layer's bit
for bit (Linear: the same mm calls autograd makes; Conv2d: aten's convolution_backward, once
for the input's gradient and once for the weight's, as ``torch.nn.grad.conv2d_input`` /
``conv2d_weight`` call it). Random bits: one ``torch.Generator`` per
device seeded with ``config.seed`` (``DeviceGenerators``); each stochastic operand draws one seed
per call, so a seeded run repeats exactly. With data parallelism give each rank its own
``config.seed`` (same seed = same rounding noise on every rank); RHT signs depend only on
``RHTSpec.seed`` (and the step), so they agree across ranks.

Operand layout passed to a quantizer: ``q(x, generator, dims)`` where ``dims`` are the reduction
dims of that operand in its GEMM. Per-tensor quantizers (every kind but "block") ignore
``dims``; a block quantizer (kind "block", ``per_tensor = False``) runs its blocks along the
flattened reduction dims: with 1-D blocks it gets the tensor as it is and the format's ``dims``
set to them (``numerics.block`` blocks in place where it can: one dimension, or a conv
operand's batch and pixels when H * W shares runs of 16 or more with the block, 28x28 pixels
under 16- and 32-element blocks; else it moves them last),
with 2-D tiles (e.g. NVFP4's 16x16 weight tiles) the tensor with those dims moved last and
flattened and the other dims flattened too, a (rest, reduction) matrix.

Plain-data form (recipe files): ``BackwardQuantConfig.to_dict()`` and
:func:`backward_config_from_dict` (strict: unknown fields raise, naming them).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradcomp.numerics._checks import require_choice, require_int_range
from gradcomp.numerics.block import BlockFormat, quantize_block
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.hadamard import pad_to_block, rht, rht_signs
from gradcomp.numerics.luq import luq_quantize
from gradcomp.numerics.random import DeviceGenerators, draw_keys, uniform_from_keys
from gradcomp.numerics.rounding import ROUNDINGS, quantize_fp
from gradcomp.numerics.scales import amax_to_scale

__all__ = [
    "OPERAND_KINDS",
    "FP_SCALINGS",
    "RHT_SIGNS",
    "OperandSpec",
    "OperandQuantizer",
    "RHTSpec",
    "BackwardSpec",
    "BackwardQuantConfig",
    "BackwardQuantHandle",
    "quantize_backward",
    "backward_products",
    "backward_config_from_dict",
    "quantize_operand",
]

OPERAND_KINDS = ("none", "fp", "block", "luq", "int")
FP_SCALINGS = ("amax", "amax-pow2", "none")
RHT_SIGNS = ("fixed", "per_step")
_LAYER_TYPES = (nn.Linear, nn.Conv2d)
# marker in a converted module's instance __dict__ (never in its state_dict)
_MARK = "_gradcomp_backward_quant"


# ---------------------------------------------------------------------------------------------
# operand quantizers


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized in the backward pass.

    kind:
        ``"none"``: unchanged (the tensor itself, no copy).
        ``"fp"``: ``quantize_fp`` onto ``format`` (an FPFormat or a name: "e2m1fn", "e4m3fn",
            "1-3-0", ...) with ``rounding``; per-tensor ``scaling``: "amax" (s = max_normal /
            max|x|, so the largest magnitude maps to the top value: no overflow), "amax-pow2"
            (that s rounded down to a power of two: exact scaling), "none" (s = 1). Saturating
            formats clamp; NaN stays NaN.
        ``"block"``: ``quantize_block`` onto a block-scaled ``format`` (a :class:`BlockFormat`
            or a block format name: "mxfp4", "nvfp4", "nvfp4_2d", "mxfp8_e4m3", ...) with
            ``rounding`` for the elements; the blocks run along the GEMM's reduction dimension
            (see "Operand layout" above); each block's scale comes from its own amax by the
            format's rule, so ``scaling`` must stay "amax". Unbiased under stochastic rounding
            when no element saturates, which the round-up scale rule ``rceil`` guarantees; with
            the OCP ``floor`` rule and NVFP4's rounded E4M3 scale the block maximum can saturate
            (a small bias on that element).
        ``"luq"``: ``luq_quantize`` with ``format`` = bits (default 4) and ``samples``;
            always stochastic (``rounding`` must be "stochastic").
        ``"int"``: symmetric integer grid {j * max|x| / n : |j| <= n}, n = 2^(bits-1) - 1,
            ``format`` = bits in [2, 16]; ``rounding`` "nearest" (half to even) or "stochastic"
            (up with probability equal to the fractional part: unbiased). Non-finite values
            are excluded from max|x| and pass unchanged; an all-zero tensor stays zero.
    """

    kind: str = "none"
    format: FPFormat | str | int | None = None
    rounding: str = "stochastic"
    scaling: str = "amax"
    samples: int = 1

    def __post_init__(self):
        require_choice(self.kind, "kind", OPERAND_KINDS)
        require_choice(self.rounding, "rounding", ROUNDINGS)
        require_int_range(self.samples, "samples", 1, 1 << 16)
        if self.samples != 1 and self.kind != "luq":
            raise ValueError(f"samples > 1 is only for kind 'luq', got kind {self.kind!r}")
        if self.kind == "fp":
            if self.format is None:
                raise ValueError("kind 'fp' needs format (an FPFormat or a format name)")
            fmt = self.format if isinstance(self.format, FPFormat) else FPFormat.from_name(
                self.format)
            object.__setattr__(self, "format", fmt)
            require_choice(self.scaling, "scaling", FP_SCALINGS)
        elif self.kind == "block":
            if self.format is None:
                raise ValueError("kind 'block' needs format (a BlockFormat or a block format "
                                 "name such as 'mxfp4', 'nvfp4', 'nvfp4_2d')")
            fmt = self.format if isinstance(self.format, BlockFormat) else \
                BlockFormat.from_name(self.format)
            object.__setattr__(self, "format", fmt)
            if self.scaling != "amax":
                raise ValueError(f"kind 'block' is scaled per block by the format's rule: "
                                 f"scaling must be 'amax', got {self.scaling!r}")
            if fmt.dims != ((-1,) if len(fmt.block) == 1 else (-2, -1)):
                raise ValueError(f"kind 'block': the blocks run along the GEMM's reduction "
                                 f"dimension, so format.dims must be the default; got "
                                 f"{fmt.dims} in {fmt.name}")
        elif self.kind in ("luq", "int"):
            bits = 4 if self.format is None else self.format
            lo, hi = (2, 8) if self.kind == "luq" else (2, 16)
            require_int_range(bits, "format (bits)", lo, hi)
            object.__setattr__(self, "format", bits)
            if self.kind == "luq" and self.rounding != "stochastic":
                raise ValueError("kind 'luq' is stochastic by construction: rounding must be "
                                 "'stochastic'")
        elif self.format is not None:
            raise ValueError(f"kind 'none' takes no format, got {self.format!r}")

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        r = "sr" if self.rounding == "stochastic" else "rn"
        if self.kind == "fp":
            return f"{self.format.name}-{r}" + ("" if self.scaling == "amax" else
                                                f"-{self.scaling}")
        if self.kind == "block":
            return f"{self.format.name}-{r}"
        if self.kind == "luq":
            return f"luq{self.format}" + (f"x{self.samples}" if self.samples > 1 else "")
        return f"int{self.format}-{r}"

    @property
    def unbiased(self) -> bool:
        """True when E[q(x)] = x for every finite x (no clamping can occur with amax scaling)."""
        if self.kind == "none":
            return True
        if self.kind == "fp":
            return self.rounding == "stochastic" and self.scaling != "none"
        if self.kind == "block":  # only the round-up scale rule excludes saturation
            return self.rounding == "stochastic" and self.format.rule == "rceil"
        return self.rounding == "stochastic"

    def to_dict(self) -> dict:
        """Plain data: ``OperandSpec(**d)`` rebuilds an equal spec."""
        fmt = self.format
        if isinstance(fmt, (FPFormat, BlockFormat)):
            fmt = fmt.name
        return {"kind": self.kind, "format": fmt, "rounding": self.rounding,
                "scaling": self.scaling, "samples": self.samples}

    def build(self) -> OperandQuantizer:
        return OperandQuantizer(self)


def _int_quantize(x: torch.Tensor, bits: int, stochastic: bool, generator) -> torch.Tensor:
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.detach().to(cdt)
    fin = torch.isfinite(y)
    amax = torch.where(fin, y.abs(), torch.zeros_like(y)).amax()
    n = 2 ** (bits - 1) - 1
    step = torch.where(amax > 0, amax / n, torch.ones_like(amax))
    t = torch.where(fin, y / step, torch.zeros_like(y))
    if stochastic:
        keys = draw_keys(generator, x.device)
        u = uniform_from_keys(keys[0], keys[1], t.numel(), x.device, cdt)
        fl = torch.floor(t)
        q = fl + (u.view(t.shape) < t - fl).to(cdt)
    else:
        q = torch.round(t)
    q = torch.clamp(q, -n, n) * step
    return torch.where(fin, q, y).to(x.dtype)


class OperandQuantizer:
    """Callable ``q(x, generator=None, dims=None) -> x_hat`` built from an :class:`OperandSpec`.

    ``name`` labels tables; ``per_tensor`` is False for kind "block" (``quantize_operand`` then
    hands the tensor with its reduction dims: as it lies for 1-D blocks, ``_along``; moved last
    and flattened for 2-D tiles) and True otherwise (dims are ignored); ``unbiased`` mirrors
    the spec. The result has x's shape and dtype.
    """

    def __init__(self, spec: OperandSpec):
        self.spec = spec
        self.name = spec.name
        self.unbiased = spec.unbiased
        self.per_tensor = spec.kind != "block"
        # 1-D blocks (the format's default dims) can run along any one dimension in place
        self.in_place = (spec.kind == "block" and len(spec.format.block) == 1
                         and spec.format.dims == (-1,))
        self._formats: dict = {}

    def _along(self, dims) -> BlockFormat:
        """The block format with its 1-D blocks along ``dims`` (flattened in that order; None
        or (-1,): the format as it is): ``quantize_operand`` hands the reduction dimensions
        as they lie (``numerics.block`` reduces one dimension, or several whose blocks are
        contiguous runs, where they lie: the moved layout's values and bits, without the
        copies that move them last and back)."""
        fmt = self.spec.format
        if dims is None or tuple(dims) == (-1,) or not self.in_place:
            return fmt
        dims = tuple(dims)
        got = self._formats.get(dims)
        if got is None:
            got = self._formats[dims] = fmt.replace(dims=dims)
        return got

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 dims: Sequence[int] | None = None) -> torch.Tensor:
        s = self.spec
        if s.kind == "none" or x.numel() == 0:
            return x
        if s.kind == "luq":
            return luq_quantize(x, s.format, samples=s.samples, generator=generator)
        if s.kind == "int":
            return _int_quantize(x, s.format, s.rounding == "stochastic", generator)
        if s.kind == "block":
            if len(s.format.block) == 2 and x.dim() > 2:
                # 2-D tiles over (rest, reduction): flatten the other dims into one
                return quantize_block(x.reshape(-1, x.shape[-1]), s.format, s.rounding,
                                      generator).reshape(x.shape)
            return quantize_block(x, self._along(dims), s.rounding, generator)
        scale = None
        if s.scaling != "none":
            a = x.detach().abs()
            amax = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax()
            scale = amax_to_scale(amax, s.format, power_of_two=s.scaling == "amax-pow2")
        return quantize_fp(x, s.format, s.rounding, scale=scale, generator=generator)

    def __repr__(self) -> str:
        return f"OperandQuantizer({self.name})"


NONE = OperandSpec()


@dataclass(frozen=True)
class RHTSpec:
    """Randomized Hadamard transform of the two wgrad operands along the reduction dimension.

    block: Hadamard size (a power of two; 16 in NVIDIA's NVFP4 recipe, 32 in Quartet).
    signs: ``"fixed"`` (one sign vector from ``seed``) or ``"per_step"`` (a fresh vector for each
        forward call of the layer: key (seed, call counter)).
    seed: int >= 0; the sign vector depends only on it (and the step): the same on every rank.
    """

    block: int = 16
    signs: str = "fixed"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2 \
                or self.block & (self.block - 1) or self.block > 1 << 15:
            raise ValueError(f"block must be a power of two in [2, 32768], got {self.block!r}")
        require_choice(self.signs, "signs", RHT_SIGNS)
        require_int_range(self.seed, "seed", 0, (1 << 62) - 1)

    @property
    def name(self) -> str:
        return f"rht{self.block}" + ("" if self.signs == "fixed" else "-fresh")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BackwardSpec:
    """The four operand specs of one layer's backward GEMMs, plus the optional wgrad RHT."""

    dgrad_grad: OperandSpec = NONE
    dgrad_weight: OperandSpec = NONE
    wgrad_grad: OperandSpec = NONE
    wgrad_input: OperandSpec = NONE
    rht: RHTSpec | None = None

    def __post_init__(self):
        for f in ("dgrad_grad", "dgrad_weight", "wgrad_grad", "wgrad_input"):
            if not isinstance(getattr(self, f), OperandSpec):
                raise TypeError(f"{f} must be an OperandSpec, got "
                                f"{type(getattr(self, f)).__name__}")
        if self.rht is not None and not isinstance(self.rht, RHTSpec):
            raise TypeError(f"rht must be an RHTSpec or None, got {type(self.rht).__name__}")

    @classmethod
    def uniform(cls, grad: OperandSpec = NONE, weight: OperandSpec = NONE,
                input: OperandSpec = NONE, rht: RHTSpec | None = None) -> BackwardSpec:
        """The same gradient spec in both products (the usual case)."""
        return cls(grad, weight, grad, input, rht)

    @property
    def is_identity(self) -> bool:
        return self.rht is None and all(
            s.kind == "none" for s in (self.dgrad_grad, self.dgrad_weight, self.wgrad_grad,
                                       self.wgrad_input))

    def to_dict(self) -> dict:
        """Plain data; :func:`backward_config_from_dict` reads it back (``spec`` entries)."""
        out = {f: getattr(self, f).to_dict() for f in _OPERANDS}
        out["rht"] = None if self.rht is None else self.rht.to_dict()
        return out

    def describe(self) -> dict:
        return {"dgrad": f"{self.dgrad_grad.name} x {self.dgrad_weight.name}",
                "wgrad": f"{self.wgrad_grad.name} x {self.wgrad_input.name}"
                + (f" ({self.rht.name})" if self.rht else "")}


@dataclass(frozen=True)
class BackwardQuantConfig:
    """Which layers get which :class:`BackwardSpec`.

    default: the spec of every nn.Linear / nn.Conv2d not matched by a rule (None: untouched).
    rules: ``((selector, spec_or_None), ...)``, first match wins; a selector is an fnmatch
        pattern on the qualified module name (e.g. ``"fc"``, ``"layer3.*"``) or a module type
        (e.g. ``nn.Linear``); a None spec keeps that layer in full precision.
    keep_first_last: leave the first and the last Linear/Conv2d (``named_modules`` order) in
        full precision, as the NVIDIA recipe and the LUQ paper keep the last layers.
    keep_last: additionally leave the last ``keep_last`` Linear/Conv2d layers in full
        precision (0..; the NVIDIA NVFP4 recipe keeps a fraction of the last blocks in BF16).
    seed: seed of the stochastic-rounding generators (one per device).
    """

    default: BackwardSpec | None = BackwardSpec()
    rules: tuple = field(default_factory=tuple)
    keep_first_last: bool = False
    seed: int = 0
    keep_last: int = 0

    def __post_init__(self):
        if self.default is not None and not isinstance(self.default, BackwardSpec):
            raise TypeError("default must be a BackwardSpec or None")
        rules = tuple(self.rules)
        for r in rules:
            if not (isinstance(r, tuple) and len(r) == 2):
                raise ValueError(f"rules must be (selector, spec) pairs, got {r!r}")
            sel, spec = r
            if not (isinstance(sel, str) or (isinstance(sel, type)
                                             and issubclass(sel, nn.Module))):
                raise TypeError(f"a rule selector must be a name pattern or an nn.Module type, "
                                f"got {sel!r}")
            if spec is not None and not isinstance(spec, BackwardSpec):
                raise TypeError(f"a rule spec must be a BackwardSpec or None, got {spec!r}")
        object.__setattr__(self, "rules", rules)
        if not isinstance(self.keep_first_last, bool):
            raise TypeError(f"keep_first_last must be a bool, got {self.keep_first_last!r}")
        require_int_range(self.seed, "seed", 0, (1 << 62) - 1)
        require_int_range(self.keep_last, "keep_last", 0, 1 << 20)

    def to_dict(self) -> dict:
        """Plain data (the recipe-file spelling): :func:`backward_config_from_dict` rebuilds an
        equal config. Rules with a module-type selector have no plain form (ValueError)."""
        rules = []
        for sel, spec in self.rules:
            if not isinstance(sel, str):
                raise ValueError(f"rule selector {sel!r} is a module type: only name patterns "
                                 "have a plain-data form")
            rules.append([sel, None if spec is None else spec.to_dict()])
        return {"default": None if self.default is None else self.default.to_dict(),
                "rules": rules, "keep_first_last": self.keep_first_last,
                "keep_last": self.keep_last, "seed": self.seed}

    def select(self, model: nn.Module) -> dict[str, BackwardSpec]:
        """``{layer name: spec}`` of the layers this config converts in ``model``."""
        cands = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
        if not cands:
            raise ValueError("model has no nn.Linear or nn.Conv2d layer")
        ends = {cands[0][0], cands[-1][0]} if self.keep_first_last else set()
        if self.keep_last:
            ends |= {n for n, _ in cands[-self.keep_last:]}
        for sel, _ in self.rules:
            if isinstance(sel, str) and not any(fnmatch.fnmatchcase(n, sel) for n, _ in cands):
                raise ValueError(f"rule pattern {sel!r} matches no Linear/Conv2d layer; layers: "
                                 f"{[n for n, _ in cands]}")
        out = {}
        for n, m in cands:
            spec = self.default
            for sel, s in self.rules:
                if (fnmatch.fnmatchcase(n, sel) if isinstance(sel, str) else isinstance(m, sel)):
                    spec = s
                    break
            if n in ends or spec is None:
                continue
            out[n] = spec
        return out


_OPERANDS = ("dgrad_grad", "dgrad_weight", "wgrad_grad", "wgrad_input")


def _strict(cls, d, where: str, extra: tuple = ()):
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a table/object, got {type(d).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)] + list(extra)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in {where}; allowed: "
                         f"{', '.join(allowed)}")


def _build(cls, d, where: str, **kw):
    try:
        return cls(**{**d, **kw})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _spec_from_dict(d, where: str) -> BackwardSpec | None:
    if d is None:
        return None
    _strict(BackwardSpec, d, where)
    kw = {}
    for f in _OPERANDS:
        if d.get(f) is not None:
            _strict(OperandSpec, d[f], f"{where}.{f}")
            kw[f] = _build(OperandSpec, d[f], f"{where}.{f}")
    if d.get("rht") is not None:
        _strict(RHTSpec, d["rht"], f"{where}.rht")
        kw["rht"] = _build(RHTSpec, d["rht"], f"{where}.rht")
    return BackwardSpec(**kw)


def backward_config_from_dict(d: dict, where: str = "backward") -> BackwardQuantConfig:
    """Strict construction of a :class:`BackwardQuantConfig` from plain data (what TOML/JSON
    produce, the spelling of ``to_dict``): ``default`` and each rule's spec are tables with the
    four operand tables (``kind``, ``format``, ``rounding``, ``scaling``, ``samples``) and
    ``rht`` (``block``, ``signs``, ``seed``); ``rules`` is a list of ``[pattern, spec or
    null]``. Unknown fields and bad values raise, naming ``where`` and the field."""
    _strict(BackwardQuantConfig, d, where)
    kw = dict(d)
    if "default" in kw:
        kw["default"] = _spec_from_dict(kw["default"], f"{where}.default")
    if "rules" in kw:
        rules = kw["rules"]
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"{where}.rules must be a list of [pattern, spec] pairs")
        out = []
        for i, r in enumerate(rules):
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)):
                raise ValueError(f"{where}.rules[{i}] must be a [pattern, spec or null] pair, "
                                 f"got {r!r}")
            out.append((r[0], _spec_from_dict(r[1], f"{where}.rules[{i}]")))
        kw["rules"] = tuple(out)
    return _build(BackwardQuantConfig, kw, where)


# ---------------------------------------------------------------------------------------------
# the backward products


def quantize_operand(quant, x: torch.Tensor, generator, dims: Sequence[int]) -> torch.Tensor:
    """Apply an operand quantizer whose GEMM reduces ``x`` over ``dims``.

    A per-tensor quantizer (``quant.per_tensor`` True) gets ``x`` as is. Any other quantizer
    (a block format) runs its blocks along ``dims`` flattened into one dimension, as
    block-scaled GEMMs require: an :class:`OperandQuantizer` with 1-D blocks gets ``x`` as it
    is and ``dims`` (``numerics.block`` blocks in place or moves); any other gets ``x`` with
    ``dims`` moved last and flattened and ``dims=(-1,)``, and the result is moved back to x's
    layout (a permuted view).
    """
    gen = generator
    if getattr(quant, "per_tensor", True):
        return quant(x, gen, dims)
    nd = x.dim()
    dims = [d % nd for d in dims]
    if isinstance(quant, OperandQuantizer) and quant.in_place:
        # 1-D blocks: the format's blocks run along the reduction dims where they lie
        # (``OperandQuantizer._along``); ``numerics.block`` reduces one dimension, or a conv
        # operand's batch and pixels whose blocks are runs of x, in place, and moves the
        # others: the same values and random bits as moving them last here
        return quant(x, gen, (-1,) if dims == [nd - 1] else tuple(dims))
    rest = [d for d in range(nd) if d not in dims]
    y = x.permute(*rest, *dims)
    shape = y.shape
    y = y.reshape(*shape[:len(rest)], -1)
    y = quant(y, gen, (-1,))
    y = y.reshape(shape)
    inv = [0] * nd
    for i, d in enumerate(rest + dims):
        inv[d] = i
    return y.permute(*inv)


class _Quantizers:
    """The built quantizers of one layer (built once per spec)."""

    def __init__(self, spec: BackwardSpec):
        self.spec = spec
        self.g1 = spec.dgrad_grad.build()
        self.w = spec.dgrad_weight.build()
        self.g2 = spec.wgrad_grad.build()
        self.x = spec.wgrad_input.build()


def _signs(rspec: RHTSpec, call: int, device, dtype) -> torch.Tensor:
    step = call if rspec.signs == "per_step" else 0
    return _signs_of(rspec.block, rspec.seed, step, torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _signs_of(block: int, seed: int, step: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """``rht_signs`` kept per (block, seed, step, device, dtype): its counter hash runs in
    Python and cost about 0.15 ms per layer call, for a vector that fixed signs repeat every
    call and fresh signs repeat for every layer of a step (the layers' call counters advance
    together). Shared tensors: read only (``rht`` multiplies by them)."""
    return rht_signs(block, seed, step, device=device, dtype=dtype)


def linear_dgrad(g2d, w, qs: _Quantizers, gen):
    """dL/dx = Q_g1(G) @ Q_w(W) for G (M, out), W (out, in); reduction over ``out``."""
    return quantize_operand(qs.g1, g2d, gen, (1,)).mm(quantize_operand(qs.w, w, gen, (0,)))


def linear_wgrad(g2d, x2d, qs: _Quantizers, gen, signs=None):
    """dL/dW = Q_g2(G)^T @ Q_x(X) for G (M, out), X (M, in); reduction over M (rows)."""
    if signs is not None:
        n = signs.numel()
        g2d = rht(pad_to_block(g2d, n, 0), signs, 0)
        x2d = rht(pad_to_block(x2d, n, 0), signs, 0)
    return quantize_operand(qs.g2, g2d, gen, (0,)).t().mm(quantize_operand(qs.x, x2d, gen, (0,)))


def _conv_args(stride, padding, dilation, groups, weight):
    """Normalise F.conv2d's arguments (integer padding; 'valid'/'same' resolved)."""
    pair = torch.nn.modules.utils._pair
    stride, dilation = pair(stride), pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            tot = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            if any(t % 2 for t in tot):
                raise ValueError("padding='same' with an even effective kernel is asymmetric; "
                                 "quantize_backward supports symmetric padding only")
            padding = tuple(t // 2 for t in tot)
        else:
            raise ValueError(f"padding must be 'valid', 'same' or ints, got {padding!r}")
    return stride, pair(padding), dilation, int(groups)


def _shape_only(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The operand convolution_backward does not read (only its shape, layout and dtype), with
    ``like``'s dtype (the gradient's, as torch.nn.grad's): the layer's own ``t`` (its input or
    weight), or an uninitialised tensor of t's layout when the dtypes differ: what autograd's
    own convolution backward is given, so the same kernels and bits (channels-last inputs
    too). ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` pass one element expanded, which
    convolution_backward first copies into a contiguous tensor of the full size (a 6.4 MB
    write per call for a (128, 16, 28, 28) input, measured as aten::contiguous in the
    backward), and whose contiguous layout gave other bits than autograd's for a
    channels-last input under contiguous weights."""
    return t if t.dtype == like.dtype else torch.empty_like(t, dtype=like.dtype)


def _conv_backward(g, x, w, conv, mask, bias_sizes=None):
    """aten's convolution_backward for the outputs ``mask`` selects (input, weight, bias), as
    autograd and ``torch.nn.grad`` call it."""
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(
        g, x, w, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0],
        groups, mask)


def conv_dgrad(g, w, x, conv, qs: _Quantizers, gen):
    """dL/dx = conv2d_input(Q_g1(G), Q_w(W)) (``torch.nn.grad.conv2d_input``'s aten call);
    ``x``: the layer's input (only its shape, layout and dtype are used)."""
    wq = quantize_operand(qs.w, w, gen, (0, 2, 3))
    if wq.stride() != w.stride():
        # the weight's own layout (a copy of a small tensor), whatever layout the quantizer
        # returned: its permuted view of a 1x1 weight (2-D tiles over (C_in, C_out)) has
        # channels-last strides, and convolution_backward then returns a channels-last input
        # gradient, which every element-wise backward after it (ReLU's, the residual sum)
        # reads at 2-3x the cost of a contiguous one
        wq = torch.empty_like(w, dtype=wq.dtype).copy_(wq)
    gq = quantize_operand(qs.g1, g, gen, (1,))
    return _conv_backward(gq, _shape_only(x, gq), wq, conv, [True, False, False])[0]


def conv_wgrad(g, x, w, conv, qs: _Quantizers, gen, signs=None):
    """dL/dW = conv2d_weight(Q_x(X), Q_g2(G)) (``torch.nn.grad.conv2d_weight``'s aten call)
    after the RHT of both along the batch; ``w``: the weight (only its shape, layout and
    dtype)."""
    if signs is not None:
        n = signs.numel()
        g = rht(pad_to_block(g, n, 0), signs, 0)
        x = rht(pad_to_block(x, n, 0), signs, 0)
    xq = quantize_operand(qs.x, x, gen, (0, 2, 3))
    gq = quantize_operand(qs.g2, g, gen, (0, 2, 3))
    return _conv_backward(gq, xq, _shape_only(w, gq), conv, [False, True, False])[1]


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.call = layer.calls
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        qs = layer.quantizers
        gen = layer.handle._gens(grad.device)
        g2d = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = linear_dgrad(g2d, w, qs, gen).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            signs = None
            if qs.spec.rht is not None:
                signs = _signs(qs.spec.rht, ctx.call, grad.device, grad.dtype)
            gw = linear_wgrad(g2d, x.reshape(-1, x.shape[-1]), qs, gen, signs)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2d.sum(0)
        return gx, gw, gb, None


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, conv):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.call = layer.calls
        ctx.conv = conv
        ctx.has_bias = bias is not None
        stride, padding, dilation, groups = conv
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        qs = layer.quantizers
        gen = layer.handle._gens(grad.device)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = conv_dgrad(grad, w, x, ctx.conv, qs, gen)
        if ctx.needs_input_grad[1]:
            signs = None
            if qs.spec.rht is not None:
                signs = _signs(qs.spec.rht, ctx.call, grad.device, grad.dtype)
            gw = conv_wgrad(grad, x, w, ctx.conv, qs, gen, signs)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # aten's own reduction, so that the bias gradient matches autograd bit for bit
            gb = _conv_backward(grad, x, w, ctx.conv, [False, False, True], [w.shape[0]])[2]
        return gx, gw, gb, None, None


def backward_products(kind: str, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      spec: BackwardSpec, generator: torch.Generator | None = None, *,
                      conv: tuple | None = None, call: int = 0):
    """(dgrad, wgrad) of one layer for captured operands, as the backward of a converted layer
    computes them: ``kind`` "linear" (grad (..., out), x (..., in), weight (out, in)) or
    "conv2d" (``conv`` = (stride, padding, dilation, groups) of F.conv2d). For diagnostics."""
    require_choice(kind, "kind", ("linear", "conv2d"))
    qs = _Quantizers(spec)
    signs = _signs(spec.rht, call, grad.device, grad.dtype) if spec.rht else None
    if kind == "linear":
        g2d = grad.reshape(-1, grad.shape[-1])
        dx = linear_dgrad(g2d, weight, qs, generator).reshape(x.shape)
        return dx, linear_wgrad(g2d, x.reshape(-1, x.shape[-1]), qs, generator, signs)
    if conv is None:
        raise ValueError("kind 'conv2d' needs conv=(stride, padding, dilation, groups)")
    conv = _conv_args(*conv, weight)
    return (conv_dgrad(grad, weight, x, conv, qs, generator),
            conv_wgrad(grad, x, weight, conv, qs, generator, signs))


# ---------------------------------------------------------------------------------------------
# model conversion


class _Mode(TorchFunctionMode):
    """Routes the first F.linear / F.conv2d call of the layer's forward through our Function."""

    def __init__(self, layer: _Layer):
        super().__init__()
        self.layer = layer
        self.hit = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.hit and func is F.linear and isinstance(self.layer.module, nn.Linear):
            self.hit = True
            return self.layer.linear(*args, **kwargs)
        if not self.hit and func is F.conv2d and isinstance(self.layer.module, nn.Conv2d):
            self.hit = True
            return self.layer.conv2d(*args, **kwargs)
        return func(*args, **kwargs)


class _Layer:
    def __init__(self, handle: BackwardQuantHandle, name: str, module: nn.Module,
                 spec: BackwardSpec):
        self.handle = handle
        self.name = name
        self.module = module
        self.spec = spec
        self.quantizers = _Quantizers(spec)
        self.calls = 0
        self.mode: _Mode | None = None

    def linear(self, input, weight, bias=None):
        out = _LinearFn.apply(input, weight, bias, self)
        self.calls += 1
        return out

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        conv = _conv_args(stride, padding, dilation, groups, weight)
        out = _Conv2dFn.apply(input, weight, bias, self, conv)
        self.calls += 1
        return out

    def pre_hook(self, module, args):
        if torch.is_grad_enabled() and self.mode is None:
            self.mode = _Mode(self)
            self.mode.__enter__()

    def post_hook(self, module, args, output):
        mode, self.mode = self.mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
            if not mode.hit and output is not None:
                raise RuntimeError(
                    f"quantize_backward: layer {self.name!r} ran without calling F.linear / "
                    "F.conv2d, so its backward was not quantized")


class BackwardQuantHandle:
    """Returned by :func:`quantize_backward`.

    Attributes: ``layers`` ``{name: BackwardSpec}``; ``config``. ``remove()`` restores the model
    exactly (only hooks were added); ``state_dict()`` / ``load_state_dict()`` carry the
    generator states and each layer's call counter (the per-step RHT key).
    """

    def __init__(self, model: nn.Module, config: BackwardQuantConfig):
        self.config = config
        self._gens = DeviceGenerators(config.seed)
        specs = config.select(model)
        mods = dict(model.named_modules())
        self._layers = {n: _Layer(self, n, mods[n], s) for n, s in specs.items()}
        self.layers = dict(specs)
        self._hooks = []
        for layer in self._layers.values():
            self._hooks.append(layer.module.register_forward_pre_hook(layer.pre_hook))
            self._hooks.append(layer.module.register_forward_hook(layer.post_hook,
                                                                  always_call=True))
        for layer in self._layers.values():
            layer.module.__dict__[_MARK] = True  # instance dict: not in state_dict
        self._removed = False

    @property
    def removed(self) -> bool:
        return self._removed

    def state_dict(self) -> dict:
        return {"seed": self.config.seed, "generators": self._gens.state_dict(),
                "calls": {n: layer.calls for n, layer in self._layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        calls = state["calls"]
        if set(calls) != set(self._layers):
            raise KeyError(f"state 'calls' must name the layers {sorted(self._layers)}, got "
                           f"{sorted(calls)}")
        self._gens.load_state_dict(state["generators"])
        for n, c in calls.items():
            self._layers[n].calls = int(c)

    def remove(self) -> None:
        """Remove every hook (a second call is a no-op)."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer in self._layers.values():
            layer.module.__dict__.pop(_MARK, None)
        self._removed = True

    def __enter__(self) -> BackwardQuantHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.layers)} layers"
        return f"BackwardQuantHandle({state})"


def quantize_backward(model: nn.Module, config: BackwardQuantConfig | BackwardSpec
                      ) -> BackwardQuantHandle:
    """Quantize the backward GEMMs of the model's nn.Linear / nn.Conv2d layers per ``config``.

    ``config`` may be a bare :class:`BackwardSpec` (applied to every layer, seed 0). Returns a
    :class:`BackwardQuantHandle`; ``handle.remove()`` restores the model. A layer already
    converted by another live ``quantize_backward`` handle raises ValueError (nothing changed).
    Composes with ``quantize_forward`` and ``compress_gradients`` in any order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(config, BackwardSpec):
        config = BackwardQuantConfig(default=config)
    if not isinstance(config, BackwardQuantConfig):
        raise TypeError(f"config must be a BackwardQuantConfig or a BackwardSpec, got "
                        f"{type(config).__name__}")
    specs = config.select(model)
    mods = dict(model.named_modules())
    for n in specs:
        if _MARK in mods[n].__dict__:
            raise ValueError(f"layer {n!r} is already converted by quantize_backward; remove "
                             "that handle first")
    return BackwardQuantHandle(model, config)
