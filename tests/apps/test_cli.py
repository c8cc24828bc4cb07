"""End-to-end CLI runs (small settings)."""

import json
import math

import pytest

from gradcomp.apps.cli import main


def test_unknown_names_give_one_line_errors(capsys):
    assert main(["train", "--recipe", "nope", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "Traceback" not in err
    assert main(["analyze", "--model", "lenet", "--dataset", "synthetic", "--steps", "1"]) == 2
    assert "valid models" in capsys.readouterr().err


def test_analyze_json(tmp_path, capsys):
    rc = main(["analyze", "--model", "cnn", "--width", "4", "--dataset", "digits", "--steps",
               "6", "--points", "2", "--out", str(tmp_path), "--json", "--ks-sample", "2000",
               "--contrast"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["capture_steps"] == [0, 5]
    assert set(res["summary"]) == {"neural", "activation", "weight", "weight_grad"}
    kinds = {row["kind"] for row in res["layers"]}
    assert kinds == {"neural", "activation", "weight", "weight_grad"}
    assert (tmp_path / "distributions.png").exists() and (tmp_path / "sigma_per_layer.png").exists()
    # the paper's claim on a real (tiny) model: lognormal beats normal on most layers
    neural = [row for row in res["layers"] if row["kind"] == "neural"]
    wins = sum(row["D"]["lognormal"] < row["D"]["normal"] for row in neural)
    assert wins > len(neural) / 2
    summ = res["summary"]["neural"]
    assert summ["lognormal"]["mean"] < summ["normal"]["mean"]


def test_train_cli_and_resume(tmp_path, capsys):
    args = ["train", "--recipe", "prune-0.8", "--model", "cnn", "--width", "4", "--dataset",
            "synthetic", "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "checkpoint.pt").exists()
    # the malloc policy (retained memory by default) is recorded, not part of the identity
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["malloc"] == "retain"
    with pytest.raises(SystemExit) as exc:
        main(args + ["--malloc", "never"])
    assert exc.value.code == 2 and "--malloc: invalid choice: 'never'" in capsys.readouterr().err
    assert main(args + ["--resume", "--malloc", "default"]) == 0  # the same run
    capsys.readouterr()
    i = args.index("--epochs") + 1
    assert main(args[:i] + ["2"] + args[i + 1:] + ["--resume"]) == 2  # epochs changed: mismatch
    assert "differs in: epochs" in capsys.readouterr().err


def test_train_ddp_two_processes(tmp_path):
    rc = main(["train", "--nproc", "2", "--comm", "topk", "--comm-options", '{"ratio": 0.1}',
               "--recipe", "fp6", "--model", "cnn", "--width", "8", "--dataset", "digits",
               "--epochs", "3",
               "--batch-size", "32", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    hist = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert hist[-1]["comm_ratio_epoch"] > 1.5  # the first steps are dense: cumulative is lower
    assert hist[-1]["comm_ratio_cumulative"] > 1.5
    assert hist[-1]["test_accuracy"] > 0.5


def test_recipes_command(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "prune-0.85-het" in out and "fp6-e-2" in out
    assert main(["recipes", "atp-0.8"]) == 0
    assert json.loads(capsys.readouterr().out)["compression"]["prune"]["method"] == "atp"


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("baseline", "fp6", "fp4", "fp4-dynamic", "prune-0.8", "prune-0.8-emp",
                 "prune-0.85-het-emp", "atp-0.8"):
        assert name in out
    assert "fp6-e-1" not in out  # under --extended
    assert (tmp_path / "report.md").exists() and (tmp_path / "curves.png").exists()
    data = json.loads((tmp_path / "demo.json").read_text())
    rows = data["rows"]
    assert len(rows) == 8 and all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert all(len(r["seeds"]) == 1 for r in rows)  # --quick keeps one seed
    # the per-epoch sparsity table: one row per pruning recipe with its target
    by_epoch = {r["recipe"]: r for r in data["sparsity_by_epoch"]}
    assert set(by_epoch) == {"prune-0.8", "prune-0.8-emp", "prune-0.85-het-emp", "atp-0.8"}
    assert by_epoch["prune-0.85-het-emp"]["target"] == 0.85


def test_demo_seeds_report_mean_std_and_significance(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--recipes", "baseline,fp4-dynamic", "--seeds",
                 "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean +- std" in out and "seeds 0..1 (2)" in out
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "demo.json").read_text())["rows"]}
    accs = rows["fp4-dynamic"]["test_accuracies"]
    assert rows["fp4-dynamic"]["seeds"] == [0, 1] and len(accs) == 2
    # the table's mean and std are those of the two runs, and the verdict follows the rule
    # |delta| > 2 standard errors of the difference
    import statistics
    assert abs(rows["fp4-dynamic"]["test_accuracy"] - statistics.fmean(accs)) < 1e-12
    assert abs(rows["fp4-dynamic"]["test_accuracy_std"] - statistics.stdev(accs)) < 1e-12
    b, r = rows["baseline"], rows["fp4-dynamic"]
    se = math.sqrt((r["test_accuracy_std"] ** 2 + b["test_accuracy_std"] ** 2) / 2)
    assert r["significant"] == (abs(r["test_accuracy"] - b["test_accuracy"]) > 2 * se)
    for seed in (0, 1):  # one run folder per seed
        assert (tmp_path / "fp4-dynamic" / f"seed{seed}" / "metrics.json").exists()


def test_train_bad_inputs_are_one_line(tmp_path, capsys):
    base = ["train", "--model", "mlp", "--dataset", "digits", "--quiet", "--out",
            str(tmp_path / "o")]
    cases = [
        (["--device", "tpu"], "--device must be cpu, cuda"),
        (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be an int >= 1"),
        (["--max-steps-per-epoch", "-1"], "--max-steps-per-epoch must be an int >= 1"),
        (["--batch-size", "5000"], "--batch-size 5000 is larger"),
        (["--nproc", "2", "--comm", "qsdg"], "did you mean 'qsgd'"),
        (["--nproc", "2", "--comm", "qsgd", "--comm-options", '{"level": 8}'], "level"),
        (["--data-dir", str(tmp_path / "nope"), "--dataset", "fashion-mnist"],
         "does not exist"),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    (tmp_path / "file").write_text("x")
    assert main(base[:-1] + [str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, nproc):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    out = tmp_path / "run"
    args = [sys.executable, "-m", "gradcomp.apps.cli", "train", "--model", "mlp", "--dataset",
            "digits", "--width", "16", "--batch-size", "16", "--epochs", "40", "--out", str(out),
            "--nproc", str(nproc), "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), GRADCOMP_COMPILE="0")
    # a new session: the SIGINT goes to the whole process group, as Ctrl-C in a terminal does
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stdout + stderr
    ck = torch.load(out / "checkpoint.pt", weights_only=False)  # the last checkpoint is kept
    # 40 epochs: a loaded machine that answers the first checkpoint late must still find the
    # run going (12 epochs once finished before the SIGINT arrived)
    assert ck["epoch"] < 39
    assert main(args[3:] + ["--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 39
