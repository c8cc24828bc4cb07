"""Named training recipes: frozen dataclasses, loadable from TOML or JSON.

A recipe says what happens to the neural gradients (``compression``: FP or block-format
quantization and/or stochastic pruning, see :class:`gradcomp.config.CompressionConfig`), for
fully quantized training to the forward pass (``forward``: PACT activations and SAWB weights, or
block formats such as NVFP4/MXFP4), and
per backward GEMM (``backward``: a :class:`gradcomp.integration.gemm.BackwardQuantConfig`, each
operand of dgrad and wgrad quantized on its own, optional RHT on wgrad). ``get_recipe(name)``
returns a built-in; ``load_recipe(path)`` reads a file; unknown fields, wrong-typed or bad values
raise an error naming the file, the field and what it accepts.

Layer selection: every recipe compresses the conv outputs of a model with convs (as the
authors' code) and, on a model without convs, its hidden linear layers; never the classifier
(``CompressionConfig(types="auto")``).

Built-in names (``list_recipes()`` prints them all):

* ``baseline``: full precision.
* ``fp{N}`` (N = 4..8): N-bit FP neural gradients at the analytically optimal split E* for the
  measured sigma (paper Table 2), per-layer scaling; ``fp{N}-e+1``, ``fp{N}-e-1``, ``fp{N}-e-2``:
  the same with one more / one or two fewer exponent bits (Table 3).
* ``fp{N}-static``, ``fp{N}-dynamic``: one global loss scale, static or dynamic, instead of
  per-layer scaling (Table 4); ``fp{N}-optscale``: per-layer analytically optimal scale;
  ``fp{N}-emp``: split and per-layer scales chosen on the refresh sample (no distribution
  model).
* ``prune-{S}``: homogeneous stochastic pruning at sparsity S with the lognormal threshold
  (Eq. 8); ``prune-{S}-het``: heterogeneous allocation at the same overall S (``-het-emp``:
  each layer's allocated sparsity met by the empirical threshold); ``prune-{S}-emp``
  / ``-cal``: distribution-free empirical / calibrated thresholds; ``atp-{S}``: the ATP baseline
  (normal assumption); ``topk-{S}``: deterministic top-k (meProp/SAW); ``topks-{S}``: top-k
  threshold then the stochastic operator; ``prune-{S}-fp{N}``: pruning then N-bit FP.
* ``w4a4``: INT4 SAWB weights and INT4 PACT activations; ``w4a4-fp{N}``: plus N-bit FP neural
  gradients at E* with per-layer scaling.
* Block formats on the neural gradients (one scale per block, stochastic rounding of the
  elements as the FP4/FP8 training papers and TransformerEngine use it on gradients):
  ``mxfp8`` (MXFP8 E4M3), ``mxfp8-e5m2``, ``mxfp6`` (MXFP6 E3M2), ``mxfp4``, ``nvfp4``; each with
  a ``-rn`` variant (round to nearest even).
* Per-GEMM backward quantization (``backward``): ``luq-fp4`` (``luq-fp4-smp``: two samples;
  INT4 forward), ``nvfp4-recipe``, ``quartet-mxfp4``, ``fp4-all-the-way`` (block-format FP4
  forward GEMMs too); each description says which paper, which setting and what is left out.
S in {0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95}.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from gradcomp.config import CompressionConfig, PruneSpec, QuantizeSpec
from gradcomp.integration.gemm import (
    BackwardQuantConfig,
    BackwardSpec,
    OperandSpec,
    RHTSpec,
    backward_config_from_dict,
)
from gradcomp.numerics.block import BlockFormat

__all__ = ["Recipe", "ForwardSpec", "get_recipe", "list_recipes", "load_recipe", "recipe_from_dict"]

SPARSITIES = ("0.5", "0.6", "0.7", "0.8", "0.85", "0.9", "0.95")


@dataclass(frozen=True)
class ForwardSpec:
    """Forward quantization (``quantize_forward``): SAWB weights, PACT activations, k bits each
    (None: full precision; ``first_last_bits`` for the first and last layer), or a block format
    per operand (``weight_format`` / ``act_format``: a block format name such as "nvfp4" or
    "mxfp4", round to nearest, blocks along the reduction dimension; the matching ``*_bits``
    must then be null)."""

    weight_bits: int | None = 4
    act_bits: int | None = 4
    first_last_bits: int | None = 8
    weight_format: str | None = None
    act_format: str | None = None

    def __post_init__(self):
        for f in ("weight_bits", "act_bits", "first_last_bits"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"forward.{f} must be an int or null, got "
                                f"{type(v).__name__} {v!r}")
        for f, bits in (("weight_format", "weight_bits"), ("act_format", "act_bits")):
            v = getattr(self, f)
            if v is None:
                continue
            if not isinstance(v, str):
                raise TypeError(f"forward.{f} must be a block format name or null, got "
                                f"{type(v).__name__} {v!r}")
            try:
                BlockFormat.from_name(v)
            except ValueError as exc:
                raise ValueError(f"forward.{f}: {exc}") from None
            if getattr(self, bits) is not None:
                raise ValueError(f"forward.{bits} and forward.{f} exclude each other (got "
                                 f"{getattr(self, bits)!r} and {v!r}): set {bits} to null")

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recipe:
    """A named training recipe. ``backward``: per-GEMM backward quantization (a
    ``BackwardQuantConfig`` or its plain-data dict, converted at construction), applied by
    ``train`` with ``quantize_backward``; composes with ``forward`` and ``compression``."""

    name: str
    description: str = ""
    compression: CompressionConfig | None = None
    forward: ForwardSpec | None = None
    backward: BackwardQuantConfig | None = None

    def __post_init__(self):
        b = self.backward
        if isinstance(b, dict):
            object.__setattr__(self, "backward", backward_config_from_dict(b))
        elif b is not None and not isinstance(b, BackwardQuantConfig):
            raise TypeError(f"backward must be a BackwardQuantConfig, its dict form or None, "
                            f"got {type(b).__name__}")

    def to_dict(self) -> dict:
        """Plain data, the recipe-file spelling: ``recipe_from_dict`` rebuilds an equal recipe."""
        return {"name": self.name, "description": self.description,
                "compression": None if self.compression is None else self.compression.to_dict(),
                "forward": None if self.forward is None else self.forward.kwargs(),
                "backward": None if self.backward is None else self.backward.to_dict()}


# the keyword-only shorthands of QuantizeSpec (InitVars: not dataclass fields)
_EXTRA_FIELDS = {QuantizeSpec: ("bits", "exp_offset", "select", "semantics", "scaling_options")}


def _check_fields(cls, d: dict, where: str) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)] + list(_EXTRA_FIELDS.get(cls, ()))
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)} in {where}; allowed: {', '.join(allowed)}"
        )


def _build(cls, d, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a table/object, got {type(d).__name__}")
    _check_fields(cls, d, where)
    kw = {k: tuple(v) if isinstance(v, list) else v  # arrays -> tuples of the frozen fields
          for k, v in d.items()}
    if cls is QuantizeSpec and isinstance(kw.get("scaling"), dict):
        # scaling = {policy = "amax", margin = 1.0}: the mode's fields inline
        sc = dict(kw["scaling"])
        if "policy" not in sc:
            raise ValueError(f"{where}.scaling as a table needs a 'policy' entry")
        kw["scaling"] = sc.pop("policy")
        if sc and kw.get("scaling_options"):
            raise ValueError(f"{where}: give the scaling options in scaling or in "
                             "scaling_options, not both")
        kw["scaling_options"] = sc or kw.get("scaling_options")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        prefix = where.split(".")[-1] + "."
        if not msg.startswith((where, prefix)):
            msg = f"{where}: {msg}"
        raise type(exc)(msg) from None


def recipe_from_dict(d: dict) -> Recipe:
    """Strict construction from plain data (what TOML/JSON produce)."""
    if not isinstance(d, dict):
        raise ValueError(f"a recipe must be a table/object, got {type(d).__name__}")
    _check_fields(Recipe, d, "recipe")
    for key in ("name", "description"):
        if key in d and not isinstance(d[key], str):
            raise TypeError(f"recipe.{key} must be a string, got {type(d[key]).__name__}")
    comp = d.get("compression")
    if comp is not None:
        if not isinstance(comp, dict):
            raise ValueError("compression must be a table/object")
        comp = dict(comp)
        comp["quantize"] = _build(QuantizeSpec, comp.get("quantize"), "compression.quantize")
        comp["prune"] = _build(PruneSpec, comp.get("prune"), "compression.prune")
        comp = _build(CompressionConfig, comp, "compression")
    back = d.get("backward")
    if back is not None:
        if not isinstance(back, dict):
            raise ValueError("backward must be a table/object")
        back = backward_config_from_dict(back, "backward")
    return Recipe(
        name=d.get("name", "custom"), description=d.get("description", ""),
        compression=comp, forward=_build(ForwardSpec, d.get("forward"), "forward"),
        backward=back,
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a ``.toml`` or ``.json`` file (same fields as ``Recipe.to_dict()``)."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"recipe file {str(path)!r}: unsupported extension "
                         f"{path.suffix or '(none)'!r}; recipe files are .toml or .json")
    if not path.exists():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"recipe file {path}: malformed TOML: {exc}") from None
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"recipe file {path}: malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {path}: expected a table/object at the top level")
    data.setdefault("name", path.stem)
    try:
        return recipe_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"recipe file {path}: {exc}") from None


def _fp(bits: int, offset: int = 0, scaling: str = "amax", **kw) -> QuantizeSpec:
    return QuantizeSpec(format="optimal", bits=bits, exp_offset=offset, scaling=scaling, **kw)


def _comp(**kw) -> CompressionConfig:
    """The recipes' layer selection and schedule (the ``CompressionConfig`` defaults).

    ``types="auto"``: conv outputs when the model has convs, as in the authors' code, else the
    hidden linear layers; never the classifier, whose neural gradient (softmax - onehot)
    diverged in FP4 in our runs (README, "Choices measured"). Statistics are refreshed at each
    epoch start and every 100 steps, so scales and thresholds follow the gradients within an
    epoch.
    """
    return CompressionConfig(types="auto", refresh_every=100, **kw)


def _builtins() -> dict[str, Recipe]:
    r: dict[str, Recipe] = {"baseline": Recipe("baseline", "full precision")}

    def add(name, desc, **kw):
        r[name] = Recipe(name, desc, **kw)

    for n in range(4, 9):
        add(f"fp{n}", f"FP{n} neural gradients at E*, per-layer scaling (amax)",
            compression=_comp(quantize=_fp(n)))
        for off, tag in ((1, "e+1"), (-1, "e-1"), (-2, "e-2")):
            add(f"fp{n}-{tag}", f"FP{n} at E*{off:+d} exponent bits, per-layer scaling",
                compression=_comp(quantize=_fp(n, off)))
        add(f"fp{n}-static", f"FP{n} at E*, one static global loss scale (Table 4 baseline)",
            compression=_comp(quantize=_fp(n, scaling="static")))
        add(f"fp{n}-dynamic", f"FP{n} at E*, dynamic global loss scaling (Table 4 baseline)",
            compression=_comp(quantize=_fp(n, scaling="dynamic")))
        add(f"fp{n}-optscale", f"FP{n} at E*, per-layer scale minimising the expected relative "
            "error", compression=_comp(quantize=_fp(n, scaling="per_layer_optimal")))
        add(f"fp{n}-authors", f"FP{n} at E*, the authors' per-layer rule s = 2^(-mean log2|g| - 3)",
            compression=_comp(quantize=_fp(n, scaling="per_layer")))
        add(f"fp{n}-emp", f"FP{n} at the E* measured on the refresh sample, per-layer scale "
            "measured there too (distribution free)",
            compression=_comp(quantize=_fp(n, scaling="per_layer_empirical",
                                                       select="empirical")))
    for s in SPARSITIES:
        sp = float(s)
        add(f"prune-{s}", f"stochastic pruning {s}, lognormal threshold (Eq. 8), homogeneous",
            compression=_comp(prune=PruneSpec(sp, "lognormal")))
        add(f"prune-{s}-het", f"stochastic pruning {s} overall, heterogeneous allocation",
            compression=_comp(prune=PruneSpec(sp, "lognormal", heterogeneous=True)))
        add(f"prune-{s}-het-emp", f"stochastic pruning {s} overall, heterogeneous allocation, "
            "empirical per-layer thresholds",
            compression=_comp(prune=PruneSpec(sp, "empirical", heterogeneous=True)))
        add(f"prune-{s}-emp", f"stochastic pruning {s}, empirical (distribution-free) threshold",
            compression=_comp(prune=PruneSpec(sp, "empirical")))
        add(f"prune-{s}-cal", f"stochastic pruning {s}, calibrated lognormal threshold",
            compression=_comp(prune=PruneSpec(sp, "calibrated")))
        add(f"atp-{s}", f"ATP baseline at {s}: normal-assumption threshold, stochastic pruning",
            compression=_comp(prune=PruneSpec(sp, "atp")))
        add(f"topk-{s}", f"deterministic top-k pruning at {s} (meProp/SAW baseline)",
            compression=_comp(prune=PruneSpec(sp, "topk")))
        add(f"topks-{s}", f"top-k threshold then stochastic pruning at {s}",
            compression=_comp(prune=PruneSpec(sp, "topk_stochastic")))
        for n in (6, 8):
            add(f"prune-{s}-fp{n}", f"stochastic pruning {s} then FP{n} at E*",
                compression=_comp(prune=PruneSpec(sp, "lognormal"), quantize=_fp(n)))
    add("w4a4", "INT4 SAWB weights + INT4 PACT activations (first/last layer 8 bit)",
        forward=ForwardSpec())
    for n in (4, 5, 6):
        add(f"w4a4-fp{n}", f"W4A4 forward + FP{n} neural gradients at E*, per-layer scaling",
            forward=ForwardSpec(), compression=_comp(quantize=_fp(n)))
    _block_recipes(add)
    _gemm_recipes(add)
    return r


# block format of each block recipe, and what it is
_BLOCK_RECIPES = {
    "mxfp8": ("mxfp8_e4m3", "OCP MXFP8 E4M3 (32-element blocks, E8M0 scale, spec floor rule)"),
    "mxfp8-e5m2": ("mxfp8_e5m2", "OCP MXFP8 E5M2 (32-element blocks, E8M0 scale, floor rule)"),
    "mxfp6": ("mxfp6_e3m2", "OCP MXFP6 E3M2 (32-element blocks, E8M0 scale, floor rule)"),
    "mxfp4": ("mxfp4", "OCP MXFP4 E2M1 (32-element blocks, E8M0 scale, floor rule)"),
    "nvfp4": ("nvfp4", "NVFP4 E2M1 (16-element blocks, E4M3 scale, FP32 tensor scale)"),
}


def _block_recipes(add) -> None:
    """Neural gradients in a block format at the conv outputs / hidden linears (the same
    layers and schedule as ``fp{N}``): blocks along the output channels of a conv output
    (the reduction dimension of the input-gradient GEMM) and along the features of a linear
    output. Stochastic rounding is what TransformerEngine's NVFP4 recipe, "FP4 All the Way"
    and the MXFP4 training papers use on gradients; ``-rn`` rounds to nearest even."""
    for name, (fmt, what) in _BLOCK_RECIPES.items():
        for suffix, rounding, how in (("", "stochastic", "stochastic rounding"),
                                      ("-rn", "nearest", "round to nearest even")):
            add(name + suffix, f"{what} neural gradients, {how}; the per-block scale replaces "
                "per-layer scaling",
                compression=_comp(quantize=QuantizeSpec(format=fmt, rounding=rounding)))


def _op(kind: str, fmt, rounding: str = "stochastic", **kw) -> OperandSpec:
    return OperandSpec(kind, fmt, rounding, **kw)


def _gemm_recipes(add) -> None:
    """Per-GEMM backward recipes (``backward``); see each description for the source."""
    luq = _op("luq", 4)
    add("luq-fp4",
        "LUQ (Chmiel et al., ICLR 2023, 'Accurate neural training with 4-bit matrix "
        "multiplications at standard formats'), its fully 4-bit setting (the paper's main "
        "ImageNet result: ResNet-50 75.4% vs 76.5%). Forward: INT4 SAWB weights + INT4 PACT "
        "activations; backward: the neural gradient of both GEMMs (dgrad and wgrad) in the LUQ "
        "4-bit radix-2 log format (stochastic underflow below max|g|/2^8, stochastic rounding "
        "between powers of two, unbiased); W and x in the backward are the forward's INT4 "
        "tensors. First and last layer in full precision (forward and backward). Left out: the "
        "repeated-sampling variance reduction (luq-fp4-smp has it) and the paper's high-"
        "precision fine-tuning phase.",
        forward=ForwardSpec(first_last_bits=None),
        backward=BackwardQuantConfig(BackwardSpec(dgrad_grad=luq, wgrad_grad=luq),
                                     keep_first_last=True))
    luq2 = _op("luq", 4, samples=2)
    add("luq-fp4-smp",
        "luq-fp4 with LUQ's repeated sampling (SMP, 2 samples averaged) on the gradient "
        "operands: lower variance at the same 4-bit format. Same paper and omissions otherwise.",
        forward=ForwardSpec(first_last_bits=None),
        backward=BackwardQuantConfig(BackwardSpec(dgrad_grad=luq2, wgrad_grad=luq2),
                                     keep_first_last=True))
    nv_sr, nv_rn = _op("block", "nvfp4"), _op("block", "nvfp4", "nearest")
    # the forward-quantized operands are what the backward saves: a backward spec re-quantizes
    # them (a second rounding where the papers quantize the high-precision tensor again)
    requant = ("the backward re-quantizes the forward-quantized input and weight (the paper "
               "quantizes the high-precision tensors for the backward)")
    add("nvfp4-recipe",
        "NVIDIA's NVFP4 pretraining recipe ('Pretraining large language models with NVFP4', "
        "2025; its method section, the 12B-model setting). Forward GEMM: NVFP4 round-to-nearest "
        "with 1x16 blocks on the input and 16x16 2-D tiles on the weight. Backward GEMMs: NVFP4 "
        "1x16 stochastic rounding on the gradient (dgrad and wgrad), the weight in the same "
        "16x16 tiles (nearest; 2-D so that W and W^T quantize alike), 1x16 nearest on the saved "
        "input, a 16-point random Hadamard transform on both wgrad operands with one fixed "
        "sign vector; first and last layer in full precision (the paper keeps about 15% of the "
        "linear layers, the first and last blocks, in BF16). Left out: " + requant + "; the "
        "BF16/FP32 master weights and optimizer details.",
        forward=ForwardSpec(None, None, None, weight_format="nvfp4_2d", act_format="nvfp4"),
        backward=BackwardQuantConfig(
            BackwardSpec(nv_sr, _op("block", "nvfp4_2d", "nearest"), nv_sr, nv_rn,
                         RHTSpec(16, "fixed")), keep_first_last=True))
    mx = _op("block", "e2m1fn:32:e8m0:rceil")
    add("quartet-mxfp4",
        "Quartet (Castro et al., 2025, 'Quartet: native FP4 training can be optimal for large "
        "language models'), its MXFP4 linear layers. Forward GEMM: MXFP4 (E2M1, 32-element "
        "blocks, E8M0 scale, OCP floor rule) round-to-nearest on the input and the weight. "
        "Backward: MXFP4 on all four backward operands with stochastic rounding, a 32-point "
        "random Hadamard transform with fresh signs every step on the wgrad operands; the E8M0 "
        "scale is rounded up (rceil) so that stochastic rounding never clips (unbiased). First "
        "and last layer in full precision. Left out: the forward's Hadamard transform and "
        "QuEST RMSE-optimal clipping (plain MXFP4 nearest here), the Hadamard on the dgrad "
        "operands (gemm applies the RHT to wgrad only); " + requant + ".",
        forward=ForwardSpec(None, None, None, weight_format="mxfp4", act_format="mxfp4"),
        backward=BackwardQuantConfig(
            BackwardSpec.uniform(mx, mx, mx, RHTSpec(32, "per_step")), keep_first_last=True))
    add("fp4-all-the-way",
        "'FP4 All the Way' (Chmiel et al., 2025), its NVFP4 setting (the format it found best "
        "among the block sizes and scale formats compared): forward GEMMs in NVFP4 (1x16 "
        "blocks, E4M3 scale, FP32 tensor scale) with round-to-nearest on the input and the "
        "weight; every backward operand (gradient, weight, input of dgrad and wgrad) in NVFP4 "
        "with stochastic rounding; first and last layer in full precision. Left out: SR in the "
        "weight update, the paper's closing high-precision (QAF) phase; " + requant + ".",
        forward=ForwardSpec(None, None, None, weight_format="nvfp4", act_format="nvfp4"),
        backward=BackwardQuantConfig(BackwardSpec.uniform(nv_sr, nv_sr, nv_sr),
                                     keep_first_last=True))


_BUILTINS = _builtins()


def list_recipes() -> list[str]:
    return list(_BUILTINS)


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or a recipe file when ``name`` looks like a path (has a
    directory part or a file extension such as .toml/.json/.yaml)."""
    if not isinstance(name, str):
        raise TypeError(f"recipe must be a name or a path, got {type(name).__name__}")
    if name in _BUILTINS:
        return _BUILTINS[name]
    suffix = Path(name).suffix
    if "/" in name or "\\" in name or (suffix[1:].isalpha() and suffix[1:]):
        return load_recipe(name)
    close = difflib.get_close_matches(name, list(_BUILTINS), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(
        f"unknown recipe {name!r}; {hint}`gradcomp recipes` lists the {len(_BUILTINS)} "
        "built-in recipes (or pass a path to a .toml/.json recipe file)"
    )
