"""When is the lognormal model enough? Model vs measurement on real neural gradients.

Two checks on the same captured layers, each comparing the paper's lognormal closed forms with
the distribution-free (sample-based) methods:

* Pruning (``sparsity_check``): achieved vs target ("predicted") sparsity of every threshold
  method at every target, through ``evaluation.evaluate_sparsity`` (the numbers of
  ``gradcomp sparsity``); the empirical method also at smaller samples (the ``sample_size``
  trade-off); and the drift of a threshold set at one capture and used at a later one (a
  refresh's staleness).
* FP quantization (``quantization_check``): for every 1-n2-n1 split of each bit width, each
  layer's values are split at random into halves A and B. Lognormal: (mu, sigma) fitted on A,
  scale ``optimal_scale``, error predicted by the exact integral ``expected_relative_error``,
  measured on B at that scale. Empirical: the scale minimising the error measured on A (the
  ``per_layer_empirical`` search), that error as the prediction, measured on B. Each side
  also picks a model-wide E* (``select_split``: median sigma vs mean measured error), whose
  held-out error is reported, so the cost of trusting the model is one number.
* Block formats (``block_check``): MX / NVFP4 error predicted by the order-statistics theory
  (``numerics.block_error``) at each layer's fitted (mu, sigma) and zero fraction, against
  ``quantize_block`` on the captured tensor (and on its values shuffled into iid blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from gradcomp.apps.evaluation import DEFAULT_METHODS, DEFAULT_TARGETS, evaluate_sparsity
from gradcomp.apps.evaluation import group_layers as _group
from gradcomp.compressors.pruning import Pruner
from gradcomp.compressors.quantizer import select_split
from gradcomp.compressors.scaling import PerLayerEmpirical
from gradcomp.numerics._checks import require_choice, require_int_range
from gradcomp.numerics.fit import LayerStats, fit_lognormal
from gradcomp.numerics.fp_error import (
    empirical_relative_error,
    expected_relative_error,
    optimal_scale,
    split_formats,
)
from gradcomp.numerics.random import sample_values

__all__ = [
    "capture_layers",
    "group_layers",
    "split_halves",
    "quantization_check",
    "sparsity_check",
    "stale_sparsity",
    "sparsity_tables",
    "quantization_tables",
    "per_layer_tables",
    "block_check",
    "block_tables",
    "plot_block_check",
    "DEFAULT_BLOCK_FORMATS",
]

DEFAULT_BITS = (4, 5, 6, 7, 8)
DEFAULT_BLOCK_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp4", "nvfp4")


def capture_layers(model: str = "resnet20", dataset: str = "fashion-mnist", steps: int = 300,
                   capture_size: int | None = 1 << 18, seed: int = 0, device: str = "cpu",
                   data_dir: str | None = None, progress: bool = True, **kw):
    """Neural gradients of a short training run at two steps (steps//2 and the last one).

    Returns [(layer name, float32 CPU tensor)] in step order (a name appears twice: a time
    series for the calibrated method and the staleness check): the whole tensor in its own
    shape when it has at most ``capture_size`` values (None: always), else a 1-D random
    subsample of ``capture_size`` values (drawn with replacement). ``kw`` goes to
    ``collect_neural_gradients`` (e.g. ``width``).
    """
    from gradcomp.apps.experiments import collect_neural_gradients

    steps = require_int_range(steps, "steps", 2, 1 << 30)
    recs = collect_neural_gradients(
        model=model, dataset=dataset, steps=steps, capture_steps=[steps // 2, steps - 1],
        sample_size=capture_size, seed=seed, device=device, data_dir=data_dir,
        progress=progress, **kw,
    )
    recs = sorted(recs, key=lambda r: r.step)
    out = []
    for r in recs:
        if r.sample.numel() == 0:
            continue
        whole = r.sample.numel() == r.numel  # sample_values keeps a small tensor whole, in order
        out.append((r.name, r.sample.float().cpu().reshape(r.shape if whole else (-1,))))
    return out


def group_layers(layers: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """{name: [tensors in order]} (flattened), the time series of each layer."""
    out = _group(layers)
    if not out:
        raise ValueError("layers is empty: nothing to check")
    return out


# ---------------------------------------------------------------------------------------------
# pruning


def stale_sparsity(layers, targets=DEFAULT_TARGETS, methods=("lognormal", "empirical"), *,
                   sample_size: int = 16384, seed: int = 0) -> list[dict]:
    """Thresholds set on each layer's first tensor, achieved sparsity on its last one.

    The gap between two capture steps stands for the steps between two refreshes (the paper
    refreshes once per epoch). Layers with a single tensor are skipped. Returns one summary
    row per (method, target): mean / worst-layer |achieved - target| and the mean signed error.
    """
    groups = {k: v for k, v in group_layers(layers).items() if len(v) > 1}
    g = torch.Generator().manual_seed(seed)
    rows = []
    if not groups:
        return rows
    for method in methods:
        for target in targets:
            errs = []
            for series in groups.values():
                p = Pruner(target, method)
                first, last = series[0], series[-1]
                p.update(LayerStats(fit_lognormal(first), sample_values(first, sample_size, g)))
                p(last, g)
                errs.append(float(p.metrics()["sparsity"]) - target)
            rows.append({"method": method, "target": target,
                         "mean_abs_error": sum(abs(e) for e in errs) / len(errs),
                         "worst_abs_error": max(abs(e) for e in errs),
                         "mean_error": sum(errs) / len(errs)})
    return rows


def sparsity_check(layers, targets=DEFAULT_TARGETS, methods=DEFAULT_METHODS, *,
                   sample_size: int = 16384, extra_sample_sizes=(4096,), seed: int = 0,
                   progress: bool = False) -> dict:
    """Predicted (target) vs achieved sparsity per method and target (``evaluate_sparsity``).

    ``extra_sample_sizes``: the empirical method again with smaller samples, reported as
    ``empirical@N``. ``stale``: the drift rows of ``stale_sparsity`` (lognormal, empirical).
    """
    res = evaluate_sparsity(layers, targets, methods, sample_size=sample_size, seed=seed,
                            encode=False, progress=progress)
    for n in extra_sample_sizes:
        extra = evaluate_sparsity(layers, targets, ("empirical",), sample_size=int(n),
                                  seed=seed, encode=False)
        for key in ("summary", "per_layer"):
            for row in extra[key]:
                row["method"] = f"empirical@{int(n)}"
            res[key].extend(extra[key])
        res["methods"].append(f"empirical@{int(n)}")
    res["stale"] = stale_sparsity(layers, targets, [m for m in ("lognormal", "empirical")
                                                    if m in methods],
                                  sample_size=sample_size, seed=seed)
    return res


def sparsity_tables(res: dict) -> str:
    """Markdown: mean / worst-layer |achieved - target| (points) per method and target."""
    from gradcomp.apps.tables import format_table

    targets = res["targets"]
    by = {(s["method"], s["target"]): s for s in res["summary"]}
    head = ["method"] + [f"{t:g}" for t in targets] + ["all targets"]

    def cells(rows, method):
        mean = [100 * rows[(method, t)]["mean_abs_error"] for t in targets]
        worst = [100 * rows[(method, t)]["worst_abs_error"] for t in targets]
        return ([f"{m:.2f} ({w:.2f})" for m, w in zip(mean, worst)]
                + [f"{sum(mean) / len(mean):.2f} ({max(worst):.2f})"])

    out = ["sparsity: mean |achieved - target| over layers, (worst layer), in points; "
           f"{res['layers']} layers, sample {res['sample_size']}",
           format_table(head, [[m] + cells(by, m) for m in res["methods"]])]
    if res.get("stale"):
        st = {(s["method"], s["target"]): s for s in res["stale"]}
        meths = list(dict.fromkeys(s["method"] for s in res["stale"]))
        out += ["", "stale thresholds (set at the first capture, used at the last): same units",
                format_table(head, [[m] + cells(st, m) for m in meths])]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# FP quantization


def split_halves(layers, max_values: int | None = 32768,
                 seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (A, B)}: each layer's last tensor, finite non-zeros only (float64), at most
    ``max_values`` of them drawn without replacement, split at random into two halves.

    Layers with fewer than four such values are left out (nothing to fit or to measure).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, series in group_layers(layers).items():
        x = series[-1]
        x = x[torch.isfinite(x) & (x != 0)].double()
        if max_values is not None and x.numel() > max_values:
            x = x[torch.randperm(x.numel(), generator=g)[:max_values]]
        if x.numel() < 4:
            continue
        perm = torch.randperm(x.numel(), generator=g)
        h = x.numel() // 2
        out[name] = (x[perm[:h]], x[perm[h:]])
    if not out:
        raise ValueError("no layer has four finite non-zero values to check")
    return out


def quantization_check(layers, bits=DEFAULT_BITS, *, semantics: str = "paper",
                       rounding: str = "nearest", max_values: int | None = 32768,
                       seed: int = 0, progress: bool = False) -> dict:
    """Predicted vs held-out relative quantization error per split, lognormal vs empirical.

    Each layer's last tensor (at most ``max_values`` values drawn at random, without
    replacement) is split into halves A (fit / search) and B (measure). Per layer, bit width
    and split: ``ln_pred`` = exact integral at the fitted (mu, sigma) and s = optimal_scale,
    ``ln_meas`` = error on B at that s; ``emp_pred`` = least error on A over the scale grid,
    ``emp_meas`` = error on B at that scale. Zeros and non-finite values are excluded from
    every error (relative error undefined), as in ``expected_relative_error``.
    Per layer and bits also E* of each side (lognormal: ``optimal_format`` at the layer's
    sigma; empirical: least ``emp_pred``) and the split with the least held-out error at
    either scale; per bits the model-wide E* of each ``select_split`` rule and the mean
    held-out error each one yields.
    """
    require_choice(semantics, "semantics", ("paper", "ieee"))
    require_choice(rounding, "rounding", ("nearest", "stochastic"))
    bits = [require_int_range(b, "bits", 3, 16) for b in bits]
    halves = split_halves(layers, max_values, seed)
    names = list(halves)
    fits = {n: fit_lognormal(halves[n][0]) for n in names}
    search = PerLayerEmpirical(rounding).search
    per_layer, per_bits = [], []
    bar = tqdm(total=len(bits) * len(names), desc="quantization: bits x layers",
               disable=not progress, leave=False)
    for nb in bits:
        fmts = split_formats(nb, semantics)
        rows = {}  # (layer, split) -> record
        for name in names:
            bar.update(1)
            a, b = halves[name]
            fit = fits[name]
            mu, sigma = float(fit.mu), max(float(fit.sigma), 1e-6)
            for fmt in fmts:
                s_ln = optimal_scale(fmt, mu, sigma, rounding)
                s_t, e_t = search(a, fmt, torch.tensor(s_ln, dtype=torch.float64))
                s_emp = float(s_t)
                rec = {
                    "layer": name, "bits": nb, "format": fmt.name, "exp_bits": fmt.exp_bits,
                    "mu": mu, "sigma": sigma,
                    "ln_scale": s_ln,
                    "ln_pred": expected_relative_error(fmt, mu, sigma, s_ln, rounding=rounding),
                    "ln_meas": float(empirical_relative_error(b, fmt, s_ln, rounding)),
                    "emp_scale": s_emp,
                    "emp_pred": float(e_t),
                    "emp_meas": float(empirical_relative_error(b, fmt, s_emp, rounding)),
                }
                rows[(name, fmt.name)] = rec
                per_layer.append(rec)
        # per-layer E* of each side, and the model-wide choice of each select rule
        layer_choice = {}
        for name in names:
            recs = [rows[(name, f.name)] for f in fmts]
            ln = min(recs, key=lambda r: (r["ln_pred"], r["exp_bits"]))
            emp = min(recs, key=lambda r: (r["emp_pred"], r["exp_bits"]))
            best = min(recs, key=lambda r: (min(r["ln_meas"], r["emp_meas"]), r["exp_bits"]))
            layer_choice[name] = {"lognormal": ln["format"], "empirical": emp["format"],
                                  "held_out_best": best["format"]}
        # the wrapper's rules: lognormal via select_split (median sigma); empirical = least
        # mean emp_pred, which is select_split(select="empirical") on the A halves (same
        # search from the same exact centres; a test checks it) without repeating it
        ln_fmt = select_split(nb, [fits[n] for n in names], select="lognormal",
                              semantics=semantics, rounding=rounding)["fmt"]
        mean_emp = {f.name: sum(rows[(n, f.name)]["emp_pred"] for n in names) / len(names)
                    for f in fmts}
        emp_fmt = min(fmts, key=lambda f: (mean_emp[f.name], f.exp_bits))
        sel = {}
        for select, chosen, key in (("lognormal", ln_fmt, "ln_meas"),
                                    ("empirical", emp_fmt, "emp_meas")):
            meas = [rows[(n, chosen.name)][key] for n in names]
            sel[select] = {"format": chosen.name, "exp_bits": chosen.exp_bits,
                           "mean_held_out_error": sum(meas) / len(meas)}
        summary = []
        for fmt in fmts:
            recs = [rows[(n, fmt.name)] for n in names]
            row = {"format": fmt.name, "exp_bits": fmt.exp_bits}
            for side in ("ln", "emp"):
                pred = [r[f"{side}_pred"] for r in recs]
                meas = [r[f"{side}_meas"] for r in recs]
                gap = [abs(p - m) / m if m > 0 else math.nan for p, m in zip(pred, meas)]
                worst = max(range(len(gap)), key=lambda i: -1 if math.isnan(gap[i]) else gap[i])
                row.update({f"{side}_pred": sum(pred) / len(pred),
                            f"{side}_meas": sum(meas) / len(meas),
                            f"{side}_gap": sum(gap) / len(gap),
                            f"{side}_worst_gap": gap[worst],
                            f"{side}_worst_layer": recs[worst]["layer"]})
            summary.append(row)
        per_bits.append({"bits": nb, "select": sel, "layer_choice": layer_choice,
                         "summary": summary})
    sig = torch.stack([fits[n].sigma for n in names])
    bar.close()
    return {"layers": len(names), "semantics": semantics, "rounding": rounding,
            "max_values": max_values, "median_sigma": float(sig.median()),
            "bits": per_bits, "per_layer": per_layer}


def quantization_tables(res: dict, span: int = 1) -> str:
    """Markdown: per bits, the splits within ``span`` exponent bits of the lognormal E*."""
    from gradcomp.apps.tables import format_table

    out = [f"FP quantization: mean relative error over {res['layers']} layers (zeros excluded), "
           f"predicted on half A / measured on held-out half B; gap = mean |pred - meas| / meas "
           f"(worst layer); semantics {res['semantics']}, rounding {res['rounding']}, median "
           f"sigma {res['median_sigma']:.3f}"]
    head = ["bits", "format", "E*", "ln pred", "ln meas", "ln gap % (worst)", "emp pred",
            "emp meas", "emp gap % (worst)"]
    rows = []
    for b in res["bits"]:
        e_ln = b["select"]["lognormal"]["exp_bits"]
        for r in b["summary"]:
            if abs(r["exp_bits"] - e_ln) > span:
                continue
            tag = []
            if r["format"] == b["select"]["lognormal"]["format"]:
                tag.append("ln")
            if r["format"] == b["select"]["empirical"]["format"]:
                tag.append("emp")
            rows.append([b["bits"], r["format"], "+".join(tag), f"{r['ln_pred']:.4f}",
                         f"{r['ln_meas']:.4f}",
                         f"{100 * r['ln_gap']:.1f} ({100 * r['ln_worst_gap']:.1f})",
                         f"{r['emp_pred']:.4f}", f"{r['emp_meas']:.4f}",
                         f"{100 * r['emp_gap']:.1f} ({100 * r['emp_worst_gap']:.1f})"])
    out.append(format_table(head, rows))
    out += ["", "selected split per bits (model-wide) and its mean held-out error; layers whose "
            "own E* differs between the two sides"]
    rows = []
    for b in res["bits"]:
        s = b["select"]
        differ = sum(c["lognormal"] != c["empirical"] for c in b["layer_choice"].values())
        rows.append([b["bits"], s["lognormal"]["format"],
                     f"{s['lognormal']['mean_held_out_error']:.4f}", s["empirical"]["format"],
                     f"{s['empirical']['mean_held_out_error']:.4f}",
                     f"{differ}/{len(b['layer_choice'])}"])
    out.append(format_table(["bits", "lognormal E*", "held-out err", "empirical E*",
                             "held-out err", "layers with different E*"], rows))
    return "\n".join(out)


def per_layer_tables(sp: dict, fp: dict, target: float | None = None,
                     bits: int | None = None) -> str:
    """Markdown, one row per layer: achieved - target (points) per method at ``target``
    (default: the target nearest 0.8), and for ``bits`` (default: the middle width) sigma,
    each side's own E*, the held-out best split and the pred/meas gap at the lognormal E*."""
    from gradcomp.apps.tables import format_table

    if target is None:
        target = min(sp["targets"], key=lambda t: abs(t - 0.8))
    recs = [r for r in sp["per_layer"] if r["target"] == target]
    layers = list(dict.fromkeys(r["layer"] for r in recs))
    err = {(r["layer"], r["method"]): 100 * r["error"] for r in recs}
    rows = [[name] + [f"{err[(name, m)]:+.2f}" if (name, m) in err else "" for m in sp["methods"]]
            for name in layers]
    out = [f"per layer: achieved - target in points at target {target:g}",
           format_table(["layer"] + list(sp["methods"]), rows)]
    widths = [b["bits"] for b in fp["bits"]]
    if bits is None:
        bits = widths[len(widths) // 2]
    blk = next(b for b in fp["bits"] if b["bits"] == bits)
    e_ln = blk["select"]["lognormal"]["format"]
    recs = {r["layer"]: r for r in fp["per_layer"] if r["bits"] == bits and r["format"] == e_ln}
    rows = []
    for name, choice in blk["layer_choice"].items():
        r = recs[name]
        rows.append([name, f"{r['sigma']:.3f}", choice["lognormal"], choice["empirical"],
                     choice["held_out_best"], f"{r['ln_pred']:.4f}", f"{r['ln_meas']:.4f}",
                     f"{r['emp_pred']:.4f}", f"{r['emp_meas']:.4f}"])
    out += ["", f"per layer, FP{bits} (errors at the model-wide lognormal E* {e_ln}): "
            "each side's own E*, and the split with the least held-out error",
            format_table(["layer", "sigma", "ln E*", "emp E*", "held-out best", "ln pred",
                          "ln meas", "emp pred", "emp meas"], rows)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# block formats


def _block_errors(x: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    """(mean |q - x| / |x| over finite non-zeros, sum (q - x)^2 / sum x^2 over finite values)."""
    fin = torch.isfinite(x)
    nz = fin & (x != 0)
    xd, qd = x.double(), q.double()
    rel = ((qd - xd).abs() / xd.abs())[nz].mean()
    d2 = torch.where(fin, (qd - xd) ** 2, 0.0).sum()
    x2 = torch.where(fin, xd * xd, 0.0).sum()
    return float(rel), float(d2 / x2) if float(x2) > 0 else math.nan


def block_check(layers, formats=DEFAULT_BLOCK_FORMATS, roundings=("nearest", "stochastic"), *,
                seed: int = 0, progress: bool = False) -> dict:
    """Predicted vs measured error of block formats on each layer's last tensor.

    Per layer, (mu, sigma), the zero fraction z and the largest finite magnitude are fitted on
    the tensor (``fit_lognormal``). Prediction: ``expected_block_error`` at that (mu, sigma), z
    (a non-zero element's block holds K - 1 ~ Binomial(n - 1, 1 - z) other non-zeros) and, for
    a per-tensor scale (NVFP4), the tensor's own amax. Measurement: ``quantize_block`` of the
    tensor as captured, flattened in memory order (``meas``: blocks of consecutive elements;
    a random subsample when the capture kept one, which is iid like the model) and of a random
    permutation of it (``shuf``: blocks of iid draws of the tensor's values, the model's
    within-block independence, so the remaining gap is the lognormal fit alone). 2-D tiles are
    measured as 1-D blocks of the same element count (for iid elements they are the same).
    Errors: mean relative error over finite non-zeros (``rel``) and sum (q - x)^2 / sum x^2
    over finite values (``nmse``; the lognormal's E x^2 is dominated by values beyond the
    largest one seen once sigma >~ 2, so expect ``nmse`` to disagree there).
    """
    from gradcomp.numerics.block import BlockFormat, quantize_block
    from gradcomp.numerics.block_error import expected_block_error

    fmts = [BlockFormat.from_name(f) if isinstance(f, str) else f for f in formats]
    if not fmts:
        raise ValueError("formats is empty: name at least one block format")
    roundings = [require_choice(r, "roundings", ("nearest", "stochastic")) for r in roundings]
    if not roundings:
        raise ValueError("roundings is empty: use 'nearest' and/or 'stochastic'")
    g = torch.Generator().manual_seed(seed)
    series = group_layers(layers)
    shapes = {}
    for name, t in layers:
        shapes[name] = tuple(t.shape)
    per_layer = []
    bar = tqdm(total=len(series) * len(fmts) * len(roundings), desc="block formats: layers",
               disable=not progress, leave=False)
    for name, ts in series.items():
        x = ts[-1].float()
        fit = fit_lognormal(x)
        if int(fit.count) < 2 or not float(fit.sigma) > 0:
            bar.update(len(fmts) * len(roundings))
            continue
        mu, sigma = float(fit.mu), float(fit.sigma)
        zf, amax = float(fit.zero_fraction), float(fit.amax)
        xs = x[torch.randperm(x.numel(), generator=g)]
        for bf in fmts:
            flat = bf.replace(block=(bf.block_numel,), dims=None)
            for rnd in roundings:
                bar.update(1)
                pred = expected_block_error(bf, sigma, mu, rnd, zero_fraction=min(zf, 1 - 1e-12),
                                            tensor_amax=amax)
                meas = _block_errors(x, quantize_block(x, flat, rnd, generator=g))
                shuf = _block_errors(xs, quantize_block(xs, flat, rnd, generator=g))
                per_layer.append({
                    "layer": name, "format": bf.name, "rounding": rnd, "mu": mu, "sigma": sigma,
                    "zero_fraction": zf, "numel": x.numel(),
                    "layout": "tensor" if len(shapes[name]) > 1 else "sample",
                    "pred_rel": pred.relative, "meas_rel": meas[0], "shuf_rel": shuf[0],
                    "pred_nmse": pred.nmse, "meas_nmse": meas[1], "shuf_nmse": shuf[1],
                })
    bar.close()
    if not per_layer:
        raise ValueError("no layer has two finite non-zero values to fit")

    def gap(p, m):
        return abs(p - m) / m if m > 0 else math.nan

    def median(v):
        v = sorted(x for x in v if not math.isnan(x))
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    summary = []
    for bf in fmts:
        for rnd in roundings:
            recs = [r for r in per_layer if r["format"] == bf.name and r["rounding"] == rnd]
            row = {"format": bf.name, "rounding": rnd}
            for m in ("rel", "nmse"):
                row[f"pred_{m}"] = sum(r[f"pred_{m}"] for r in recs) / len(recs)
                for side in ("meas", "shuf"):
                    row[f"{side}_{m}"] = sum(r[f"{side}_{m}"] for r in recs) / len(recs)
                    row[f"{side}_{m}_gap"] = median([gap(r[f"pred_{m}"], r[f"{side}_{m}"])
                                                     for r in recs])
            summary.append(row)
    overall = {f"{side}_{m}_gap": median([gap(r[f"pred_{m}"], r[f"{side}_{m}"])
                                          for r in per_layer])
               for side in ("meas", "shuf") for m in ("rel", "nmse")}
    return {"layers": len(per_layer) // (len(fmts) * len(roundings)),
            "formats": [bf.name for bf in fmts], "roundings": roundings,
            "median_gap": overall, "summary": summary, "per_layer": per_layer}


def block_tables(res: dict, per_layer: bool = True) -> str:
    """Markdown: per format and rounding the mean predicted / measured error over layers and the
    median |pred - meas| / meas, the one-line summary, and (``per_layer``) one row per layer."""
    from gradcomp.apps.tables import format_table

    og = res["median_gap"]
    out = [f"block formats: predicted (lognormal at each layer's fit) vs measured error over "
           f"{res['layers']} layers; meas = the tensor as captured, shuf = its values shuffled "
           "into iid blocks; gap = median over layers of |pred - meas| / meas",
           "summary: median |pred - meas| / meas of the relative error "
           f"{100 * og['meas_rel_gap']:.1f}% (shuffled {100 * og['shuf_rel_gap']:.1f}%), of the "
           f"nMSE {100 * og['meas_nmse_gap']:.1f}% (shuffled {100 * og['shuf_nmse_gap']:.1f}%)"]
    head = ["format", "rounding", "rel pred", "rel meas", "rel shuf", "gap %", "gap shuf %",
            "nmse pred", "nmse meas", "nmse gap %"]
    rows = [[r["format"], r["rounding"], f"{r['pred_rel']:.4f}", f"{r['meas_rel']:.4f}",
             f"{r['shuf_rel']:.4f}", f"{100 * r['meas_rel_gap']:.1f}",
             f"{100 * r['shuf_rel_gap']:.1f}", f"{r['pred_nmse']:.3g}", f"{r['meas_nmse']:.3g}",
             f"{100 * r['meas_nmse_gap']:.1f}"] for r in res["summary"]]
    out.append(format_table(head, rows))
    if per_layer:
        rows = [[r["layer"], r["format"], r["rounding"], f"{r['sigma']:.3f}",
                 f"{r['zero_fraction']:.3f}", f"{r['pred_rel']:.4f}", f"{r['meas_rel']:.4f}",
                 f"{r['shuf_rel']:.4f}", f"{r['pred_nmse']:.3g}", f"{r['meas_nmse']:.3g}"]
                for r in res["per_layer"]]
        out += ["", "per layer: relative error and nMSE, predicted vs measured",
                format_table(["layer", "format", "rounding", "sigma", "zeros", "rel pred",
                              "rel meas", "rel shuf", "nmse pred", "nmse meas"], rows)]
    return "\n".join(out)


def plot_block_check(res: dict, path) -> None:
    """Measured vs predicted relative error, one point per (layer, format, rounding): filled =
    the tensor as captured, open = shuffled; log-log with the diagonal. Saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["roundings"]), figsize=(5.5 * len(res["roundings"]), 4.8),
                             squeeze=False)
    for ax, rnd in zip(axes[0], res["roundings"]):
        recs = [r for r in res["per_layer"] if r["rounding"] == rnd]
        for k, fmt in enumerate(res["formats"]):
            sel = [r for r in recs if r["format"] == fmt]
            color = f"C{k}"
            ax.scatter([r["pred_rel"] for r in sel], [r["meas_rel"] for r in sel], s=18,
                       color=color, label=fmt)
            ax.scatter([r["pred_rel"] for r in sel], [r["shuf_rel"] for r in sel], s=18,
                       facecolors="none", edgecolors=color)
        vals = [v for r in recs for v in (r["pred_rel"], r["meas_rel"], r["shuf_rel"]) if v > 0]
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted mean relative error (lognormal fit)")
        ax.set_ylabel("measured (filled: as captured, open: shuffled)")
        ax.set_title(f"block formats, {rnd} rounding: {res['layers']} layers")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
