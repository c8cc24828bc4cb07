import json

import pytest
import torch

from gradcomp.apps.recipes import get_recipe, list_recipes, load_recipe
from gradcomp.apps.train import CheckpointMismatchError, TrainConfig, train

SMALL = dict(model="cnn", dataset="synthetic", batch_size=32, width=4, progress=False,
             max_steps_per_epoch=6, lr=0.05)


def _params(out):
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    return ck["model"], ck["optimizer"], ck["ranks"][0]["compressor"]


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


# ------------------------------------------------------------------ checkpoints and arguments

TINY = dict(model="mlp", dataset="digits", batch_size=64, width=16, progress=False,
            max_steps_per_epoch=3, max_test=64, lr=0.05)


def test_unreadable_checkpoint_offers_previous_or_fresh_start(tmp_path):
    from gradcomp.apps.train import PREVIOUS_CHECKPOINT, CheckpointUnreadableError

    train(TrainConfig(epochs=2, out=str(tmp_path), **TINY))
    ck = tmp_path / "checkpoint.pt"
    assert (tmp_path / PREVIOUS_CHECKPOINT).exists()  # each save keeps the one before
    good = ck.read_bytes()
    cases = {"truncated": good[: len(good) // 2], "zero-byte": b"",
             "random bytes": bytes(range(256)) * 8}
    for what, content in cases.items():
        ck.write_bytes(content)
        with pytest.raises(CheckpointUnreadableError, match="unreadable") as e:
            train(TrainConfig(epochs=2, out=str(tmp_path), resume=True, **TINY))
        msg = str(e.value)
        assert "\n" not in msg and PREVIOUS_CHECKPOINT in msg and "--overwrite" in msg, what
    ck.unlink()
    ck.mkdir()
    with pytest.raises(CheckpointUnreadableError, match="directory"):
        train(TrainConfig(epochs=2, out=str(tmp_path), resume=True, **TINY))


def test_existing_out_needs_resume_or_overwrite(tmp_path):
    train(TrainConfig(epochs=1, out=str(tmp_path), **TINY))
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(TrainConfig(epochs=1, out=str(tmp_path), **TINY))
    res = train(TrainConfig(epochs=1, out=str(tmp_path), overwrite=True, **TINY))
    assert len(res.history) == 1


def test_first_checkpoint_write_killed_restarts_from_scratch(tmp_path, capsys):
    # a kill during the very first save leaves only the temporary file
    full = train(TrainConfig(epochs=2, out=str(tmp_path / "a"), **TINY))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.pt.tmp").write_bytes(b"\x80\x02partial")
    res = train(TrainConfig(epochs=2, out=str(tmp_path / "b"), resume=True, **TINY))
    assert "starting from scratch" in capsys.readouterr().out
    assert res.history == [dict(r, seconds=s["seconds"]) for r, s in
                           zip(full.history, res.history)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(TrainConfig(epochs=2, out=str(tmp_path / "none"), resume=True, **TINY))


def test_identity_includes_data_parallel_setup():
    ident = TrainConfig(comm="topk", comm_options={"ratio": 0.1}).identity(world_size=2)
    assert ident["world_size"] == 2 and ident["comm"] == "topk"
    assert ident["comm_options"] == {"ratio": 0.1}
    assert TrainConfig().identity()["world_size"] == 1


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N, mps or auto"):
        TrainConfig(device="tpu")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_steps_per_epoch must be an int >= 1"):
            TrainConfig(max_steps_per_epoch=bad)
    with pytest.raises(ValueError, match="timeout"):
        TrainConfig(timeout=0)


def test_out_is_a_file_fails_before_training(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(TrainConfig(epochs=1, out=str(f), **TINY))


def test_batch_larger_than_split(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 5000 is larger than the training split"):
        train(TrainConfig(epochs=1, **{**TINY, "batch_size": 5000}))
