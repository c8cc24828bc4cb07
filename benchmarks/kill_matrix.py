"""Kill -9 matrix: every recipe and communication method, killed at three moments, then resumed.

    python benchmarks/kill_matrix.py [--only single,ddp,fsdp] [--cells PATTERN] [--points a,b,c]
                                     [--jobs N] [--world 2] [--json runs/kill_matrix.json]
    python benchmarks/kill_matrix.py --merge A.json B.json   # one table from split runs

For each cell (recipe x comm x kill point) the script runs ``gradcomp train`` (the CLI, as a
subprocess: ``python -m gradcomp.apps.cli train ...``) three ways:

1. uninterrupted: the reference (one per recipe x comm, shared by its kill points);
2. the same command, killed with SIGKILL at the kill point (``GRADCOMP_KILL_AT``, the
   test-only hook of ``gradcomp.apps.train``: the process sends itself SIGKILL at a named point,
   so the moment is exact however loaded the machine is);
3. the same command with ``--resume``, repeated until it exits 0 (at most 3 times);

and compares the final weights (the checkpoint's model state dict: ``OUT/checkpoint.pt``, or
the sharded ``OUT/checkpoint_dcp/`` read back with ``dcp_to_torch_save``) bit for bit with the
reference; also whether the per-epoch history (``metrics.json`` without the timings) is the
same. Kill points (``STEPS`` steps per epoch, ``EPOCHS`` epochs, a checkpoint after each):

* ``a``: mid-epoch before any checkpoint exists (step 3 of epoch 1); the resume must start from
  scratch and say so ("no complete checkpoint ... starting from scratch");
* ``b``: mid-epoch after a checkpoint (step 2 of epoch 3: epoch 2's checkpoint is in place);
* ``c``: during the write of epoch 2's checkpoint, between its two renames (the new file
  written, the old one moved to ``checkpoint.prev.pt``, nothing at ``checkpoint.pt``);
* ``w`` (not in the default set): epoch 2's checkpoint written to its temporary file, not yet
  renamed.

Cells: single process, every demo and extended recipe plus the per-GEMM and W4A4 ones; 2 DDP
workers, every ``--comm`` method with recipes baseline and prune-0.8-emp; 2 FSDP workers, every
FSDP ``--comm`` method with the baseline recipe. Every run uses one thread per process
(``OMP_NUM_THREADS=1``) so that the reference and the resumed run reduce floats in the same
order. Prints a table (cell -> identical, or max |diff| and the first differing tensor) and a
summary count, and writes the JSON (``--json``). Exit code 0 only if every cell is identical.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import fnmatch
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STEPS, EPOCHS = 6, 3  # steps per epoch, epochs: checkpoints after steps 6, 12, 18
POINTS = {  # name -> (GRADCOMP_KILL_AT value, what it means)
    "a": ("step:3", "mid-epoch 1, no checkpoint yet"),
    "b": (f"step:{2 * STEPS + 2}", "mid-epoch 3, after epoch 2's checkpoint"),
    "c": ("save:2:rotated", "epoch 2's checkpoint write, between its renames"),
    "w": ("save:2:written", "epoch 2's checkpoint written, not yet renamed"),
}
FRESH_NOTE = "starting from scratch"  # the resume's message when no checkpoint exists

SINGLE_RECIPES = [
    # the demo's
    "baseline", "fp6", "fp6-e-1", "fp4", "fp4-dynamic", "prune-0.8", "prune-0.8-emp",
    "prune-0.85-het-emp", "atp-0.8",
    # --extended
    "fp6-e-2", "fp6-e+1", "topks-0.8", "w4a4", "w4a4-fp4", "w4a4-fp6", "fp8", "mxfp8", "mxfp4",
    "nvfp4", "luq-fp4", "nvfp4-recipe",
    # the other per-GEMM and W4A4 recipes
    "luq-fp4-smp", "quartet-mxfp4", "fp4-all-the-way", "w4a4-fp5",
]
DDP_RECIPES = ["baseline", "prune-0.8-emp"]
DDP_COMMS = [  # (label, --comm, --comm-options)
    ("allreduce", "allreduce", {}),
    ("fp16", "fp16", {}),
    ("powersgd", "powersgd", {}),
    ("qsgd", "qsgd", {}),
    ("qsgd-bits", "qsgd", {"bitstream": True}),
    ("topk", "topk", {}),
    ("scalecom", "scalecom", {}),
    ("prune", "prune", {}),
    ("fp", "fp", {}),
    ("block", "block", {}),
    ("block-nvfp4", "block", {"fmt": "nvfp4"}),
]
FSDP_COMMS = [
    ("allreduce", "allreduce", {}),
    ("fp8", "fp8", {}),
    ("qsgd", "qsgd", {}),
    ("prune", "prune", {}),
    ("fp", "fp", {}),
    ("topk", "topk", {}),
    ("scalecom", "scalecom", {}),
    ("block", "block", {}),
    ("block-nvfp4", "block", {"fmt": "nvfp4"}),
]
COMMON = ["--model", "mlp", "--dataset", "digits", "--width", "16", "--batch-size", "32",
          "--max-steps-per-epoch", str(STEPS), "--epochs", str(EPOCHS), "--lr", "0.05",
          "--quiet"]


@dataclass
class Cell:
    kind: str  # single, ddp, fsdp
    recipe: str
    comm: str  # label ("-" for single process)
    point: str
    args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.recipe}/{self.comm}/{self.point}"

    @property
    def group(self) -> str:  # cells sharing one reference run
        return f"{self.kind}/{self.recipe}/{self.comm}"


def all_cells(points, world: int = 2) -> list[Cell]:
    """Every cell; the data-parallel ones with ``world`` workers (a comm label gains ``@N``
    when N is not 2)."""
    cells = []
    at = "" if world == 2 else f"@{world}"
    for r in DDP_RECIPES:
        for label, method, opts in DDP_COMMS:
            args = ["--recipe", r, "--nproc", str(world), "--comm", method]
            if opts:
                args += ["--comm-options", json.dumps(opts)]
            cells += [Cell("ddp", r, label + at, p, args) for p in points]
    for label, method, opts in FSDP_COMMS:
        args = ["--recipe", "baseline", "--nproc", str(world), "--fsdp", "--comm", method]
        if opts:
            args += ["--comm-options", json.dumps(opts)]
        cells += [Cell("fsdp", "baseline", label + at, p, args) for p in points]
    for r in SINGLE_RECIPES:
        cells += [Cell("single", r, "-", p, ["--recipe", r]) for p in points]
    return cells


def run_cli(args: list[str], kill_at: str | None = None, timeout: float = 900) -> tuple[int, str]:
    """``gradcomp train ARGS`` in its own session; (exit code, output). The whole session is
    killed afterwards, so no worker outlives a killed launcher."""
    env = dict(os.environ, GRADCOMP_COMPILE="0", OMP_NUM_THREADS="1")
    env.pop("GRADCOMP_KILL_AT", None)
    if kill_at is not None:
        env["GRADCOMP_KILL_AT"] = kill_at
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "gradcomp.apps.cli", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = "timed out"
        proc.kill()
        proc.communicate()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode, out


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The model state dict of the run's last checkpoint (the DDP/single file or the FSDP DCP
    directory, gathered into one file without a process group)."""
    if (out / "checkpoint_dcp").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        flat = out / "dcp_flat.pt"
        dcp_to_torch_save(out / "checkpoint_dcp", flat)
        model = torch.load(flat, weights_only=False)["model"]
        flat.unlink()
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.items()}
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def history(out: Path) -> list[dict]:
    rows = json.loads((out / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def compare(ref: Path, got: Path) -> tuple[bool, float, str | None]:
    """(bit for bit equal, max |diff| over all tensors, first differing tensor): the model
    state dicts of the two runs' last checkpoints."""
    a, b = final_weights(ref), final_weights(got)
    if a.keys() != b.keys():
        return False, math.inf, f"keys differ: {sorted(a.keys() ^ b.keys())[:3]}"
    worst, first = 0.0, None
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, math.inf, f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if not torch.equal(_bits(x), _bits(y)):  # bits: -0.0 is not 0.0, a NaN equals itself
            first = first or k
            if x.is_floating_point():
                d = (x.double() - y.double()).abs().nan_to_num(math.inf)
                worst = max(worst, d.max().item())
            else:
                worst = math.inf
    return first is None, worst, first


@dataclass
class Result:
    cell: str
    kind: str
    recipe: str
    comm: str
    point: str
    identical: bool = False
    max_abs_diff: float | None = None
    first_diff: str | None = None
    same_history: bool | None = None
    killed_rc: int | None = None
    resumes: int = 0
    fresh_note: bool | None = None  # point a: the resume said it starts from scratch
    error: str | None = None
    seconds: float = 0.0


def run_group(cells: list[Cell], root: Path) -> list[Result]:
    """One reference run, then each cell's killed run and resume."""
    t0 = time.perf_counter()
    base = cells[0]
    ref = root / base.group.replace("/", "_") / "ref"
    rc, log = run_cli([*COMMON, *base.args, "--out", str(ref)])
    results = []
    for cell in cells:
        res = Result(cell.name, cell.kind, cell.recipe, cell.comm, cell.point)
        results.append(res)
        if rc != 0:
            res.error = f"reference run failed (rc {rc}): {log.strip().splitlines()[-1:]}"
            continue
        out = ref.parent / cell.point
        args = [*COMMON, *cell.args, "--out", str(out)]
        res.killed_rc, klog = run_cli(args, kill_at=POINTS[cell.point][0])
        if f"GRADCOMP_KILL_AT={POINTS[cell.point][0]}: SIGKILL" not in klog:
            # not killed by the hook (ended, or failed before the point): no resume to test
            res.error = (f"the kill point {POINTS[cell.point][0]} was not reached (rc "
                         f"{res.killed_rc}): {klog.strip().splitlines()[-1:]}")
            continue
        rlog = ""
        for _ in range(3):
            res.resumes += 1
            rrc, text = run_cli([*args, "--resume"])
            rlog += text
            if rrc == 0:
                break
        else:
            res.error = f"resume failed (rc {rrc}): {text.strip().splitlines()[-1:]}"
            continue
        if cell.point == "a":
            res.fresh_note = FRESH_NOTE in rlog
        try:
            res.identical, res.max_abs_diff, res.first_diff = compare(ref, out)
            res.same_history = history(ref) == history(out)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the matrix goes on
            res.error = f"compare failed: {type(exc).__name__}: {exc}"
    for r in results:
        r.seconds = (time.perf_counter() - t0) / len(results)
    return results


def verdict(r: Result) -> str:
    if r.error:
        return "ERROR"
    if r.identical and r.same_history and r.fresh_note is not False:
        return "identical"
    if r.identical:
        return "weights identical, " + ("history differs" if not r.same_history
                                        else "no from-scratch message")
    return f"DIFFERS max|diff| {r.max_abs_diff:.3g} ({r.first_diff})"


def table(results: list[Result], points: list[str]) -> str:
    by = {}
    for r in results:
        by.setdefault((r.kind, r.recipe, r.comm), {})[r.point] = r
    head = ["kind", "recipe", "comm", *[f"kill {p}" for p in points]]
    rows = [[k, rec, comm, *[verdict(cells[p]) if p in cells else "-" for p in points]]
            for (k, rec, comm), cells in by.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def summary(results: list[Result]) -> dict:
    counts = {"cells": len(results), "identical": 0, "differ": 0, "error": 0}
    for r in results:
        v = verdict(r)
        counts["identical" if v == "identical" else "error" if v == "ERROR" else "differ"] += 1
    return counts


def report(results: list[Result], points: list[str], seconds: float | None = None) -> dict:
    """Print the table and the summary line; the summary counts."""
    counts = summary(results)
    print()
    print(table(results, points))
    print()
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    print(f"{counts['identical']}/{counts['cells']} cells identical after resume, "
          f"{counts['differ']} differ, {counts['error']} errors{took}")
    return counts


def merge(paths: list[str]) -> int:
    cells: dict[str, Result] = {}
    points: list[str] = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        for p in doc["settings"]["points"]:
            if p not in points:
                points.append(p)
        for c in doc["cells"]:
            cells[c["cell"]] = Result(**c)
    every = all_cells(list(POINTS)) + all_cells(list(POINTS), world=4)
    order = {c.name: i for i, c in enumerate(every)}
    merged = sorted(cells.values(), key=lambda r: order.get(r.cell, len(order)))
    counts = report(merged, points)
    return 0 if counts["identical"] == counts["cells"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="single,ddp,fsdp",
                    help="comma-separated kinds: single, ddp, fsdp (default all)")
    ap.add_argument("--cells", default="*",
                    help="fnmatch pattern(s), comma-separated, on KIND/RECIPE/COMM/POINT, e.g. "
                    "'ddp/*/qsgd/*,single/fp6/-/b'")
    ap.add_argument("--points", default="a,b,c", help=f"kill points among {', '.join(POINTS)}")
    ap.add_argument("--jobs", type=int, default=1, help="reference groups run in parallel")
    ap.add_argument("--world", type=int, default=2, help="workers of the ddp and fsdp cells")
    ap.add_argument("--json", default="runs/kill_matrix.json", help="where to write the results")
    ap.add_argument("--workdir", default=None, help="run directories (default: a temporary one)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="run nothing: print the table and summary of these result files (of "
                    "runs split with --only/--cells), later files winning for the same cell")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("single", "ddp", "fsdp")]
    if bad:
        ap.error(f"--only: {bad[0]!r} is not a kind; allowed: single, ddp, fsdp")
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    bad = [p for p in points if p not in POINTS]
    if bad:
        ap.error(f"--points: {bad[0]!r} is not a kill point; allowed: {', '.join(POINTS)}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    patterns = [p.strip() for p in args.cells.split(",") if p.strip()]
    if args.world < 2:
        ap.error(f"--world must be >= 2, got {args.world}")
    cells = [c for c in all_cells(points, args.world) if c.kind in kinds
             and any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    if not cells:
        ap.error("no cell matches --only/--cells")
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c)
    print(f"{len(cells)} cells in {len(groups)} groups; kill points: "
          + "; ".join(f"{p} = {POINTS[p][1]} ({POINTS[p][0]})" for p in points), flush=True)

    t0 = time.perf_counter()
    results: list[Result] = []
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(final: bool) -> dict:
        counts = summary(results)
        path.write_text(json.dumps({
            "settings": {"common": COMMON, "points": {p: POINTS[p] for p in points},
                         "threads_per_process": 1},
            "complete": final, "summary": counts, "cells": [asdict(r) for r in results]},
            indent=1, default=str))
        return counts

    with tempfile.TemporaryDirectory(prefix="kill_matrix_") as tmp:
        root = Path(args.workdir or tmp)
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_group, g, root) for g in groups.values()]
            for fut in cf.as_completed(futures):
                for r in fut.result():
                    results.append(r)
                    print(f"[{time.perf_counter() - t0:6.0f}s] {r.cell}: {verdict(r)}"
                          + (f" ({r.error})" if r.error else ""), flush=True)
                write(final=False)  # a partial matrix survives an interrupted run
    order = {c.name: i for i, c in enumerate(cells)}
    results.sort(key=lambda r: order[r.cell])
    write(final=True)
    counts = report(results, points, time.perf_counter() - t0)
    print(f"wrote {path}")
    return 0 if counts["identical"] == counts["cells"] else 1


if __name__ == "__main__":
    sys.exit(main())
