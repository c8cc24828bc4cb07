"""Forward quantization: PACT activations, SAWB weights, and ``quantize_forward(model, ...)``.

PACT and SAWB (Choi et al., 2018):

* PACT: ``y = clip(x, 0, alpha)`` with a learnable clip ``alpha`` per layer, quantised to k bits,
  ``y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)``; straight-through estimator (STE) for x;
  ``d y_q / d alpha = 1`` where ``x >= alpha``, else 0; alpha carries an L2 regulariser.
* SAWB: weight clip ``alpha* = c1 sqrt(E[w^2]) + c2 E|w|`` with coefficients fitted per bit width,
  falling back to ``max|w|`` when the formula is not positive; symmetric k-bit grid; STE.

Conventions shared by every function here:

* Rounding is ``torch.round``: round half to EVEN (2.5 -> 2, 3.5 -> 4), on the scaled value.
* Grids. Unsigned PACT: ``{j * alpha / (2^k - 1) : j = 0 .. 2^k - 1}`` (2^k levels).
  Signed PACT and SAWB: symmetric, ``n = 2^(k-1) - 1`` levels each side plus 0,
  ``{j * alpha / n : j = -n .. n}`` (2^k - 1 levels; the two's-complement code -2^(k-1) is unused so
  that the grid is symmetric).  Every output equals ``q * (alpha / levels)`` for an integer q.
* Overflow cannot happen: inputs are clipped to the grid's range first (+inf -> alpha,
  -inf -> lower end).  NaN propagates (NaN in, NaN out); its STE gradient passes through.
* Zeros map to exactly 0 (0 is on every grid).

Model conversion keeps every module object, class, name and ``state_dict`` key of the user's
model (so ``compress_gradients``, which selects layers by type and name and hooks their OUTPUT,
composes with it in either order): each converted layer gets

* when its activations are PACT-quantized, a parameter ``pact_alpha`` (0-d) registered on the
  module itself, so an optimizer built after the conversion trains it and
  ``model.state_dict()`` checkpoints it;
* an instance-level ``forward`` that quantizes the input activation (PACT or a block format),
  swaps in the quantized weight (SAWB or a block format) for the duration of the original
  forward (restored in ``finally``), and calls the module's own forward (so subclasses and
  user hooks keep working).

``handle.remove()`` deletes both, restoring the model exactly.

Block formats (``weight_format`` / ``act_format``: a name of ``gradcomp.numerics.block`` such as
"nvfp4", "mxfp4", "nvfp4_2d", or a :class:`BlockFormat`): fake quantization of the forward GEMM
operands, ``quantize_block`` (round to nearest, ties to even; the format's scale rule, its
saturation, zero/NaN/inf handling) with the blocks along the GEMM's reduction dimension, as
block-scaled GEMMs need: a Linear's weight (out, in) and input (..., in) along ``in``; a Conv2d's
weight along the flattened C_in*kh*kw of each output channel and its input along the channels
C_in at each position (the im2col rows of one position; with ``groups > 1`` the input blocks run
across group boundaries). Straight-through estimator: the gradient w.r.t. the full-precision
operand is the gradient w.r.t. the quantized one, unchanged (no clipping mask: saturation only
touches a block's maximum). This is the forward of "FP4 All the Way" (Chmiel et al., 2025: NVFP4,
nearest rounding in the forward) and of NVIDIA's NVFP4 recipe.

``quantize_backward`` (per-GEMM backward quantization) composes on the same layer, in either
order: it intercepts the layer's ``F.linear`` / ``F.conv2d`` call, whose operands are the
forward-quantized input and weight; those are what its backward products save and re-quantize per
its ``BackwardSpec`` (e.g. along the other dimension, with stochastic rounding), and the gradients
it returns for them reach the full-precision weight and input through the STE above.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradcomp.integration.gemm import OperandSpec, quantize_operand
from gradcomp.numerics._checks import require_float_tensor, require_int_range, require_positive
from gradcomp.numerics.block import NAMED_BLOCK_FORMATS, BlockFormat
from gradcomp.numerics.kernels import variant

__all__ = [
    "ALPHA_NAME",
    "PACT",
    "SAWB_COEFFICIENTS",
    "ForwardQuantHandle",
    "LayerQuantSpec",
    "block_quantize_ste",
    "pact_quantize",
    "quantize_forward",
    "sawb_clip",
    "sawb_coefficients",
    "sawb_quantize",
]

MIN_BITS, MAX_BITS = 2, 16

#: Name of the PACT clip parameter registered on each converted module.
ALPHA_NAME = "pact_alpha"

#: SAWB coefficients (c1, c2) per bit width: the values fitted by SAWB's authors for Gaussian-
#: and Laplace-like weight distributions (as published with a public implementation).
SAWB_COEFFICIENTS: dict[int, tuple[float, float]] = {
    2: (3.12, -2.064),
    3: (7.509, -6.892),
    4: (12.68, -12.80),
    5: (17.74, -18.64),
    8: (31.76, -35.04),
}

# Marker attribute (instance __dict__, not in state_dict) that identifies a converted module.
_MARK = "_gradcomp_forward_quant"


def _check_bits(bits, name: str) -> int:
    return require_int_range(bits, name, MIN_BITS, MAX_BITS)


# --------------------------------------------------------------------------------------------
# PACT
# --------------------------------------------------------------------------------------------


def _pact_forward(x, a, lo, up, down, *, signed: bool):
    """PACT's forward on x: (the quantized x, the int8 region code). ``up`` = levels / a and
    ``down`` = a / levels, computed by the caller (0-d, x's dtype)."""
    y = torch.clamp(x, min=lo, max=a)
    out = torch.round(y * up) * down  # half to even
    # One int8 region code instead of x: 1 byte per element saved for backward.
    #   unsigned: inside = [0, alpha), above = [alpha, inf), below = (-inf, 0)  (grad 0)
    #   signed:   inside = (-alpha, alpha), above = [alpha, inf), below = (-inf, -alpha]
    below = (x <= lo) if signed else (x < lo)
    if torch.compiler.is_compiling():
        # selects, cast once: inductor's CPU code for bool -> int8 casts and int8 arithmetic
        # took 15x the time of this form on a 1.6M-element activation (measured); eager, the
        # selects would make int64 temporaries: the same codes either way
        return out, torch.where(x >= a, 1, torch.where(below, -1, 0)).to(torch.int8)
    return out, (x >= a).to(torch.int8) - below.to(torch.int8)


def _pact_backward(grad, region, *, signed: bool):
    """(x's gradient, the masked gradients whose sums give alpha's: where region is 1, and -1
    when ``signed``); the sums are taken outside (``_PACTFn.backward``), over the same tensors
    as the eager path's, so that alpha's gradient has the same bits fused or not. (Signed, the
    three come out together: one more gradient-sized tensor at the peak than a mask at a
    time.)"""
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    # int8 compares took 15x longer in inductor's CPU code (measured); eager keeps int8
    r = region.to(torch.int32) if torch.compiler.is_compiling() else region
    gx = torch.where(r == 0, grad, zero)
    up = torch.where(r == 1, grad, zero)
    if not signed:
        return gx, up
    return gx, up, torch.where(r == -1, grad, zero)


def _pact_op(fn, x: torch.Tensor, signed: bool):
    """(the FusedOp of ``fn`` for this call, its compile argument): float32 / float64 take the
    fused kernel by the compile policy (one pass instead of about nine on the forward, three
    instead of five on the backward; the same float operations, so the same bits); float16 /
    bfloat16 stay eager (inductor's CPU code computes half types in float32, which would round
    differently)."""
    op = variant(fn, "pact", False, (x.dtype, x.device.type), signed=signed)
    return op, (None if x.dtype in (torch.float32, torch.float64) and x.numel() else False)


class _PACTFn(torch.autograd.Function):
    """Forward: clip to [lo, alpha] and round to the k-bit grid. Backward: STE for x inside the
    clip range, and the PACT gradient d y_q / d alpha = 1 on x >= alpha (-1 on x <= -alpha when
    signed)."""

    @staticmethod
    def forward(ctx, x, alpha, levels: int, signed: bool):
        # A step that drives alpha to <= 0 must not divide by zero: floor it at the smallest
        # normal of x's dtype (a tensor op: no host sync in the hot path).
        a = alpha.detach().to(x.device, x.dtype).clamp_min(torch.finfo(x.dtype).tiny)
        lo = -a if signed else torch.zeros_like(a)
        op, compile = _pact_op(_pact_forward, x, signed)
        out, region = op(x.detach(), a, lo, levels / a, a / levels, compile=compile)
        ctx.save_for_backward(region)
        ctx.signed = signed
        ctx.alpha_dtype = alpha.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (region,) = ctx.saved_tensors
        op, compile = _pact_op(_pact_backward, grad, ctx.signed)
        gx, *masked = op(grad, region, compile=compile)
        # Accumulate alpha's gradient in at least float32 (a sum over the whole activation).
        acc = torch.promote_types(grad.dtype, torch.float32)
        ga = masked[0].sum(dtype=acc)
        if ctx.signed:
            ga = ga - masked[1].sum(dtype=acc)
        return gx, ga.to(ctx.alpha_dtype), None, None


def pact_quantize(
    x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool = False
) -> torch.Tensor:
    """PACT-quantize ``x`` with clip ``alpha`` to ``bits`` bits (PACT).

    Unsigned: ``y = clip(x, 0, alpha)``, ``y_q = round(y (2^k-1)/alpha) * alpha/(2^k-1)``.
    Signed: ``y = clip(x, -alpha, alpha)``, ``y_q = round(y n/alpha) * alpha/n``, n = 2^(k-1)-1.
    Rounding is ``torch.round``, half to even.  Output dtype is x's; alpha (a 0-d tensor, any
    float dtype) is cast to it and floored at the dtype's smallest normal, so an alpha trained to
    <= 0 cannot divide by zero (validate alpha > 0 at construction, as ``PACT`` does).

    Gradients: d y_q/dx = 1 on [0, alpha) (signed: (-alpha, alpha)), else 0 (straight-through
    estimator over the rounding); d y_q/d alpha = 1 where x >= alpha, else 0 (signed: also -1
    where x <= -alpha).  +inf clips to alpha, -inf to the lower end; NaN stays NaN (its gradient
    passes as if inside).  Bits outside [2, 16] raise.
    """
    require_float_tensor(x, "x")
    require_float_tensor(alpha, "alpha")
    if alpha.numel() != 1:
        raise ValueError(f"alpha must be a single-element tensor, got shape {tuple(alpha.shape)}")
    bits = _check_bits(bits, "bits")
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return _PACTFn.apply(x, alpha.reshape(()), levels, bool(signed))


class PACT(nn.Module):
    """PACT activation quantizer as a module, with its own learnable clip ``alpha`` (0-d).

    ``PACT(bits, alpha_init=4.0, signed=False)``; ``forward(x) = pact_quantize(x, alpha, ...)``.
    Use it in place of a ReLU (unsigned) or before a layer whose input can be negative
    (signed).  ``alpha_init <= 0`` and bits outside [2, 16] raise.
    """

    def __init__(self, bits: int, alpha_init: float = 4.0, signed: bool = False):
        super().__init__()
        self.bits = _check_bits(bits, "bits")
        self.signed = bool(signed)
        self.alpha = nn.Parameter(torch.tensor(require_positive(alpha_init, "alpha_init")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pact_quantize(x, self.alpha, self.bits, self.signed)

    def regularization(self, decay: float) -> torch.Tensor:
        """The L2 term ``decay / 2 * alpha^2`` to add to the loss (gradient ``decay * alpha``,
        the same convention as SGD's ``weight_decay``)."""
        return 0.5 * float(decay) * self.alpha.square()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


# --------------------------------------------------------------------------------------------
# SAWB
# --------------------------------------------------------------------------------------------


def sawb_coefficients(bits: int) -> tuple[float, float] | None:
    """SAWB's (c1, c2) for ``bits``, or None where SAWB clips at ``max|w|``.

    Bits 2/3/4/5/8: SAWB's published fitted values.  Bits 6 and 7 (no published fit):
    linear interpolation of c1 and c2 between the 5- and 8-bit values (our choice; it gives a
    clip between theirs, about 3.2 and 3.5 sigma for Gaussian weights).  Bits 9..16: None, i.e.
    clip at max|w|: no fit exists, and at that resolution rounding error, not clipping error, is
    the one worth avoiding.  Bits outside [2, 16] raise.
    """
    bits = _check_bits(bits, "bits")
    if bits in SAWB_COEFFICIENTS:
        return SAWB_COEFFICIENTS[bits]
    if bits < 8:
        t = (bits - 5) / 3
        (a1, a2), (b1, b2) = SAWB_COEFFICIENTS[5], SAWB_COEFFICIENTS[8]
        return (a1 + t * (b1 - a1), a2 + t * (b2 - a2))
    return None


def sawb_clip(w: torch.Tensor, bits: int) -> torch.Tensor:
    """SAWB clip ``alpha* = c1 sqrt(E[w^2]) + c2 E|w|`` of a whole weight tensor (0-d, detached).

    Moments are taken over every element, in float32 (float64 if w is float64), on w's device,
    with no host sync.  Where the formula is not > 0 (possible for bits 4, 5, 8 when |w| is
    nearly constant) or there are no coefficients (see ``sawb_coefficients``), the clip is
    ``max|w|``.  An all-zero w gives 0; NaN anywhere gives NaN (inf gives inf or NaN).
    """
    require_float_tensor(w, "w")
    if w.numel() == 0:
        raise ValueError("w must have at least one element, got an empty tensor")
    coef = sawb_coefficients(bits)
    wf = w.detach().to(torch.promote_types(w.dtype, torch.float32))
    amax = wf.abs().amax()
    if coef is None:
        return amax
    c1, c2 = coef
    alpha = c1 * wf.square().mean().sqrt() + c2 * wf.abs().mean()
    return torch.where(alpha > 0, alpha, amax)


class _SymmetricQuantSTE(torch.autograd.Function):
    """Forward: clip to [-alpha, alpha], round to the symmetric grid. Backward: identity (STE)."""

    @staticmethod
    def forward(ctx, w, alpha, n: int):
        # All-zero weights give alpha = 0: any positive stand-in keeps 0 -> 0 without 0/0
        # (a NaN alpha stays NaN, so NaN weights poison the output rather than hide).
        a = torch.where(alpha == 0, torch.ones_like(alpha), alpha).to(w.dtype)
        q = torch.round(torch.clamp(w, min=-a, max=a) * (n / a))  # half to even
        return q * (a / n)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def sawb_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """SAWB-quantize a weight tensor: clip at ``sawb_clip(w, bits)`` and round half to even onto
    the symmetric grid ``{j alpha / n : |j| <= n}``, n = 2^(k-1) - 1 (so 2 bits is ternary).

    Straight-through estimator: the gradient w.r.t. w is passed unchanged to every element
    (clipped ones included, so a clipped weight can still move back); alpha is a statistic of
    w and gets no gradient.  Output dtype is w's; all-zero w gives zeros; NaN or inf in w makes
    the clip, hence every output, NaN.  Bits outside [2, 16] raise.
    """
    alpha = sawb_clip(w, bits)
    return _SymmetricQuantSTE.apply(w, alpha, 2 ** (bits - 1) - 1)


# --------------------------------------------------------------------------------------------
# Block formats (NVFP4, MXFP4, ...)
# --------------------------------------------------------------------------------------------


def _check_block_format(fmt, name: str) -> BlockFormat:
    """A BlockFormat from a name or a BlockFormat; errors name the argument and the choices."""
    if isinstance(fmt, str):
        try:
            fmt = BlockFormat.from_name(fmt)
        except ValueError:
            raise ValueError(
                f"{name} must be a block format name ({', '.join(NAMED_BLOCK_FORMATS)}, or "
                f"'elem:block:scale:rule[:ts]' such as 'e2m1fn:32:e8m0:rceil') or a BlockFormat; "
                f"got {fmt!r}") from None
    elif not isinstance(fmt, BlockFormat):
        raise TypeError(f"{name} must be a block format name or a BlockFormat, got "
                        f"{type(fmt).__name__} {fmt!r}")
    if fmt.dims != ((-1,) if len(fmt.block) == 1 else (-2, -1)):
        raise ValueError(f"{name}: the blocks run along the GEMM's reduction dimension, so the "
                         f"format's dims must be the default; got {fmt.dims} in {fmt.name}")
    return fmt


class _BlockSTE(torch.autograd.Function):
    """Forward: quantize_block along the reduction dims (nearest). Backward: identity (STE)."""

    @staticmethod
    def forward(ctx, x, quant, dims):
        y = quantize_operand(quant, x.detach(), None, dims)
        if y is not x and y.stride() == x.stride():  # blocked in place: x's own layout
            return y
        # x's memory layout (the reduction dims were moved last and back: a permuted view)
        return torch.empty_like(x).copy_(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


@functools.lru_cache(maxsize=64)
def _block_quantizer(fmt: BlockFormat):
    return OperandSpec("block", fmt, "nearest").build()


def block_quantize_ste(x: torch.Tensor, fmt: BlockFormat | str,
                       dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Fake-quantize a forward GEMM operand to the block format ``fmt`` (nearest rounding).

    ``dims`` are the dimensions the GEMM reduces ``x`` over; they are moved last and flattened
    into one, so that the blocks run along them (``(-1,)``: a Linear's input or weight;
    ``(1, 2, 3)``: a Conv2d weight, its C_in*kh*kw; ``(1,)``: a Conv2d input, its channels). A
    2-D format (e.g. "nvfp4_2d") tiles (the other dims flattened) x (the reduction). Values:
    ``quantize_block(..., rounding="nearest")`` exactly (ties to even; see
    ``gradcomp.numerics.block`` for scales, saturation, zeros, NaN and inf). Gradient: the
    straight-through estimator (d out / d x = identity). The result has x's shape, dtype and
    memory layout.
    """
    require_float_tensor(x, "x")
    fmt = _check_block_format(fmt, "fmt")
    if isinstance(dims, int) or not all(isinstance(d, int) and not isinstance(d, bool)
                                        for d in dims) or not dims:
        raise TypeError(f"dims must be a non-empty tuple of ints, got {dims!r}")
    nd = max(x.dim(), 1)
    if any(not -nd <= d < nd for d in dims) or len({d % nd for d in dims}) != len(dims):
        raise ValueError(f"dims must be distinct dimensions of x (shape {tuple(x.shape)}), "
                         f"got {dims!r}")
    if x.dim() == 0:
        x1 = _BlockSTE.apply(x.reshape(1), _block_quantizer(fmt), (0,))
        return x1.reshape(())
    return _BlockSTE.apply(x, _block_quantizer(fmt), tuple(dims))


# reduction dims of each operand of the forward GEMM, by layer type: (input, weight)
_FORWARD_DIMS = {nn.Linear: ((-1,), (1,)), nn.Conv2d: ((1,), (1, 2, 3))}


def _reduction_dims(module: nn.Module) -> tuple[tuple, tuple]:
    for cls, dims in _FORWARD_DIMS.items():
        if isinstance(module, cls):
            return dims
    raise TypeError(f"block-format forward quantization supports nn.Linear and nn.Conv2d, got "
                    f"{type(module).__name__}")


# --------------------------------------------------------------------------------------------
# Model conversion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerQuantSpec:
    """How one converted layer is quantized: INT bits (SAWB weights, PACT inputs) or a block
    format per operand; None for both = that operand stays full precision. ``signed``: the PACT
    variant (meaningful only with ``act_bits``)."""

    weight_bits: int | None
    act_bits: int | None
    signed: bool
    weight_format: BlockFormat | None = None
    act_format: BlockFormat | None = None


def _fq_forward(self: nn.Module, *args, **kwargs):
    """Instance-level forward installed by quantize_forward (bound to the module)."""
    spec: LayerQuantSpec
    spec, original, _ = getattr(self, _MARK)
    if spec.act_bits is not None or spec.act_format is not None:
        if spec.act_bits is not None:
            alpha = self._parameters[ALPHA_NAME]

            def quant(x):
                return pact_quantize(x, alpha, spec.act_bits, spec.signed)
        else:
            dims = _reduction_dims(self)[0]

            def quant(x):
                return block_quantize_ste(x, spec.act_format, dims)
        if args:
            args = (quant(args[0]), *args[1:])
        elif "input" in kwargs:  # Conv2d/Linear name their argument ``input``
            kwargs = {**kwargs, "input": quant(kwargs["input"])}
        else:
            raise TypeError(f"{type(self).__name__} called without an input to quantize")
    if spec.weight_bits is None and spec.weight_format is None:
        return original(*args, **kwargs)
    weight = self._parameters["weight"]
    # The module's own forward reads self.weight through Module.__getattr__ -> _parameters:
    # swapping the entry for the forward's duration keeps class, names and state_dict keys.
    if spec.weight_bits is not None:
        self._parameters["weight"] = sawb_quantize(weight, spec.weight_bits)
    else:
        self._parameters["weight"] = block_quantize_ste(weight, spec.weight_format,
                                                        _reduction_dims(self)[1])
    try:
        return original(*args, **kwargs)
    finally:
        self._parameters["weight"] = weight


class ForwardQuantHandle:
    """Returned by ``quantize_forward``; undoes it and manages the PACT clips.

    Attributes:
        layers: ``{qualified module name: LayerQuantSpec}`` of every converted layer.
        alpha_decay: default L2 coefficient of ``alpha_regularization``.
    """

    def __init__(self, model: nn.Module, modules: dict, specs: dict, alpha_decay: float):
        self._model = model
        self._modules = modules  # name -> module
        self._prior_forward = {
            id(m): m.__dict__[_MARK][1] for m in modules.values() if m.__dict__[_MARK][2]
        }
        self.layers: dict[str, LayerQuantSpec] = specs
        self.alpha_decay = alpha_decay
        self._removed = False

    @property
    def removed(self) -> bool:
        return self._removed

    def alpha_parameters(self) -> dict[str, nn.Parameter]:
        """``{layer name: its pact_alpha Parameter}`` for layers with quantized activations
        (e.g. to give them their own optimizer group)."""
        self._check_live()
        return {
            n: m._parameters[ALPHA_NAME]
            for n, m in self._modules.items()
            if self.layers[n].act_bits is not None
        }

    def alpha_regularization(self, decay: float | None = None) -> torch.Tensor:
        """PACT's L2 term ``decay / 2 * sum_l alpha_l^2`` (0-d tensor) to add to the loss.

        ``decay`` defaults to the conversion's ``alpha_decay``; its gradient is ``decay * alpha``
        per layer, SGD's ``weight_decay`` convention.  With no PACT layer it is a 0 tensor.
        """
        decay = self.alpha_decay if decay is None else decay
        if not math.isfinite(float(decay)) or float(decay) < 0:
            raise ValueError(f"decay must be a finite number >= 0, got {decay!r}")
        alphas = list(self.alpha_parameters().values())
        if not alphas:
            return torch.zeros(())
        return 0.5 * float(decay) * torch.stack([a.square() for a in alphas]).sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{layer name: alpha}`` (detached copies) for checkpoints."""
        return {n: a.detach().clone() for n, a in self.alpha_parameters().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy alphas saved by ``state_dict`` into the layers (in place, same Parameter objects,
        so an optimizer keeps them).  Keys must match exactly; every alpha must be > 0."""
        params = self.alpha_parameters()
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise KeyError(
                f"state keys must be the PACT layers {sorted(params)}; "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for n, v in state.items():
            v = torch.as_tensor(v)
            if v.numel() != 1:
                raise ValueError(f"alpha of layer {n!r} must have one element, got {v.shape}")
            require_positive(float(v), f"alpha of layer {n!r}")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(torch.as_tensor(v).reshape(()))

    def remove(self) -> None:
        """Restore the model exactly (same modules, state_dict without ``pact_alpha``, original
        forward).  A second call is a no-op."""
        if self._removed:
            return
        for module in self._modules.values():
            del module.__dict__["forward"]
            prior = self._prior_forward.get(id(module))
            if prior is not None:  # a forward the user had set on the instance before us
                module.__dict__["forward"] = prior
            del module.__dict__[_MARK]
            if ALPHA_NAME in module._parameters:
                del module._parameters[ALPHA_NAME]
        self._removed = True

    def __enter__(self) -> ForwardQuantHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this quantize_forward handle was removed")

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.layers)} layers"
        return f"ForwardQuantHandle({state})"


_RELUS = (nn.ReLU, nn.ReLU6)
_LAYER_TYPES = (nn.Conv2d, nn.Linear)


def quantize_forward(
    model: nn.Module,
    weight_bits: int | None = 4,
    act_bits: int | None = 4,
    first_last_bits: int | None = 8,
    layers: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    *,
    signed: Mapping[str, bool] | None = None,
    alpha_init: float = 4.0,
    alpha_decay: float = 1e-4,
    weight_format: BlockFormat | str | None = None,
    act_format: BlockFormat | str | None = None,
) -> ForwardQuantHandle:
    """Quantize the forward pass of every nn.Conv2d / nn.Linear: SAWB weights, PACT inputs, or
    block formats (NVFP4, MXFP4, ...).

    Args:
        model: the model; modified in place (see the module docstring for how).
        weight_bits: SAWB bits of the weights (None: full precision or ``weight_format``).
        act_bits: PACT bits of each layer's input activation (None: full precision or
            ``act_format``).
        first_last_bits: INT bits (SAWB weights and PACT activations) of the first and the last
            Conv2d/Linear of ``model.named_modules()`` order, whether or not ``layers`` selects
            them; None leaves those two layers unconverted (full precision), as is usual.
            The block formats below never apply to these two layers.
        layers: which layers to convert: None (all Conv2d/Linear), qualified names (each must be
            a Conv2d/Linear of the model), or ``f(name, module) -> bool``.
        signed: per-layer override ``{name: bool}`` of the PACT variant.  Default rule: unsigned
            PACT (``clip(x, 0, alpha)``, 2^k levels) iff the module registered just before the
            layer is an nn.ReLU / nn.ReLU6 and the layer is not the first one; everything else
            gets signed PACT (``clip(x, -alpha, alpha)``), which is always safe: an unsigned
            quantizer would zero every negative input.  A functional ``F.relu`` is invisible to
            the rule: override such layers to False to gain the bit.
        alpha_init: initial clip of every PACT alpha (> 0).  4.0: above the ~2.5-sigma clip that
            minimises 4-bit error for unit-variance (post-BatchNorm) inputs, with headroom;
            PACT's gradient raises alpha where it clips, its L2 term lowers it.
        alpha_decay: default coefficient of ``handle.alpha_regularization()`` (>= 0).  The term
            is NOT added for you: add it to the loss, or set ``alpha_decay=0`` and put
            ``handle.alpha_parameters()`` in an optimizer group with ``weight_decay``.
        weight_format: block format of the weights of the selected layers (a name of
            ``gradcomp.numerics.block.NAMED_BLOCK_FORMATS``, a generic
            ``elem:block:scale:rule[:ts]`` name, or a BlockFormat with the default dims):
            round to nearest, blocks along the reduction dimension, STE gradient (module
            docstring). Excludes ``weight_bits``: pass ``weight_bits=None`` with it.
        act_format: the same for each selected layer's input activation; excludes ``act_bits``
            (pass ``act_bits=None``). No PACT clip is registered for such a layer.

    Returns: a ``ForwardQuantHandle``; ``handle.remove()`` restores the model exactly.

    Raises: TypeError/ValueError for bad arguments (bits outside [2, 16], alpha_init <= 0,
    unknown layer names or override keys, unknown block format names, bits and format given for
    the same operand); ValueError naming the layer if it is already
    converted.  Nothing is modified when an error is raised.  Layers whose forward is bypassed
    by their parent (e.g. nn.MultiheadAttention.out_proj) are not quantized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for value, name in (
        (weight_bits, "weight_bits"),
        (act_bits, "act_bits"),
        (first_last_bits, "first_last_bits"),
    ):
        if value is not None:
            _check_bits(value, name)
    if weight_format is not None:
        weight_format = _check_block_format(weight_format, "weight_format")
        if weight_bits is not None:
            raise ValueError(f"weight_bits and weight_format exclude each other (got "
                             f"{weight_bits!r} and {weight_format.name!r}): pass "
                             "weight_bits=None with a block format")
    if act_format is not None:
        act_format = _check_block_format(act_format, "act_format")
        if act_bits is not None:
            raise ValueError(f"act_bits and act_format exclude each other (got {act_bits!r} "
                             f"and {act_format.name!r}): pass act_bits=None with a block format")
    alpha_init = require_positive(alpha_init, "alpha_init")
    if not math.isfinite(float(alpha_decay)) or float(alpha_decay) < 0:
        raise ValueError(f"alpha_decay must be a finite number >= 0, got {alpha_decay!r}")

    named = list(model.named_modules())
    candidates = [(n, m) for n, m in named if isinstance(m, _LAYER_TYPES)]
    if not candidates:
        raise ValueError("model has no nn.Conv2d or nn.Linear layer to quantize")
    by_name = dict(candidates)
    for n, m in candidates:
        if _MARK in m.__dict__:
            raise ValueError(
                f"layer {n!r} is already converted by quantize_forward; call handle.remove() first"
            )
    if layers is None:
        selected = set(by_name)
    elif callable(layers):
        selected = {n for n, m in candidates if layers(n, m)}
    elif isinstance(layers, str):
        raise TypeError("layers must be None, an iterable of layer names or a callable, got a str")
    else:
        selected = set(layers)
        unknown = sorted(selected - set(by_name))
        if unknown:
            raise ValueError(
                f"layers must name nn.Conv2d/nn.Linear modules of the model; unknown {unknown}; "
                f"allowed: {sorted(by_name)}"
            )

    first, last = candidates[0][0], candidates[-1][0]
    previous = {}  # layer name -> the module registered just before it
    for (_, prev), (n, _) in zip(named, named[1:]):
        previous[n] = prev

    specs: dict[str, LayerQuantSpec] = {}
    for n, m in candidates:
        wf = af = None
        if n in (first, last):
            if first_last_bits is None:
                continue
            wb = ab = first_last_bits
        elif n in selected:
            wb, ab, wf, af = weight_bits, act_bits, weight_format, act_format
        else:
            continue
        if wb is None and ab is None and wf is None and af is None:
            continue
        if ab is not None and (ALPHA_NAME in m._parameters or hasattr(m, ALPHA_NAME)):
            raise ValueError(f"layer {n!r} already has an attribute {ALPHA_NAME!r}")
        unsigned = n != first and isinstance(previous.get(n), _RELUS)
        specs[n] = LayerQuantSpec(wb, ab, not unsigned, wf, af)

    for n, s in (signed or {}).items():
        if n not in specs or specs[n].act_bits is None:
            raise ValueError(
                f"signed must map converted layers with quantized activations to bool; {n!r} is "
                f"not one; allowed: {sorted(k for k, v in specs.items() if v.act_bits)}"
            )
        specs[n] = dataclasses.replace(specs[n], signed=bool(s))

    modules = {}
    for n, spec in specs.items():
        m = by_name[n]
        if spec.act_bits is not None:
            w = m.weight
            dtype = w.dtype if w.is_floating_point() else torch.get_default_dtype()
            m.register_parameter(
                ALPHA_NAME, nn.Parameter(torch.tensor(alpha_init, dtype=dtype, device=w.device))
            )
        original = m.forward
        m.__dict__[_MARK] = (spec, original, "forward" in m.__dict__)
        m.__dict__["forward"] = _fq_forward.__get__(m)
        modules[n] = m
    return ForwardQuantHandle(model, modules, specs, float(alpha_decay))
