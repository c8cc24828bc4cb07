"""``gradcomp sparsity``: the evaluation logic on synthetic lognormal layers, and the CLI."""

import json

import pytest
import torch

from gradcomp.apps.cli import main
from gradcomp.apps.evaluation import evaluate_sparsity, synthetic_layers


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")


def test_evaluate_on_synthetic_lognormal_layers():
    layers = synthetic_layers(n_layers=4, numel=100_000, seed=1)
    res = evaluate_sparsity(layers, [0.5, 0.8, 0.95], ["lognormal", "atp", "topk_stochastic"],
                            seed=0)
    assert res["layers"] == 4 and res["calibration_in_sample"]
    by = {(s["method"], s["target"]): s for s in res["summary"]}
    for t in (0.5, 0.8, 0.95):
        # exact lognormal layers: only sampling noise, std <= 0.5/sqrt(1e5) = 1.6e-3 per layer
        assert by[("lognormal", t)]["worst_abs_error"] < 0.008
        # the baselines miss by far more (the paper's Fig. 5 right)
        assert by[("topk_stochastic", t)]["mean_abs_error"] > 0.03
        assert by[("atp", t)]["mean_abs_error"] > 0.03
        assert by[("topk_stochastic", t)]["mean_error"] < 0  # always below the target
    # encoded sizes shrink as sparsity grows
    bits = [by[("lognormal", t)]["bits_per_element"] for t in (0.5, 0.8, 0.95)]
    assert bits[0] > bits[1] > bits[2] > 0
    assert len(res["per_layer"]) == 4 * 3 * 3


def test_time_series_calibration_uses_earlier_steps():
    g = torch.Generator().manual_seed(2)
    # normal (not lognormal) layer captured at two steps: calibrated learns on the first
    layers = [("fc", torch.randn(100_000, generator=g)), ("fc", torch.randn(100_000, generator=g))]
    res = evaluate_sparsity(layers, [0.9], ["lognormal", "calibrated"], encode=False)
    assert not res["calibration_in_sample"]
    by = {s["method"]: s for s in res["summary"]}
    assert by["calibrated"]["mean_abs_error"] < by["lognormal"]["mean_abs_error"]


def test_cli_synthetic_json_and_outputs(tmp_path, capsys):
    rc = main(["sparsity", "--synthetic", "--targets", "0.6,0.9", "--methods",
               "lognormal,empirical", "--json", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["targets"] == [0.6, 0.9] and out["methods"] == ["lognormal", "empirical"]
    assert (tmp_path / "fig5_sparsity.png").stat().st_size > 0
    assert json.loads((tmp_path / "sparsity.json").read_text())["per_layer"]


@pytest.mark.parametrize("argv,msg", [
    (["--targets", "0.5,1.2"], "--targets"),
    (["--targets", "x"], "--targets"),
    (["--methods", "lognormal,foo"], "--methods"),
    (["--sample-size", "0"], "--sample-size"),
])
def test_cli_bad_options(tmp_path, capsys, argv, msg):
    assert main(["sparsity", "--synthetic", "--out", str(tmp_path), *argv]) == 2
    assert msg in capsys.readouterr().err
