import json
import math

import pytest
import torch

from gradcomp.apps.cli import main
from gradcomp.apps.gemmcheck import (
    SCHEMES,
    capture_gemm_operands,
    gemm_diagnostics,
    ranked_rows,
)


@pytest.fixture(scope="module")
def records():
    return capture_gemm_operands("cnn", "digits", steps=3, batch_size=16, width=4, max_train=256)


def test_capture_real_operands(records):
    assert [r.kind for r in records] == ["conv2d", "conv2d", "conv2d", "linear"]
    for r in records:
        assert r.grad is not None and torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


@pytest.mark.slow
def test_unbiased_schemes_pass_and_nearest_is_flagged(records):
    names = ["luq4", "fp4-sr", "fp4-sr-all-rht16", "fp4-rn"]  # int4-sr: test_gemm
    rows = gemm_diagnostics(records, {n: SCHEMES[n] for n in names}, draws=20, seed=1)
    assert len(rows) == len(records) * len(names) * 2
    for r in rows:
        if r["scheme"] == "fp4-rn":
            continue
        # unbiased estimators: the aggregate error statistics within 5 standard errors
        assert r["bias_z"] < 5, r
        assert r["rel_var"] > 0 and 0 < r["cosine"] < 1
        # the residual of the mean is the noise floor, not a bias
        assert r["rel_bias"] < 2 * r["noise_floor"] + 1e-12, r
    rn = [r for r in rows if r["scheme"] == "fp4-rn"]
    assert all(r["rel_var"] == 0 for r in rn)  # deterministic
    assert max(r["bias_z"] for r in rn) > 5  # and biased on real gradients
    # the lognormal prediction exists where it should and is of the measured order
    for r in rows:
        closed = r["scheme"] in ("luq4", "fp4-sr")
        assert math.isfinite(r["pred_rel_var"]) == closed, r
        if closed:
            assert 0.25 < r["pred_rel_var"] / r["rel_var"] < 4, r
    ranked = ranked_rows(rows)
    assert [1 - r["cosine"] for r in ranked] == sorted((1 - r["cosine"] for r in rows),
                                                       reverse=True)


def test_command_writes_table_json_and_figure(tmp_path, capsys):
    rc = main(["gemmcheck", "--dataset", "digits", "--steps", "2", "--width", "4",
               "--max-train", "128", "--draws", "2", "--schemes", "luq4", "--out",
               str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bias_z" in text and "luq4" in text
    data = json.loads((tmp_path / "gemmcheck.json").read_text())
    assert len(data["rows"]) == 8
    assert (tmp_path / "gemmcheck.png").stat().st_size > 0


def test_command_rejects_unknown_scheme(tmp_path, capsys):
    assert main(["gemmcheck", "--schemes", "nope", "--out", str(tmp_path)]) == 2
    assert "--schemes" in capsys.readouterr().err
