"""Recipe files and names: errors that say what to do; recipes on models without convs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradcomp import compress_gradients
from gradcomp.apps.recipes import get_recipe, list_recipes, load_recipe


def test_wrong_typed_values_fail_when_read_naming_file_field_and_type(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[compression.prune]\nsparsity = "0.8"\n')
    with pytest.raises(TypeError, match=r"r\.toml.*prune\.sparsity must be a number, got str"):
        load_recipe(p)
    p.write_text('[compression]\nrefresh_every = "100"\n')
    with pytest.raises(ValueError, match=r"r\.toml.*refresh_every must be a positive int"):
        load_recipe(p)
    p.write_text('[compression.quantize]\nbits = "6"\n')
    with pytest.raises(TypeError, match=r"r\.toml.*bits must be an int"):
        load_recipe(p)
    p.write_text('[compression.prune]\nheterogeneous = 1\n')
    with pytest.raises(TypeError, match=r"r\.toml.*prune\.heterogeneous must be true or false"):
        load_recipe(p)
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"forward": {"weight_bits": "4"}}))
    with pytest.raises(TypeError, match=r"r\.json.*forward\.weight_bits must be an int"):
        load_recipe(j)


def test_malformed_files_and_extensions(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[compression\n")
    with pytest.raises(ValueError, match=r"broken\.toml: malformed TOML"):
        load_recipe(p)
    j = tmp_path / "broken.json"
    j.write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
        load_recipe(j)
    y = tmp_path / "r.yaml"
    y.write_text("a: 1\n")
    for call in (load_recipe, get_recipe):
        with pytest.raises(ValueError, match=r"unsupported extension '\.yaml'.*\.toml or \.json"):
            call(str(y))


def test_misspelled_recipe_suggests_close_names():
    with pytest.raises(ValueError) as exc:
        get_recipe("prune-0.8-emq")
    msg = str(exc.value)
    assert "did you mean prune-0.8-emp" in msg
    assert len(msg) < 400 and msg.count(",") < 10  # not all 120 names


def test_old_spelling_of_scaling_still_loads(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[compression.quantize]\nformat = "optimal"\nbits = 5\nscaling = "dynamic"\n'
                 '[compression.quantize.scaling_options]\ninit_scale = 1024.0\n')
    q = load_recipe(p).compression.quantize
    assert q.format.bits == 5 and q.scaling.dynamic and q.scaling.scale == 1024.0
    p.write_text('[compression.quantize]\nformat = "e4m3fn"\n'
                 'scaling = {policy = "amax", margin = 1.0}\n')
    q = load_recipe(p).compression.quantize
    assert q.format.name == "e4m3fn" and q.scaling.margin == 1.0
    p.write_text('[compression.quantize]\nscaling = "amax"\n'
                 '[compression.quantize.scaling_options]\nmargn = 1.0\n')
    with pytest.raises(TypeError, match="scaling_options for 'amax'.*margn"):
        load_recipe(p)


def test_recipes_round_trip_through_files(tmp_path):
    for name in ("fp6", "fp4-dynamic", "fp5-emp", "prune-0.9-het-emp", "topk-0.8", "w4a4-fp4"):
        r = get_recipe(name)
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(r.to_dict()))
        assert load_recipe(p).compression == r.compression, name
    assert len(list_recipes()) == 135  # 120 + 10 block-format + 5 per-GEMM recipes


@pytest.mark.parametrize("name", ["fp6", "prune-0.8-emp", "prune-0.8-het-emp", "topk-0.8"])
def test_recipes_on_a_model_without_convs_compress_the_hidden_linears(name):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 10))
    h = compress_gradients(m, get_recipe(name).compression)
    assert h.layers == ["1", "3"]  # never the classifier "5"
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    for _ in range(12):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        h.step(opt)
    assert h.active and torch.isfinite(loss)
    h.remove()


def test_no_layer_selected_says_what_to_do():
    with pytest.raises(ValueError, match="types=\\('linear',\\)"):
        compress_gradients(nn.Sequential(nn.Linear(4, 2)), get_recipe("fp6").compression)
