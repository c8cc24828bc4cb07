"""Kill -9 at any moment, then --resume: the run ends bit for bit where an uninterrupted one does.

Single process (subprocesses killed with os._exit, the effect of kill -9) for two recipes and
three kill points, and for two per-GEMM recipes (NVFP4 with RHT, LUQ) killed mid-epoch, whose
stochastic-rounding generators and call counters must be in the checkpoint; 2 data-parallel
workers (gloo, CPU) for the top-k and QSGD communication hooks, whose error-feedback memory and
generators must be in the checkpoint.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from gradcomp.apps.distributed import launch_local
from gradcomp.apps.recipes import get_recipe
from gradcomp.apps.train import CheckpointMismatchError, StepHook, TrainConfig, train

STEPS = 4  # steps per epoch
SMALL = dict(model="cnn", dataset="digits", batch_size=64, width=4, progress=False,
             max_steps_per_epoch=STEPS, max_test=64, lr=0.05, epochs=3)

_CHILD = r"""
import json, os, sys
import torch
import gradcomp.apps.train as tr
cfg = tr.TrainConfig(**json.loads(sys.argv[1]))
kill_step, kill_save = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))  # the parent's thread count: same float reductions

class Kill(tr.StepHook):
    def around(self, step):
        if step == kill_step:
            os._exit(9)  # as kill -9: no cleanup, no flush
        return super().around(step)

real_save, saves = torch.save, [0]
def save(obj, path, *a, **k):  # the kill_save-th checkpoint write dies half-way
    saves[0] += 1
    if saves[0] == kill_save:
        with open(path, "wb") as f:
            f.write(b"\x80\x02partial")
        os._exit(9)
    return real_save(obj, path, *a, **k)
tr.torch.save = save
tr.train(cfg, Kill())
"""


def _run_killed(cfg: TrainConfig, kill_step: int = -1, kill_save: int = 0) -> int:
    fields = {k: v for k, v in cfg.__dict__.items() if k != "recipe"} | {"recipe": cfg.recipe}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), GRADCOMP_COMPILE="0")
    return subprocess.run([sys.executable, "-c", _CHILD, json.dumps(fields), str(kill_step),
                           str(kill_save), str(torch.get_num_threads())], env=env,
                          timeout=300).returncode


def _weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def _same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha = json.loads((a / "metrics.json").read_text())["history"]
    hb = json.loads((b / "metrics.json").read_text())["history"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ha] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in hb]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp6", "prune-0.8-emp"])
def test_single_process_kill9_resume_is_bit_exact(tmp_path, recipe):
    ref = tmp_path / "ref"
    train(TrainConfig(recipe=recipe, out=str(ref), **SMALL))
    points = {
        "mid-epoch": dict(kill_step=STEPS + 2),  # inside epoch 2
        "after a checkpoint": dict(kill_step=2 * STEPS),  # first step after epoch 2's save
        "during a write": dict(kill_save=2),  # the second checkpoint, half written
    }
    for name, kill in points.items():
        out = tmp_path / name.replace(" ", "_")
        cfg = TrainConfig(recipe=recipe, out=str(out), **SMALL)
        assert _run_killed(cfg, **kill) == 9, name
        train(TrainConfig(recipe=recipe, out=str(out), resume=True, **SMALL))
        _same_run(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["nvfp4-recipe", "luq-fp4"])
def test_per_gemm_recipe_kill9_resume_is_bit_exact(tmp_path, recipe):
    """Per-GEMM recipes draw stochastic rounding from the backward handle's generators and key
    the RHT signs on each layer's call counter; both live in the checkpoint, so a run killed
    mid-epoch resumes onto the same trajectory."""
    small = {**SMALL, "epochs": 2}
    ref, out = tmp_path / "ref", tmp_path / "killed"
    train(TrainConfig(recipe=recipe, out=str(ref), **small))
    # dies inside epoch 2, after epoch 1's checkpoint
    assert _run_killed(TrainConfig(recipe=recipe, out=str(out), **small), STEPS + 2) == 9
    train(TrainConfig(recipe=recipe, out=str(out), resume=True, **small))
    _same_run(ref, out)
    # the backward's rounding noise does reach the weights: the same run with another stream
    # (same init, same batches) ends elsewhere, so a resume that lost it could not match
    r = get_recipe(recipe)
    r = dataclasses.replace(r, backward=dataclasses.replace(r.backward, seed=r.backward.seed + 1))
    other = tmp_path / "other"
    train(TrainConfig(recipe=r, out=str(other), **small))
    wa, wb = _weights(ref), _weights(other)
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)


class KillAt(StepHook):
    """Every rank dies (os._exit, as kill -9) at the start of global step ``step``."""

    def __init__(self, step):
        self.step = step

    def around(self, step):
        if step == self.step:
            os._exit(9)
        return super().around(step)


DDP = dict(model="mlp", dataset="digits", batch_size=32, width=16, progress=False,
           max_steps_per_epoch=6, max_test=64, lr=0.05, epochs=3)


@pytest.mark.slow
@pytest.mark.parametrize("comm,options", [
    ("topk", {"ratio": 0.1}),
    ("qsgd", {"levels": 8, "bucket_size": 64}),
])
def test_two_workers_kill9_resume_is_bit_exact(tmp_path, comm, options):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    cfg = dict(DDP, comm=comm, comm_options=options)
    assert launch_local(TrainConfig(out=str(ref), **cfg), 2) == 0
    # both ranks die inside epoch 2, after epoch 1's checkpoint
    rc = launch_local(TrainConfig(out=str(out), **cfg), 2, hooks=[KillAt(8), KillAt(8)])
    assert rc != 0
    assert launch_local(TrainConfig(out=str(out), resume=True, **cfg), 2) == 0
    _same_run(ref, out)
    # the per-epoch and cumulative communication columns survive the resume
    hist = json.loads((out / "metrics.json").read_text())["history"]
    sent = [r["comm_bytes_sent"] for r in hist]
    assert sent == sorted(sent) and sent[0] < sent[1] < sent[2]
    assert sent[2] == sum(r["comm_bytes_epoch"] for r in hist)
    assert hist[-1]["comm_ratio_cumulative"] == pytest.approx(
        sum(r["comm_bytes_epoch"] * r["comm_ratio_epoch"] for r in hist) / sent[2])
    # another data-parallel setup (1 process instead of 2) is refused, naming the field
    with pytest.raises(CheckpointMismatchError, match="world_size"):
        train(TrainConfig(out=str(out), resume=True, **cfg))
