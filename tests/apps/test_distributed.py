"""Data-parallel start-up checks and faults (2 CPU ranks, gloo, bounded time, nothing left behind).

Per-rank arguments (as torchrun with different command lines per rank) are simulated by giving
``launch_local`` one config per rank.
"""

import os
import signal
import time

import pytest

from gradcomp.apps.distributed import launch_local
from gradcomp.apps.train import StepHook, TrainConfig

TINY = dict(model="mlp", dataset="digits", batch_size=32, width=16, progress=False,
            max_steps_per_epoch=4, max_test=64, epochs=1)


def _pair(**per_rank):
    """Two configs equal but for the given fields: field=(rank 0 value, rank 1 value)."""
    return [TrainConfig(**TINY | {k: v[r] for k, v in per_rank.items()}) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("field,values,named", [
    ("lr", (0.05, 0.2), "lr"),
    ("recipe", ("baseline", "fp4"), "recipe.name"),
    ("max_train", (600, 1294), "max_train"),  # uneven data
    ("width", (32, 16), "width"),
])
def test_ranks_refuse_together_naming_the_field(capfd, field, values, named):
    t0 = time.monotonic()
    assert launch_local(_pair(**{field: values}), 2) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "gradcomp train" in ln]
    assert len(lines) == 2, err  # one line per rank, no traceback
    assert {ln.split(":")[1].strip() for ln in lines} == {"rank 0", "rank 1"}
    for ln in lines:
        assert f"disagree on {named} (" in ln
        assert f"rank 0: {values[0]!r}" in ln and f"rank 1: {values[1]!r}" in ln
    assert "Traceback" not in err
    assert time.monotonic() - t0 < 120


def _write_idx(d, n_train, n_test=40, seed=0):
    """A tiny IDX dataset (8x8 images, 10 classes) in directory ``d``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
                int(s).to_bytes(4, "big") for s in arr.shape)
            (d / f"{prefix}-{kind}-ubyte").write_bytes(head + arr.tobytes())


@pytest.mark.slow
def test_uneven_data_is_refused_at_start_up(tmp_path, capfd):
    # the same command line on both ranks, but each rank's files hold a different training set
    _write_idx(tmp_path / "a", 400)
    _write_idx(tmp_path / "b", 900)
    base = TINY | {"dataset": "mnist", "max_steps_per_epoch": None}
    cfgs = [TrainConfig(**base | {"data_dir": str(tmp_path / r)}) for r in "ab"]
    assert launch_local(cfgs, 2) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "gradcomp train" in ln]
    assert len(lines) == 2 and all("disagree on train_images" in ln for ln in lines), err
    assert "Traceback" not in err


class StopAt(StepHook):
    """This rank stops itself (SIGSTOP, as a hung peer) at global step ``step``."""

    def __init__(self, step, pid_file):
        self.step, self.pid_file = step, pid_file

    def around(self, step):
        if step == self.step:
            with open(self.pid_file, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().around(step)


@pytest.mark.slow
def test_stopped_peer_is_named_within_the_timeout(tmp_path, capfd):
    pid_file = tmp_path / "pid"
    cfg = TrainConfig(**TINY | {"timeout": 5.0, "out": str(tmp_path / "out")})
    t0 = time.monotonic()
    rc = launch_local(cfg, 2, hooks=[None, StopAt(2, str(pid_file))])
    took = time.monotonic() - t0
    assert rc == 1
    err = capfd.readouterr().err
    assert "rank 1 stopped answering" in err and "--timeout 5 s" in err, err
    assert "Traceback" not in err
    assert took < 90
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the stopped worker was ended, not left behind
        os.kill(pid, 0)


_LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                "MASTER_PORT")


def test_launched_rank_is_detected_and_half_set_environments_refused(monkeypatch):
    from gradcomp.apps.distributed import running_under_torchrun

    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert running_under_torchrun() is False
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set globally on some clusters: no rank
    assert running_under_torchrun() is False
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="but not MASTER_PORT"):
        running_under_torchrun()
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert running_under_torchrun() is True
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun itself
    assert running_under_torchrun() is True


def test_cli_under_a_launcher_refuses_nproc_and_half_set_environments(monkeypatch, tmp_path,
                                                                       capsys):
    from gradcomp.apps.cli import main

    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    base = ["train", "--model", "mlp", "--dataset", "digits", "--quiet",
            "--out", str(tmp_path / "o")]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base) == 2  # would have trained alone, as rank 1 of nothing
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MASTER_ADDR, MASTER_PORT" in err, err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main(base + ["--nproc", "2"]) == 2  # torchrun already made the processes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nproc" in err and "torchrun" in err, err
    assert not (tmp_path / "o").exists()
