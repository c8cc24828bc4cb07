"""`gradcomp train --fsdp`: FSDP2 with the compressed reduce-scatter inside the training loop.

2 CPU ranks (gloo), tiny models on the digits set. Checked: FSDP with the dense reduce-scatter
trains bit for bit like DDP (neural-gradient compression and forward quantizers composed, so
their hooks must fire under ``fully_shard``); a kill -9 then --resume ends where the
uninterrupted run does (sharded checkpoints with the comm's error-feedback memory); DDP and FSDP
checkpoints are not resumed as each other; ranks that disagree refuse together; a run that asked
for compression and did not get it fails with one line per rank; bad ``--comm`` input is one
line before spawning.
"""

import json
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from gradcomp.apps.cli import main
from gradcomp.apps.distributed import launch_local
from gradcomp.apps.train import (
    DCP_CHECKPOINT,
    CheckpointMismatchError,
    StepHook,
    TrainConfig,
    train,
)

STEPS = 6  # steps per epoch
CNN = dict(model="cnn", dataset="digits", batch_size=32, width=4, progress=False,
           max_steps_per_epoch=STEPS, max_test=64, lr=0.05, epochs=2)
MLP = dict(model="mlp", dataset="digits", batch_size=32, width=16, progress=False,
           max_steps_per_epoch=STEPS, max_test=64, lr=0.05, epochs=3)


