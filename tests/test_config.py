"""The user-facing configuration: exports, defaults, validation at construction."""

from __future__ import annotations

import pytest

import gradcomp
from gradcomp import (
    AmaxScaling,
    CompressionConfig,
    LossScaling,
    OptimalScaling,
    PruneSpec,
    QuantizeSpec,
    SplitChoice,
    compress_gradients,
)
from gradcomp.compressors.pruning import Pruner
from gradcomp.numerics.formats import FPFormat


def test_exports_and_defaults_are_the_measured_best():
    assert callable(compress_gradients) and gradcomp.CompressionConfig is CompressionConfig
    cfg = CompressionConfig()
    assert cfg.types == "auto" and cfg.refresh_every == 100 and cfg.refresh_each_epoch
    q = QuantizeSpec()
    assert q.scaling == AmaxScaling() and q.format == SplitChoice(bits=6)
    # Pruner and PruneSpec agree
    assert Pruner().method == PruneSpec().method == "empirical"
    assert Pruner().sparsity == PruneSpec().sparsity


def test_modes_from_names_and_objects():
    assert QuantizeSpec(scaling="per_layer_optimal").scaling == OptimalScaling()
    q = QuantizeSpec(scaling="dynamic", scaling_options={"init_scale": 8.0})
    assert q.scaling == LossScaling(dynamic=True, scale=8.0) and q.shared_scaling
    assert QuantizeSpec(format="e4m3").format == FPFormat.from_name("e4m3")
    assert QuantizeSpec(format="1-4-1", semantics="ieee").format == FPFormat.ieee(4, 1)
    assert QuantizeSpec(bits=4, exp_offset=-1).format == SplitChoice(4, -1)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(scaling="amax", scaling_options={"margn": 1}), TypeError, "margn"),
    (dict(scaling="bogus"), ValueError, "quantize.scaling must be one of"),
    (dict(format="e9m9"), ValueError, "exp_bits"),
    (dict(format="e5m2", bits=6), ValueError, "'optimal' only"),
    (dict(bits=2), ValueError, "bits must be in"),
    (dict(rounding="up"), ValueError, "quantize.rounding"),
    (dict(scaling=AmaxScaling(), scaling_options={"margin": 1}), ValueError, "by name"),
])
def test_quantize_spec_fails_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        QuantizeSpec(**kw)


def test_a_bad_mode_fails_when_the_mode_is_built():
    with pytest.raises(ValueError, match="scale must be > 0"):
        LossScaling(scale=-1.0)
    with pytest.raises(ValueError, match="history"):
        AmaxScaling(delayed=True, history=0)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(types=("attention",)), ValueError, "types must be one of"),
    (dict(types=()), ValueError, "non-empty"),
    (dict(refresh_every=0), ValueError, "refresh_every"),
    (dict(sample_size=True), ValueError, "sample_size"),
    (dict(names="conv1"), TypeError, "names must be a tuple"),
    (dict(skip_first=1), TypeError, "skip_first must be true or false"),
    (dict(quantize="fp6"), TypeError, "QuantizeSpec"),
])
def test_compression_config_fails_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        CompressionConfig(**kw)


def test_prune_spec_types():
    with pytest.raises(TypeError, match="prune.sparsity must be a number, got str"):
        PruneSpec(sparsity="0.8")
    with pytest.raises(ValueError, match="heterogeneous needs"):
        PruneSpec(method="atp", heterogeneous=True)


def test_to_dict_is_plain_data_and_equal_configs_compare_equal():
    cfg = CompressionConfig(quantize=QuantizeSpec(bits=5, scaling="amax_delayed"),
                            prune=PruneSpec(0.9, "lognormal"), types=("conv", "linear"))
    d = cfg.to_dict()
    assert d["quantize"]["scaling"] == "amax_delayed" and d["quantize"]["bits"] == 5
    assert d["types"] == ["conv", "linear"]
    assert CompressionConfig(quantize=QuantizeSpec(**d["quantize"]),
                             prune=PruneSpec(**d["prune"]), types=tuple(d["types"])) == cfg
