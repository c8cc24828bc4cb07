"""gradcomp formats: table, JSON, figures, bad options."""

from __future__ import annotations

import json

from gradcomp.apps.cli import main


def test_json_table(capsys):
    assert main(["formats", "--bits", "4-5", "--sigma", "2,4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "ln" in out["convention"]
    rows = out["table"]["5"]
    assert [r["sigma"] for r in rows] == [2.0, 4.0]
    assert all(r["format"].startswith("1-") for r in rows)
    cells = {(c["data"], c["bits"]): c for c in out["table2_comparison"]}
    assert cells[("ImageNet", 4)]["paper"] == "1-3-0"


def test_figures(tmp_path, capsys):
    rc = main(["formats", "--bits", "4", "--sigma", "1:2:1", "--semantics", "ieee",
               "--out", str(tmp_path), "--mc", "200"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "std of ln|g|" in text and "semantics: ieee" in text
    for key in ("fig3a", "fig3b", "fig3c"):
        assert (tmp_path / f"{key}.png").stat().st_size > 1000
        json.loads((tmp_path / f"{key}.json").read_text())


def test_bad_options(capsys):
    assert main(["formats", "--bits", "2-9"]) == 2
    assert "--bits" in capsys.readouterr().err
    assert main(["formats", "--sigma", "0,1"]) == 2
    assert main(["formats", "--sigma", "a"]) == 2
