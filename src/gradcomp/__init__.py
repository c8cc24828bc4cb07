"""gradcomp: training neural networks with compressed gradients.

Layers (each imports only the ones below it):

* ``gradcomp.numerics``     pure functions on tensors: FP formats and rounding, lognormal fit,
                            closed forms (Eq. 4 error, Eq. 8 sparsity, cosine), KS tests.
* ``gradcomp.compressors``  stateful objects: scaling policies, pruners, quantizers, encoders,
                            communication compressors (QSGD, top-k + EF, ScaleCom).
* ``gradcomp.integration``  where compressors meet PyTorch: neural-gradient capture, model
                            wrapping (``compress_gradients``), DDP hooks, PACT/SAWB.
* ``gradcomp.apps``         data, models, recipes, training loop, CLI.

The names below are imported lazily so that ``import gradcomp`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FPFormat": "gradcomp.numerics.formats",
    "quantize_fp": "gradcomp.numerics.rounding",
    "quantize_fp_amax": "gradcomp.numerics.rounding",
    "fit_lognormal": "gradcomp.numerics.fit",
    "LognormalFit": "gradcomp.numerics.fit",
    "ks_table": "gradcomp.numerics.goodness",
    "expected_relative_error": "gradcomp.numerics.fp_error",
    "optimal_format": "gradcomp.numerics.fp_error",
    "lognormal_threshold": "gradcomp.numerics.sparsity",
    "LayerStats": "gradcomp.numerics.fit",
    "stochastic_prune": "gradcomp.numerics.pruning",
    "prune_quantize": "gradcomp.numerics.pruning",
    "prune_quantize_amax": "gradcomp.numerics.pruning",
    "set_compile": "gradcomp.numerics.kernels",
    "Pruner": "gradcomp.compressors.pruning",
    "FPQuantizer": "gradcomp.compressors.quantizer",
    "allocate_sparsity": "gradcomp.compressors.pruning",
    "capture_gradients": "gradcomp.integration.capture",
    "compress_gradients": "gradcomp.integration.wrap",
    "CompressionHandle": "gradcomp.integration.wrap",
    "CompressionConfig": "gradcomp.config",
    "QuantizeSpec": "gradcomp.config",
    "PruneSpec": "gradcomp.config",
    "SplitChoice": "gradcomp.config",
    "AmaxScaling": "gradcomp.config",
    "AuthorsScaling": "gradcomp.config",
    "OptimalScaling": "gradcomp.config",
    "EmpiricalScaling": "gradcomp.config",
    "LossScaling": "gradcomp.config",
    "NoScaling": "gradcomp.config",
    "quantize_forward": "gradcomp.integration.forward",
    "retain_freed_memory": "gradcomp.apps.runtime",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradcomp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
