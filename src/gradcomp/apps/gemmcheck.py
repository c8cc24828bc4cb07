"""Per-GEMM diagnostics of backward quantization on real captured operands.

For each Linear/Conv2d layer of a short training run, the last step's operands are captured
(input x, weight W, neural gradient G = dL/dy) and, for each scheme (a :class:`BackwardSpec`),
both backward products are recomputed ``draws`` times with independent random bits
(``integration.gemm.backward_products``, the code the converted layer runs) and compared with
the exact float64 product P:

* ``cosine``: mean over draws of cos(Q_d, P);
* ``rel_var``: total variance sum_elements Var_d[Q] / ||P||^2 (the added noise);
* ``rel_bias``: ||mean_d Q - P|| / ||P|| (includes the noise floor sqrt(rel_var / draws),
  reported as ``noise_floor``);
* ``bias_z``: the largest |z| of two aggregate statistics of the error E_d = Q_d - P over draws,
  its sum over all elements and its projection on P (the shrinkage direction): mean / (std /
  sqrt(draws)). Below 5 for unbiased estimators; large for biased ones (nearest rounding);
* ``pred_rel_var``: the lognormal prediction of rel_var where a closed form exists (only G
  quantized, kind "luq" or stochastic "fp" with amax scaling, no RHT): with |G| ~ LogNormal(mu,
  sigma) fitted to the non-zeros and zero fraction z, each element of G gets variance
  v = (1 - z) E[(b - x)(x - a)] (``numerics.luq.sr_mse_lognormal``), and the product's total
  variance is v * M * ||W||_F^2 for dgrad (each G element meets one row of W) and
  v * n_out * ||X||_F^2 for wgrad (X the im2col matrix for Conv2d); NaN elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradcomp.integration.gemm import BackwardSpec, OperandSpec, RHTSpec, backward_products
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.luq import luq_grid, sr_mse_lognormal
from gradcomp.numerics.scales import amax_to_scale

__all__ = [
    "SCHEMES",
    "GemmOperands",
    "capture_gemm_operands",
    "gemm_diagnostics",
    "predicted_rel_var",
    "ranked_rows",
    "plot_layers",
]

_FP4_SR = OperandSpec("fp", "e2m1fn", "stochastic")

#: Diagnostic presets (backward only; forward full precision). Recipes live in apps.recipes.
SCHEMES: dict[str, BackwardSpec] = {
    "luq4": BackwardSpec.uniform(OperandSpec("luq", 4)),
    "luq4x2": BackwardSpec.uniform(OperandSpec("luq", 4, samples=2)),
    "fp4-sr": BackwardSpec.uniform(_FP4_SR),
    "fp4-rn": BackwardSpec.uniform(OperandSpec("fp", "e2m1fn", "nearest")),
    "fp4-sr-all": BackwardSpec.uniform(_FP4_SR, _FP4_SR, _FP4_SR),
    "fp4-sr-all-rht16": BackwardSpec.uniform(_FP4_SR, _FP4_SR, _FP4_SR, RHTSpec(16)),
    "int4-sr": BackwardSpec.uniform(OperandSpec("int", 4, "stochastic")),
    # block-scaled gradients (1x16 NVFP4, 1x32 MXFP4) with SR, blocks along the reduction dim
    "nvfp4-sr": BackwardSpec.uniform(OperandSpec("block", "nvfp4", "stochastic")),
    "mxfp4-sr": BackwardSpec.uniform(OperandSpec("block", "mxfp4", "stochastic")),
    # the round-up E8M0 scale: no element saturates, so SR stays unbiased (the OCP floor rule
    # of mxfp4 lets block maxima in (6, 8) * scale clip to 6: a bias gemmcheck measures)
    "mxfp4-rceil-sr": BackwardSpec.uniform(OperandSpec("block", "e2m1fn:32:e8m0:rceil",
                                                       "stochastic")),
    # NVIDIA's NVFP4 recipe's backward: SR gradients, 16x16 weight tiles, RHT16 on wgrad
    "nvfp4-recipe": BackwardSpec(
        OperandSpec("block", "nvfp4", "stochastic"), OperandSpec("block", "nvfp4_2d", "nearest"),
        OperandSpec("block", "nvfp4", "stochastic"), OperandSpec("block", "nvfp4", "nearest"),
        RHTSpec(16)),
}


@dataclass
class GemmOperands:
    """One layer's backward operands: ``kind`` "linear" or "conv2d"; ``conv`` = (stride,
    padding, dilation, groups) for conv2d."""

    name: str
    kind: str
    x: torch.Tensor
    weight: torch.Tensor
    grad: torch.Tensor
    conv: tuple | None = None


def capture_gemm_operands(model: str = "cnn", dataset: str = "fashion-mnist", *, steps: int = 20,
                          batch_size: int = 32, width: int | None = None, lr: float = 0.05,
                          seed: int = 0, data_dir: str | None = None, max_train: int = 2048,
                          device: str = "cpu", context: int = 64) -> list[GemmOperands]:
    """Train ``model`` with SGD for ``steps`` steps and capture x, W, G of every Linear/Conv2d
    at the last step (forward hooks on the layers, a tensor hook on each output). Text datasets
    (``shakespeare``: byte-level language modelling, ``context`` bytes) train the transformer
    models; their Linear inputs are (batch, tokens, features) and both GEMMs reduce over the
    flattened batch x tokens rows."""
    from gradcomp.apps.data import is_text_dataset, load_dataset, make_loader
    from gradcomp.apps.text import flatten_logits
    from gradcomp.apps.train import model_for_data

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    torch.manual_seed(seed)
    if is_text_dataset(dataset):
        data = load_dataset(dataset, data_dir, max_train=max_train, context=context)
    else:
        width = 8 if width is None else width
        data = load_dataset(dataset, data_dir, max_train=max_train)
    net = model_for_data(model, dataset, data, width).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loader = make_loader(data.train, batch_size, shuffle=True, seed=seed, drop_last=True,
                         device=device)
    captured: dict[str, GemmOperands] = {}
    active = {"on": False}

    def hook(name):
        def fn(module, args, out):
            if not active["on"]:
                return
            if isinstance(module, nn.Conv2d):
                if module.padding_mode != "zeros":
                    raise ValueError(f"layer {name}: padding_mode {module.padding_mode!r} is "
                                     "not supported by the diagnostics")
                rec = GemmOperands(name, "conv2d", args[0].detach(), module.weight.detach(),
                                   None, (module.stride, module.padding, module.dilation,
                                          module.groups))
            else:
                rec = GemmOperands(name, "linear", args[0].detach(), module.weight.detach(),
                                   None)
            captured[name] = rec

            def grad_hook(g):
                rec.grad = g.detach()
            out.register_hook(grad_hook)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    step = 0
    try:
        while step < steps:
            for xb, yb in loader:
                active["on"] = step == steps - 1
                opt.zero_grad()
                F.cross_entropy(*flatten_logits(net(xb), yb)).backward()
                if step < steps - 1:
                    opt.step()
                step += 1
                if step >= steps:
                    break
    finally:
        for h in handles:
            h.remove()
    return [r for r in captured.values() if r.grad is not None]


def _grid(spec: OperandSpec, amax: float):
    if spec.kind == "luq" and spec.samples >= 1:
        return luq_grid(amax * 2.0 ** -(2 ** (spec.format - 1)), spec.format), spec.samples
    if spec.kind == "fp" and spec.rounding == "stochastic" and spec.scaling != "none":
        s = float(amax_to_scale(torch.tensor(amax, dtype=torch.float64), spec.format,
                                power_of_two=spec.scaling == "amax-pow2"))
        return spec.format.grid() / s, 1
    return None, 1


def predicted_rel_var(rec: GemmOperands, spec: BackwardSpec, exact: tuple) -> dict:
    """The lognormal model's rel_var of dgrad and wgrad (NaN where no closed form applies)."""
    out = {"dgrad": math.nan, "wgrad": math.nan}
    g = rec.grad.double()
    fit = fit_lognormal(g)
    if not bool(fit.ok) or float(fit.sigma) <= 0:
        return out
    mu, sigma, z = float(fit.mu), float(fit.sigma), float(fit.zero_fraction)
    amax = float(fit.amax)
    n_out = rec.weight.shape[0]
    if rec.kind == "linear":
        m = g.numel() // n_out
        xmat = rec.x.double().reshape(-1, rec.x.shape[-1])
    else:
        m = g.numel() // n_out
        stride, padding, dilation, groups = rec.conv
        xmat = F.unfold(rec.x.double(), rec.weight.shape[2:], dilation=dilation,
                        padding=padding, stride=stride)
        n_out = n_out // groups  # each output channel meets one group's columns
    w2 = float(rec.weight.double().square().sum())
    x2 = float(xmat.square().sum())
    for gemm, gspec, other, total in (
        ("dgrad", spec.dgrad_grad, spec.dgrad_weight, m * w2),
        ("wgrad", spec.wgrad_grad, spec.wgrad_input, n_out * x2),
    ):
        if other.kind != "none" or (gemm == "wgrad" and spec.rht is not None):
            continue
        grid, samples = _grid(gspec, amax)
        if grid is None:
            continue
        v = (1 - z) * sr_mse_lognormal(mu, sigma, grid)["variance"] / samples
        p2 = float(exact[0 if gemm == "dgrad" else 1].square().sum())
        out[gemm] = v * total / p2 if p2 > 0 else math.nan
    return out


