"""gradcomp formats: table, JSON, figures (default folder), --block, bad options."""

from __future__ import annotations

import json

import pytest

from gradcomp.apps.cli import main


def test_json_table(capsys):
    assert main(["formats", "--bits", "4-5", "--sigma", "2,4", "--json", "--no-plots"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "ln" in out["convention"]
    rows = out["table"]["5"]
    assert [r["sigma"] for r in rows] == [2.0, 4.0]
    assert all(r["format"].startswith("1-") for r in rows)
    cells = {(c["data"], c["bits"]): c for c in out["table2_comparison"]}
    assert cells[("ImageNet", 4)]["paper"] == "1-3-0"
    assert out["files"] == {}


def test_figures(tmp_path, capsys):
    rc = main(["formats", "--bits", "4", "--sigma", "1:2:1", "--semantics", "ieee",
               "--out", str(tmp_path), "--mc", "200"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "std of ln|g|" in text and "semantics: ieee" in text
    for key in ("fig3a", "fig3b", "fig3c"):
        assert (tmp_path / f"{key}.png").stat().st_size > 1000
        json.loads((tmp_path / f"{key}.json").read_text())
        assert f"wrote {tmp_path / key}.png" in text


def test_figures_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["formats", "--bits", "4", "--sigma", "2", "--mc", "100"]) == 0
    assert "wrote runs/formats/fig3b.png" in capsys.readouterr().out
    assert (tmp_path / "runs" / "formats" / "fig3b.png").stat().st_size > 1000


@pytest.mark.slow
def test_block_table(tmp_path, capsys):
    rc = main(["formats", "--block", "--sigma", "1,4", "--block-sizes", "16,32",
               "--mc-blocks", "300", "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert len(rows) == 2 * 2 * 5
    for r in rows:
        assert r["predicted"] > 0 and r["monte_carlo"] > 0
        # theory and Monte Carlo side by side agree within 5 standard errors + 3%
        assert abs(r["predicted"] - r["monte_carlo"]) < 5 * r["mc_se"] + 0.03 * r["predicted"]
    picks = dict(out["choice"]["block32_fp8"])
    assert picks[1.0] == "e4m3fn" and picks[4.0] == "e5m2"
    assert set(out["choice"]) == {"block16_fp8", "block16_fp6", "block32_fp8", "block32_fp6"}
    for key in ("block_error", "block_choice"):
        assert (tmp_path / f"{key}.png").stat().st_size > 1000


def test_block_text(capsys):
    rc = main(["formats", "--block", "--sigma", "2", "--block-sizes", "32", "--mc-blocks", "0",
               "--no-plots", "--block-scale", "e4m3:nearest"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "scale e4m3:nearest" in text and "block   32, 8 bits: sigma 2:" in text


def test_bad_options(capsys):
    assert main(["formats", "--bits", "2-9"]) == 2
    assert "--bits" in capsys.readouterr().err
    assert main(["formats", "--sigma", "0,1"]) == 2
    assert main(["formats", "--sigma", "a"]) == 2
    assert main(["formats", "--block", "--block-sizes", "1,32", "--no-plots"]) == 2
    assert "--block-sizes" in capsys.readouterr().err
    assert main(["formats", "--block", "--mc-blocks", "5", "--no-plots"]) == 2
