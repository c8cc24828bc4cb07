"""benchmarks/kill_matrix.py stays working: two of its cells end to end, and its comparison.

The cells run the CLI as subprocesses (a reference run, the run killed by the
``GRADCOMP_KILL_AT`` hook with SIGKILL, the resume), as the full matrix does.
"""

import importlib.util
import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_matrix.py"


@pytest.fixture(scope="module")
def km():
    spec = importlib.util.spec_from_file_location("kill_matrix", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kill_matrix"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("kill_matrix", None)


def _checkpoint(out: Path, weights: dict) -> None:
    out.mkdir()
    torch.save({"model": weights}, out / "checkpoint.pt")


def test_compare_reports_the_largest_difference_and_the_first_tensor(tmp_path, km):
    w = {"a.weight": torch.zeros(3), "b.weight": torch.ones(2), "n": torch.tensor(4)}
    _checkpoint(tmp_path / "ref", w)
    _checkpoint(tmp_path / "same", {k: v.clone() for k, v in w.items()})
    other = {k: v.clone() for k, v in w.items()}
    other["b.weight"][1] += 0.25
    other["a.weight"][0] = -2 ** -20
    _checkpoint(tmp_path / "other", other)
    assert km.compare(tmp_path / "ref", tmp_path / "same") == (True, 0.0, None)
    same, diff, first = km.compare(tmp_path / "ref", tmp_path / "other")
    assert (same, diff, first) == (False, 0.25, "a.weight")
    # bit for bit: -0.0 is not 0.0 (torch.equal would call them equal), a NaN equals itself
    signed = {k: v.clone() for k, v in w.items()}
    signed["a.weight"] = -signed["a.weight"]
    _checkpoint(tmp_path / "signed", signed)
    assert km.compare(tmp_path / "ref", tmp_path / "signed") == (False, 0.0, "a.weight")
    nan = {k: v.clone() for k, v in w.items()}
    nan["b.weight"][0] = math.nan
    _checkpoint(tmp_path / "nan1", nan)
    _checkpoint(tmp_path / "nan2", {k: v.clone() for k, v in nan.items()})
    assert km.compare(tmp_path / "nan1", tmp_path / "nan2") == (True, 0.0, None)
    assert km.compare(tmp_path / "ref", tmp_path / "nan1") == (False, math.inf, "b.weight")


def test_bad_filters_are_refused_naming_the_option(km, capsys):
    for argv, word in ((["--only", "tpu"], "--only"), (["--points", "z"], "--points"),
                       (["--cells", "nothing/*"], "no cell")):
        with pytest.raises(SystemExit) as exc:
            km.main(argv)
        assert exc.value.code == 2
        assert word in capsys.readouterr().err


def test_merge_prints_one_table_of_split_runs(tmp_path, km, capsys):
    def doc(point, identical, diff=0.0):
        cell = km.Result(f"ddp/baseline/topk/{point}", "ddp", "baseline", "topk", point,
                         identical=identical, max_abs_diff=diff, first_diff=None if identical
                         else "0.weight", same_history=identical, killed_rc=1, resumes=1)
        return {"settings": {"points": {point: km.POINTS[point]}}, "cells": [vars(cell)]}

    (tmp_path / "a.json").write_text(json.dumps(doc("b", True)))
    (tmp_path / "b.json").write_text(json.dumps(doc("c", False, 0.07)))
    assert km.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    printed = capsys.readouterr().out
    assert "| ddp  | baseline | topk | identical | DIFFERS max|diff| 0.07 (0.weight) |" in printed
    assert "1/2 cells identical after resume, 1 differ, 0 errors" in printed


@pytest.mark.slow
def test_two_cells_resume_identically(tmp_path, km, capsys):
    """fp6 (single process) killed before its first checkpoint and during the second write."""
    out = tmp_path / "matrix.json"
    rc = km.main(["--cells", "single/fp6/-/*", "--points", "a,c", "--json", str(out),
                  "--workdir", str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    cells = {c["point"]: c for c in doc["cells"]}
    assert set(cells) == {"a", "c"}, printed
    for cell in cells.values():
        assert cell["error"] is None, cell
        assert cell["killed_rc"] == -signal.SIGKILL  # the hook's SIGKILL ended the run
        assert cell["identical"] and cell["same_history"] and cell["max_abs_diff"] == 0.0
    assert cells["a"]["fresh_note"] is True  # "no complete checkpoint ...: starting from scratch"
    assert doc["complete"] and doc["summary"] == {"cells": 2, "identical": 2, "differ": 0,
                                                   "error": 0}
    assert rc == 0 and "2/2 cells identical" in printed
    assert not math.isnan(cells["c"]["seconds"])