def gemm_diagnostics(records: list[GemmOperands], schemes: dict[str, BackwardSpec], *,
                     draws: int = 16, seed: int = 0) -> list[dict]:
    """One row per (layer, scheme, gemm) with the statistics of the module docstring."""
    if not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int >= 2, got {draws!r}")
    if not records:
        raise ValueError("records is empty: nothing was captured")
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for rec in records:
        exact = backward_products(rec.kind, rec.grad.double(), rec.x.double(),
                                  rec.weight.double(), BackwardSpec(), conv=rec.conv)
        for sname, spec in schemes.items():
            outs = [backward_products(rec.kind, rec.grad, rec.x, rec.weight, spec, gen,
                                      conv=rec.conv, call=d) for d in range(draws)]
            pred = predicted_rel_var(rec, spec, exact)
            for j, gemm in enumerate(("dgrad", "wgrad")):
                p = exact[j].reshape(-1)
                q = torch.stack([o[j].double().reshape(-1) for o in outs])
                p2 = float(p.square().sum())
                pn = math.sqrt(p2) if p2 > 0 else 1.0
                mean = q.mean(0)
                var = float(q.var(0).sum())
                err = q - p
                zs = []
                for t in (err.sum(1), err @ p / pn):
                    sd = float(t.std())
                    m = float(t.mean())
                    zs.append(abs(m) / (sd / math.sqrt(draws)) if sd > 0 else
                              (0.0 if m == 0 else math.inf))
                cos = F.cosine_similarity(q, p.unsqueeze(0).expand_as(q), dim=1)
                rows.append({
                    "layer": rec.name, "kind": rec.kind, "scheme": sname, "gemm": gemm,
                    "spec": spec.describe()[gemm], "numel": p.numel(),
                    "cosine": float(cos.mean()),
                    "rel_var": var / p2 if p2 > 0 else math.nan,
                    "pred_rel_var": pred[gemm],
                    "rel_bias": float((mean - p).norm()) / pn,
                    "noise_floor": math.sqrt(var / p2 / draws) if p2 > 0 else math.nan,
                    "bias_z": max(zs),
                })
    return rows


