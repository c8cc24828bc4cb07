"""Evaluation helpers shared by the training loop, the experiments and the CLI commands.

* :func:`evaluate`: loss and accuracy of a model over a loader (classifiers and language
  models).
* :func:`resolve_device`: a device name ("auto", "cpu", "cuda:1") as a usable ``torch.device``.
* :func:`evaluate_sparsity`: required vs achieved sparsity (and encoded size) of the pruning
  threshold methods on captured or synthetic layers (``gradcomp sparsity`` and ``fitcheck``).
* :func:`synthetic_layers`: signed lognormal stand-ins for captured neural gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gradcomp.apps.text import flatten_logits
from gradcomp.compressors.encoding import encode_pruned
from gradcomp.compressors.pruning import Pruner, topk_threshold
from gradcomp.numerics.fit import LayerStats, fit_lognormal
from gradcomp.numerics.random import sample_values

__all__ = [
    "evaluate",
    "resolve_device",
    "evaluate_sparsity",
    "synthetic_layers",
    "group_layers",
    "DEFAULT_TARGETS",
    "DEFAULT_METHODS",
]

DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_METHODS = ("lognormal", "empirical", "calibrated", "atp", "topk_stochastic")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU; otherwise ``torch.device(device)``, which
    must be available (ValueError naming the device otherwise)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over a loader; one host sync at the end.

    A language model's (B, T, V) logits with (B, T) targets count every position: the loss is
    the mean next-token cross-entropy over all B*T predictions and the accuracy the fraction of
    positions whose argmax is the next token (``flatten_logits``)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out, y = flatten_logits(model(x), y)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += y.numel()
    model.train(was_training)
    if n == 0:
        return float("nan"), float("nan")
    return float(loss_sum) / n, float(correct) / n


def group_layers(layers: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """{name: [tensors in order]} (flattened), the time series of each layer."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in layers:
        out.setdefault(name, []).append(t.detach().reshape(-1))
    return out


def synthetic_layers(n_layers: int = 8, numel: int = 50_000, seed: int = 0):
    """Signed lognormal tensors with sigma in [1, 4] and zero fractions in [0, 0.5] (for tests)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_layers):
        mu = -12 + 6 * float(torch.rand((), generator=g))
        sigma = 1 + 3 * float(torch.rand((), generator=g))
        z = 0.5 * float(torch.rand((), generator=g))
        mag = torch.exp(mu + sigma * torch.randn(numel, generator=g))
        sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
        x = mag * sign * (torch.rand(numel, generator=g) >= z)
        out.append((f"layer{i}", x))
    return out


def evaluate_sparsity(layers: Sequence[tuple[str, torch.Tensor]], targets=DEFAULT_TARGETS,
                      methods=DEFAULT_METHODS, *, sample_size: int | None = 16384, seed: int = 0,
                      encode: bool = True, progress: bool = False) -> dict:
    """Prune every layer at every target with every method; measure achieved sparsity and size.

    ``layers`` is a list of (name, tensor). A name repeated (the same layer captured at several
    steps) is a time series: every method is evaluated on its *last* tensor, and the calibrated
    method is refreshed on each tensor in order before that (as during training); with a single
    tensor it is refreshed three times on it (in-sample, flagged in the result). Samples for
    'empirical' / 'atp' are ``sample_size`` values drawn with replacement (all values when the
    layer is smaller). Returns a dict with per-layer records and per (method, target) summaries:
    mean achieved sparsity, mean and worst-layer |achieved - target|, mean signed error and the
    element-weighted encoded bits per element.
    """
    groups = group_layers(layers)
    if not groups:
        raise ValueError("layers is empty: nothing to evaluate")
    g = torch.Generator().manual_seed(seed)
    per_layer, summary = [], []
    in_sample = all(len(v) == 1 for v in groups.values())
    bar = tqdm(total=len(methods) * len(targets), desc="sparsity: methods x targets",
               disable=not progress, leave=False)
    for method in methods:
        for target in targets:
            bar.update(1)
            errs, achieved_all, bits, elems = [], [], 0.0, 0
            for name, series in groups.items():
                p = Pruner(target, method)
                history = series if len(series) > 1 or method != "calibrated" else series * 3
                if method != "calibrated":
                    history = history[-1:]
                for t in history:
                    p.update(LayerStats(fit_lognormal(t), sample_values(t, sample_size, g)))
                    y = p(t, g)
                x = history[-1]
                achieved = float(p.metrics()["sparsity"])
                rec = {"layer": name, "method": method, "target": target, "numel": x.numel(),
                       "achieved": achieved, "error": achieved - target}
                if encode:
                    a = p.threshold if p.threshold is not None else topk_threshold(x, target)
                    nbytes = len(encode_pruned(y, float(a)))
                    rec["bits_per_element"] = 8 * nbytes / x.numel()
                    bits += 8 * nbytes
                    elems += x.numel()
                per_layer.append(rec)
                errs.append(achieved - target)
                achieved_all.append(achieved)
            worst = max(range(len(errs)), key=lambda i: abs(errs[i]))
            summary.append({
                "method": method, "target": target,
                "mean_achieved": sum(achieved_all) / len(errs),
                "min_achieved": min(achieved_all), "max_achieved": max(achieved_all),
                "mean_abs_error": sum(abs(e) for e in errs) / len(errs),
                "mean_error": sum(errs) / len(errs),
                "worst_abs_error": abs(errs[worst]), "worst_layer": list(groups)[worst],
                "bits_per_element": bits / elems if elems else math.nan,
            })
    bar.close()
    return {"layers": len(groups), "methods": list(methods), "targets": list(targets),
            "sample_size": sample_size, "calibration_in_sample": in_sample,
            "summary": summary, "per_layer": per_layer}