def _history(out):
    hist = json.loads((out / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def _fsdp_weights(out, tmp):
    """The unsharded model of an FSDP run's last checkpoint (DCP converted to one file)."""
    path = tmp / f"{out.name}.pt"
    dcp_to_torch_save(str(out / DCP_CHECKPOINT), str(path))
    return torch.load(path, weights_only=False)["model"]


def _rank_lines(err):
    return [ln for ln in err.splitlines() if ln.startswith("gradcomp train")]


@pytest.mark.slow
def test_fsdp_dense_trains_like_ddp_with_composed_recipe(tmp_path, capfd):
    # W4A4 forward (SAWB weights, PACT clips: 0-dim parameters FSDP cannot shard) + FP6 neural
    # gradients: the same float operations under DDP and FSDP, whose dense reduce of 2 ranks
    # (a + b) / 2 equals DDP's a / 2 + b / 2 exactly
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert launch_local(TrainConfig(recipe="w4a4-fp6", out=str(ddp), **CNN), 2) == 0
    assert launch_local(TrainConfig(recipe="w4a4-fp6", out=str(fsdp), fsdp=True, **CNN), 2) == 0
    hd, hf = _history(ddp), _history(fsdp)
    assert hf[-1]["bits_per_element"] == 6.0  # the neural-gradient compressor ran under FSDP
    assert hf[-1]["comm_ratio_cumulative"] == 1.0  # dense fp32 reduce-scatter, bytes counted
    comm = ("comm_bytes_epoch", "comm_bytes_sent", "comm_ratio_epoch", "comm_ratio_cumulative")
    assert [{k: v for k, v in r.items() if k not in comm} for r in hf] == \
        [{k: v for k, v in r.items() if k not in comm} for r in hd]
    wd = torch.load(ddp / "checkpoint.pt", weights_only=False)["model"]
    wf = _fsdp_weights(fsdp, tmp_path)
    assert wd.keys() == wf.keys() and any(k.endswith("pact_alpha") for k in wd)
    assert all(torch.equal(wd[k], wf[k]) for k in wd)
    # a DDP checkpoint is not resumed as FSDP, nor an FSDP one as DDP: refused naming the field
    capfd.readouterr()
    assert launch_local(TrainConfig(recipe="w4a4-fp6", out=str(ddp), fsdp=True, resume=True,
                                    **CNN), 2) == 2
    lines = _rank_lines(capfd.readouterr().err)
    assert len(lines) == 2 and all("fsdp (False -> True)" in ln for ln in lines), lines
    with pytest.raises(CheckpointMismatchError, match=r"fsdp \(True -> False\)"):
        train(TrainConfig(recipe="w4a4-fp6", out=str(fsdp), resume=True, **CNN))


class KillAt(StepHook):
    """Every rank dies (os._exit, as kill -9) at the start of global step ``step``."""

    def __init__(self, step):
        self.step = step

    def around(self, step):
        if step == self.step:
            os._exit(9)
        return super().around(step)


@pytest.mark.slow
@pytest.mark.parametrize("comm,options", [
    ("fp8", {}),
    ("topk", {"ratio": 0.05}),  # error-feedback memory in the sharded checkpoint
])
def test_fsdp_kill9_resume_is_bit_exact(tmp_path, comm, options):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    cfg = dict(MLP, comm=comm, comm_options=options, fsdp=True)
    assert launch_local(TrainConfig(out=str(ref), **cfg), 2) == 0
    # both ranks die inside epoch 2, after epoch 1's checkpoint
    rc = launch_local(TrainConfig(out=str(out), **cfg), 2, hooks=[KillAt(8), KillAt(8)])
    assert rc != 0
    assert launch_local(TrainConfig(out=str(out), resume=True, **cfg), 2) == 0
    assert _history(out) == _history(ref)
    wr, wo = _fsdp_weights(ref, tmp_path), _fsdp_weights(out, tmp_path)
    assert all(torch.equal(wr[k], wo[k]) for k in wr)
    hist = _history(out)
    sent = [r["comm_bytes_sent"] for r in hist]
    assert sent[0] < sent[1] < sent[2] == sum(r["comm_bytes_epoch"] for r in hist)
    # compression from the bytes actually sent: fp8 1 byte + 4-byte scale per call per element;
    # top-k 5% as (int32, fp32) pairs
    assert hist[-1]["comm_ratio_cumulative"] > (3.5 if comm == "fp8" else 5.0)


@pytest.mark.slow
def test_compression_not_applied_fails_loudly(tmp_path, capfd):
    # a warm-up longer than the run: every reduce-scatter was dense, nothing was compressed
    cfg = TrainConfig(**MLP | {"epochs": 1, "comm": "topk", "fsdp": True,
                               "comm_options": {"ratio": 0.05, "start_iter": 1000}})
    assert launch_local(cfg, 2) == 1
    err = capfd.readouterr().err
    lines = _rank_lines(err)
    assert len(lines) == 2, err
    assert all("did not get it" in ln and "less than the 1.1x" in ln for ln in lines), lines
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("field,values,named", [
    ("lr", (0.05, 0.2), "lr"),
    ("fsdp", (True, False), "fsdp"),
])
def test_fsdp_ranks_refuse_together(capfd, field, values, named):
    base = MLP | {"epochs": 1, "fsdp": True}
    cfgs = [TrainConfig(**base | {field: values[r]}) for r in range(2)]
    assert launch_local(cfgs, 2) == 2
    err = capfd.readouterr().err
    lines = _rank_lines(err)
    assert len(lines) == 2, err
    assert all(f"disagree on {named} (rank 0: {values[0]!r}, rank 1: {values[1]!r})" in ln
               for ln in lines), lines
    assert "Traceback" not in err


def test_cli_refuses_bad_fsdp_input_before_spawning(tmp_path, capsys):
    base = ["train", "--fsdp", "--model", "mlp", "--dataset", "digits", "--out",
            str(tmp_path / "o"), "--quiet"]
    assert main(base + ["--nproc", "2", "--comm", "powersgd"]) == 2  # a DDP-only method
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "powersgd" in err and "allowed: allreduce, fp8" in err, err
    assert main(base + ["--nproc", "2", "--comm", "topk", "--comm-options",
                        '{"ratio": 2}']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ratio" in err, err
    assert main(base) == 2  # one process: nothing to shard across
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nproc N" in err, err
    assert not (tmp_path / "o").exists()


# ---- the same run launched by torchrun (each process one rank, joining its group) ----

TORCHRUN_ARGS = ["--model", "mlp", "--dataset", "digits", "--batch-size", "32", "--width", "16",
                 "--max-steps-per-epoch", "6", "--max-train", "400", "--lr", "0.05",
                 "--epochs", "1", "--seed", "3", "--quiet"]


def _torchrun(args, out):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 -m gradcomp.apps.cli
    train ...`` in a subprocess; the per-rank thread count that ``--nproc`` workers use."""
    import subprocess
    import sys

    import gradcomp

    src = os.path.dirname(os.path.dirname(gradcomp.__file__))
    env = dict(os.environ, GRADCOMP_COMPILE="0",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // 2)),
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "gradcomp.apps.cli", "train", *args, "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "ddp"])
def test_torchrun_trains_like_nproc(tmp_path, monkeypatch, fsdp):
    # the same worker_main on both paths: with equal seeds and thread counts, the same bits
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")
    comm = (["--fsdp", "--comm", "block", "--comm-options", '{"fmt": "mxfp4"}'] if fsdp else
            ["--comm", "qsgd", "--comm-options", '{"levels": 8}'])
    args = TORCHRUN_ARGS + comm
    spawned, launched = tmp_path / "nproc", tmp_path / "torchrun"
    assert main(["train", *args, "--nproc", "2", "--out", str(spawned)]) == 0
    res = _torchrun(args, launched)
    assert res.returncode == 0, res.stderr[-3000:]
    hs, hl = _history(spawned), _history(launched)
    assert len(hl) == 1 and hl == hs
    # compressed both ways: mxfp4 4.25 bits per element (less on small chunks); QSGD 8 levels
    assert hl[-1]["comm_ratio_cumulative"] > (6.0 if fsdp else 1.5)
    if fsdp:
        ws, wl = _fsdp_weights(spawned, tmp_path), _fsdp_weights(launched, tmp_path)
    else:
        ws = torch.load(spawned / "checkpoint.pt", weights_only=False)["model"]
        wl = torch.load(launched / "checkpoint.pt", weights_only=False)["model"]
    assert ws.keys() == wl.keys() and all(torch.equal(ws[k], wl[k]) for k in ws)