def ranked_rows(rows: list[dict]) -> list[dict]:
    """Rows sorted by added noise (1 - cosine, then rel_var), largest first."""
    return sorted(rows, key=lambda r: (-(1 - r["cosine"]), -(r["rel_var"] if
                                                             math.isfinite(r["rel_var"]) else 0)))


def plot_layers(rows: list[dict], path) -> None:
    """Per layer and GEMM: 1 - cosine (log scale) per scheme, and measured vs predicted
    rel_var; saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    width = 0.8 / max(1, len(schemes))
    for col, gemm in enumerate(("dgrad", "wgrad")):
        for k, s in enumerate(schemes):
            sel = {r["layer"]: r for r in rows if r["scheme"] == s and r["gemm"] == gemm}
            xs = [i + k * width for i, layer in enumerate(layers) if layer in sel]
            ys = [max(1 - sel[layer]["cosine"], 1e-12) for layer in layers if layer in sel]
            axes[0, col].bar(xs, ys, width, label=s)
            vs = [sel[layer]["rel_var"] for layer in layers if layer in sel]
            axes[1, col].bar(xs, vs, width, label=s)
            ps = [sel[layer]["pred_rel_var"] for layer in layers if layer in sel]
            axes[1, col].scatter(xs, ps, marker="_", s=200, color="k", zorder=3)
        axes[0, col].set_yscale("log")
        axes[1, col].set_yscale("log")
        axes[0, col].set_title(f"{gemm}: 1 - cosine to the exact product")
        axes[1, col].set_title(f"{gemm}: relative variance (black: lognormal prediction)")
        axes[1, col].set_xticks([i + 0.4 - width / 2 for i in range(len(layers))])
        axes[1, col].set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
