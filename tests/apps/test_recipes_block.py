"""Block-format and per-GEMM recipes: file round trips, strict fields, short training runs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gradcomp.apps.recipes import get_recipe, load_recipe, recipe_from_dict
from gradcomp.apps.train import TrainConfig, train
from gradcomp.integration.gemm import BackwardQuantConfig
from gradcomp.numerics import kernels
from gradcomp.numerics.block import BlockFormat

SMALL = dict(model="cnn", dataset="synthetic", batch_size=32, width=4, progress=False,
             max_steps_per_epoch=2, lr=0.05)
BLOCK = ["mxfp8", "mxfp8-e5m2", "mxfp6", "mxfp4", "nvfp4", "mxfp4-rn", "nvfp4-rn"]
GEMM = ["luq-fp4", "luq-fp4-smp", "nvfp4-recipe", "quartet-mxfp4", "fp4-all-the-way"]


@pytest.fixture(autouse=True)
def _eager():
    kernels.set_compile(False)  # the fused path is tested in tests/numerics; keep these fast
    yield
    kernels.set_compile(None)


def test_block_quantize_spec_round_trips_through_toml(tmp_path):
    p = tmp_path / "mx.toml"
    p.write_text('[compression.quantize]\nformat = "mxfp6_e2m3"\nrounding = "stochastic"\n'
                 '[compression]\nmetrics_every = 1\n')
    r = load_recipe(p)
    q = r.compression.quantize
    assert q.format == BlockFormat.from_name("mxfp6_e2m3") and q.is_block
    assert recipe_from_dict(r.to_dict()) == r
    # a non-standard block format by its generic name, and the "format" block layout
    p.write_text('[compression.quantize]\nformat = "e4m3fn:16:e8m0:rceil"\n'
                 'block_dims = "format"\nscaling = "none"\n')
    q = load_recipe(p).compression.quantize
    assert q.format.block == (16,) and q.format.rule == "rceil" and q.block_dims == "format"
    assert load_recipe(p) == recipe_from_dict(load_recipe(p).to_dict())


def test_block_spec_refuses_per_layer_scaling_and_bad_names(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[compression.quantize]\nformat = "nvfp4"\nscaling = "per_layer"\n')
    with pytest.raises(ValueError, match=r"bad\.toml.*scaled per block.*'amax' \(the default\) "
                                         r"or 'none'.*per_layer"):
        load_recipe(p)
    p.write_text('[compression.quantize]\nformat = "mxfp5"\n')
    with pytest.raises(ValueError, match=r"quantize\.format.*mxfp8_e4m3"):
        load_recipe(p)
    p.write_text('[compression.quantize]\nformat = "e5m2"\nblock_dims = "format"\n')
    with pytest.raises(ValueError, match="block_dims applies to block formats only"):
        load_recipe(p)


def test_backward_section_round_trips_and_is_strict(tmp_path):
    for name in GEMM:
        r = get_recipe(name)
        assert isinstance(r.backward, BackwardQuantConfig)
        assert recipe_from_dict(r.to_dict()) == r, name
        assert "Left out" in r.description or "omissions" in r.description, name
    p = tmp_path / "b.toml"
    p.write_text('[backward]\nkeep_first_last = true\n'
                 '[backward.default.wgrad_grad]\nkind = "block"\nformat = "nvfp4"\n'
                 '[backward.default.rht]\nblock = 16\n')
    b = load_recipe(p).backward
    assert b.keep_first_last and b.default.wgrad_grad.format == BlockFormat.from_name("nvfp4")
    assert b.default.dgrad_grad.kind == "none" and b.default.rht.block == 16
    p.write_text('[backward.default.wgrad_grad]\nkind = "block"\nformt = "nvfp4"\n')
    with pytest.raises(ValueError, match=r"b\.toml.*formt in backward\.default\.wgrad_grad; "
                                         "allowed: kind, format"):
        load_recipe(p)
    p.write_text('[backward.default.dgrad_grad]\nkind = "block"\nformat = "e2m1fn"\n')
    with pytest.raises(ValueError, match=r"backward\.default\.dgrad_grad: .*name must be one of"):
        load_recipe(p)
    p.write_text('[backward]\nkeep_lasst = 2\n')
    with pytest.raises(ValueError, match="keep_lasst in backward; allowed: default, rules"):
        load_recipe(p)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_block_recipe_trains_and_reports_block_metrics(tmp_path, name):
    r = get_recipe(name)
    r = dataclasses.replace(r, compression=dataclasses.replace(r.compression, metrics_every=1))
    res = train(TrainConfig(recipe=r, epochs=2, out=str(tmp_path), **SMALL, max_train=256))
    row = res.history[-1]
    bf = BlockFormat.from_name(r.compression.quantize.format.name)
    assert row["format"] == bf.name
    assert row["bits_per_element"] == pytest.approx(bf.bits_per_element)  # 4.25 / 4.5
    for key in ("underflow", "overflow"):  # overflow = saturated elements of the blocks
        assert math.isfinite(row[key]) and 0 <= row[key] < 0.5, (key, row[key])
    assert math.isfinite(row["train_loss"])


@pytest.mark.parametrize("name", GEMM)
def test_per_gemm_recipe_builds_and_runs_two_steps(tmp_path, name):
    res = train(TrainConfig(recipe=name, epochs=1, out=str(tmp_path), **SMALL, max_train=128))
    assert math.isfinite(res.history[-1]["train_loss"])
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state = ck["ranks"][0]["backward"]  # the backward handle's generators and call counters
    assert state is not None and all(c == 2 for c in state["calls"].values())


@pytest.mark.parametrize("name,weight,act", [("fp4-all-the-way", "nvfp4", "nvfp4"),
                                             ("nvfp4-recipe", "nvfp4_2d", "nvfp4"),
                                             ("quartet-mxfp4", "mxfp4", "mxfp4")])
def test_fp4_recipes_quantize_the_forward_in_their_block_format(tmp_path, name, weight, act):
    from gradcomp.apps.models import build_model
    from gradcomp.integration.forward import quantize_forward

    r = get_recipe(name)
    f = r.forward
    assert (f.weight_bits, f.act_bits, f.first_last_bits) == (None, None, None)
    assert (f.weight_format, f.act_format) == (weight, act)
    # round trip through a JSON recipe file (TOML has no null for the *_bits)
    p = tmp_path / "r.json"
    p.write_text(__import__("json").dumps(r.to_dict()))
    assert load_recipe(p) == r
    # what train installs: the hidden layers, not the first and the last
    model = build_model("cnn", in_channels=1, num_classes=10, width=4)
    h = quantize_forward(model, **f.kwargs())
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                    torch.nn.Linear))]
    assert set(h.layers) == set(layers[1:-1])
    assert all(s.weight_format.name == weight and s.act_format.name == act
               for s in h.layers.values())
    h.remove()


def test_forward_spec_block_formats_are_strict(tmp_path):
    p = tmp_path / "f.json"
    p.write_text('{"forward": {"weight_bits": null, "weight_format": "nvfp5"}}')
    with pytest.raises(ValueError, match=r"f\.json.*forward\.weight_format: name must be one of"):
        load_recipe(p)
    p.write_text('{"forward": {"act_format": "mxfp4"}}')
    with pytest.raises(ValueError, match=r"forward\.act_bits and forward\.act_format exclude "
                                         "each other.*set act_bits to null"):
        load_recipe(p)
    p.write_text('{"forward": {"act_bits": null, "act_format": 4}}')
    with pytest.raises(TypeError, match="forward.act_format must be a block format name"):
        load_recipe(p)
    p.write_text('{"forward": {"act_bits": null, "act_format": "mxfp4"}}')
    r = load_recipe(p)
    assert r.forward.act_format == "mxfp4" and r.forward.weight_bits == 4
    assert recipe_from_dict(r.to_dict()) == r
