import json

import pytest
import torch

from gradcomp.apps.recipes import get_recipe, list_recipes, load_recipe
from gradcomp.apps.train import CheckpointMismatchError, TrainConfig, train

SMALL = dict(model="cnn", dataset="synthetic", batch_size=32, width=4, progress=False,
             max_steps_per_epoch=6, lr=0.05)


def _params(out):
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    return ck["model"], ck["optimizer"], ck["compressor"]


@pytest.mark.parametrize("recipe", ["prune-0.8-fp6", "fp4-dynamic"])
def test_resume_is_bit_exact(tmp_path, recipe):
    full = train(TrainConfig(recipe=recipe, epochs=2, out=str(tmp_path / "a"), **SMALL))
    # "killed" after epoch 1: a run configured for 2 epochs whose loop stopped after the first
    part = TrainConfig(recipe=recipe, epochs=2, out=str(tmp_path / "b"), **SMALL)
    import gradcomp.apps.train as tr

    class Stop(Exception):
        pass

    real = tr._write_metrics

    def kill_after_first(out, history, cfg, r):
        real(out, history, cfg, r)
        raise Stop

    tr._write_metrics = kill_after_first
    try:
        with pytest.raises(Stop):
            train(part)
    finally:
        tr._write_metrics = real
    resumed = train(TrainConfig(recipe=recipe, epochs=2, out=str(tmp_path / "b"), resume=True,
                                **SMALL))
    ma, oa, ca = _params(tmp_path / "a")
    mb, ob, cb = _params(tmp_path / "b")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert full.history[-1]["test_accuracy"] == resumed.history[-1]["test_accuracy"]
    assert full.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]
    assert len(resumed.history) == 2


def test_resume_from_other_recipe_raises(tmp_path):
    train(TrainConfig(recipe="fp6", epochs=1, out=str(tmp_path), **SMALL))
    with pytest.raises(CheckpointMismatchError, match="recipe"):
        train(TrainConfig(recipe="prune-0.8", epochs=1, out=str(tmp_path), resume=True, **SMALL))
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(epochs=1, out=str(tmp_path / "none"), resume=True, **SMALL))


def test_metrics_files_written(tmp_path):
    res = train(TrainConfig(recipe="prune-0.8", epochs=2, out=str(tmp_path), **SMALL))
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "sparsity" in rows[0] and "bits_per_element" in rows[0]
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert js["config"]["recipe"]["name"] == "prune-0.8" and len(js["history"]) == 2
    assert res.history[-1]["sparsity"] == pytest.approx(0.8, abs=0.08)  # tiny layers: loose


def test_builtin_recipes_are_valid_and_round_trip():
    from gradcomp.apps.recipes import recipe_from_dict

    for name in list_recipes():
        r = get_recipe(name)
        assert recipe_from_dict(r.to_dict()) == r


def test_recipe_files(tmp_path):
    (tmp_path / "r.toml").write_text(
        'description = "mine"\n[compression]\nmetrics_every = 2\n'
        '[compression.prune]\nsparsity = 0.7\nmethod = "empirical"\n'
    )
    r = load_recipe(tmp_path / "r.toml")
    assert r.name == "r" and r.compression.prune.sparsity == 0.7
    assert r.compression.prune.method == "empirical"
    (tmp_path / "bad.json").write_text(json.dumps({"compression": {"prune": {"sparsty": 0.7}}}))
    with pytest.raises(ValueError, match="sparsty.*allowed: sparsity"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"compression": {"prune": {"method": "x"}}}))
    with pytest.raises(ValueError, match="prune.method must be one of"):
        load_recipe(tmp_path / "bad2.json")
    with pytest.raises(ValueError, match="unknown recipe 'fp3'; did you mean fp8, .*fp4"):
        get_recipe("fp3")


def test_bad_train_config():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
