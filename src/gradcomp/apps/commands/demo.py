"""``gradcomp demo``: the main job. Trains a small ResNet on Fashion-MNIST with the paper's
methods side by side and prints one table with the paper's predictions beside the measurements.

``gradcomp demo --workload lm``: the same comparison on a byte-level GPT (gpt-tiny, context 64)
trained on the Shakespeare corpus, scored by validation perplexity (exp of the mean next-byte
cross-entropy) with its difference to the baseline."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from gradcomp.apps.tables import format_table, write_json

DEFAULT_OUT = "runs/demo"
DEFAULT_OUT_LM = "runs/demo-lm"

# (recipe, what the paper predicts, in words, with the paper's figure)
DEMO = [
    ("baseline", "reference"),
    ("fp6", "= baseline (Tab. 3, ResNet18 C100: 64.9 vs 64.9)"),
    ("fp4", "per-layer scaling: small loss (Tab. 4: 64.8 vs 70.4)"),
    ("fp4-dynamic", "global dynamic scaling: far worse (Tab. 4: 3.0)"),
    ("prune-0.8", "Eq. 8: 80% at no loss (Sec. 5)"),
    ("prune-0.8-emp", "(ours) exact 80%, no loss expected"),
    ("prune-0.85-het-emp", "85% heterogeneous at no loss (Sec. 5.3)"),
    ("atp-0.8", "ATP misses its 80% target (Fig. 5 right)"),
]
# the language-model workload: (recipe, what the paper predicts)
LM_DEMO = [
    ("baseline", "reference"),
    ("fp6", "= baseline (Tab. 3)"),
    ("fp4", "per-layer scaling: small loss (Tab. 4)"),
    ("fp4-dynamic", "one global dynamic scale: far worse (Tab. 4; Fig. A.5: sigma varies "
     "strongly between transformer layers)"),
    ("prune-0.8-emp", "exact 80%, no loss expected (Sec. 5)"),
    ("prune-0.85-het-emp", "85% heterogeneous at no loss (Sec. 5.3)"),
]
EXTENDED = [
    ("fp6-e-1", "worse than E* (Tab. 3: 59.7 vs 64.9)"),
    ("fp6-e-2", "much worse (Tab. 3: 28.6)"),
    ("fp6-e+1", "about E* (Tab. 3: 64.6)"),
    ("topks-0.8", "top-k then stochastic misses target (Fig. 5)"),
    ("w4a4", "INT4 W/A: small loss"),
    ("w4a4-fp4", "W4A4 + FP4 grads: ~0.3% loss (paper Sec. 6)"),
    ("w4a4-fp6", "W4A4 + FP6 grads: small loss"),
    ("fp8", "per-tensor FP8 at E*: = baseline (Tab. 3)"),
    ("mxfp8", "MXFP8 E4M3 blocks, SR: = baseline"),
    ("mxfp4", "MXFP4 blocks, SR: small loss"),
    ("nvfp4", "NVFP4 1x16 blocks, SR: small loss (FP4 All the Way)"),
    ("luq-fp4", "LUQ 4-bit: ~1 pt loss (LUQ, ResNet-50 75.4 vs 76.5)"),
    ("nvfp4-recipe", "NVFP4 recipe, forward + per-GEMM backward: ~ baseline (NVIDIA 2025)"),
    ("fp4-all-the-way", "NVFP4 forward (nearest) + backward (SR): ~ baseline (Chmiel 2025)"),
]


def _seeds_text(seeds) -> str:
    """"seeds 0..2 (3)" or "seed 0", for the setup line of a demo table."""
    return f"seeds {seeds[0]}..{seeds[-1]} ({len(seeds)})" if len(seeds) > 1 else f"seed {seeds[0]}"


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="the main job: baseline vs FP6/FP4 gradients vs stochastic pruning on Fashion-MNIST",
        description="Train a small ResNet on Fashion-MNIST with the baseline, FP6 at E*, "
        "FP4 with per-layer vs dynamic global loss scaling, stochastic pruning (80%% with "
        "Eq. 8 and with the empirical threshold, 85%% heterogeneous) and ATP at 80%%, each "
        "over 3 seeds; print one table (mean +- std, which differences exceed the seed "
        "spread) and the achieved sparsity per epoch, and write a report (markdown + PNG). "
        "About 15 minutes on 2 CPU cores; --quick in about a minute.",
    )
    p.add_argument("--workload", default="image", choices=("image", "lm"),
                   help="image: ResNet on Fashion-MNIST (default); lm: byte-level GPT on the "
                   "Shakespeare corpus, scored by validation perplexity (about 8 minutes on 2 "
                   "cores)")
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test, about a minute)")
    p.add_argument("--extended", action="store_true",
                   help="also E*-1, E*-2, E*+1, top-k-then-stochastic, W4A4 (+FP4/FP6 gradients), "
                   "per-tensor FP8, the block formats (MXFP8, MXFP4, NVFP4) and the FP4 "
                   "per-GEMM recipes (LUQ, the NVFP4 recipe)")
    p.add_argument("--recipes", default=None, help="comma-separated recipes instead of the list")
    p.add_argument("--model", default=None, help="model (default resnet8; lm: gpt-tiny)")
    p.add_argument("--dataset", default=None,
                   help="dataset (default fashion-mnist; lm: shakespeare)")
    p.add_argument("--data-dir", default=None, help="directory of the dataset files")
    p.add_argument("--width", type=int, default=None, help="model width (default 16; lm: the "
                   "model's own, 64 for gpt-tiny)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (image workload; default 2)")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps (lm workload; default 300)")
    p.add_argument("--context", type=int, default=64,
                   help="bytes per sequence (lm workload; default 64)")
    p.add_argument("--max-train", type=int, default=None,
                   help="training images used (default 10000 of 54000; lm: all sequences)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default 128; lm: 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.1 SGD cosine; lm: 3e-3 AdamW cosine)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per recipe (SEED, SEED+1, ...): the table reports mean +- std "
                   "and which differences to the baseline exceed the seed spread (default 3; "
                   "1 with --quick and for the lm workload)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None,
                   help=f"output directory (default {DEFAULT_OUT}; lm: {DEFAULT_OUT_LM})")
    p.add_argument("--quiet", action="store_true")
    return p


def _defaults(args) -> None:
    """Fill the workload's defaults into the options left unset."""
    lm = args.workload == "lm"
    for name, image, text in (("model", "resnet8", "gpt-tiny"),
                              ("dataset", "fashion-mnist", "shakespeare"),
                              ("width", 16, None), ("max_train", 10000, None),
                              ("batch_size", 128, 32), ("lr", 0.1, 3e-3),
                              ("out", DEFAULT_OUT, DEFAULT_OUT_LM)):
        if getattr(args, name) is None:
            setattr(args, name, text if lm else image)
    if args.seeds is None:
        # one seed cannot tell a 1-point difference from noise (issue 12); the smoke run and
        # the lm job keep one to stay within their time
        args.seeds = 1 if (lm or args.quick) else 3


def _plan(args) -> list[tuple[str, str]]:
    if args.workload == "lm":
        known = dict(LM_DEMO + DEMO + EXTENDED)
        if args.recipes:
            names = [r.strip() for r in args.recipes.split(",") if r.strip()]
            return [(n, known.get(n, "")) for n in names]
        if args.extended:
            raise ValueError("--extended belongs to the image workload; give --recipes for lm")
        return LM_DEMO
    known = dict(DEMO + EXTENDED)
    if args.recipes:
        names = [r.strip() for r in args.recipes.split(",") if r.strip()]
        return [(n, known.get(n, "")) for n in names]
    return DEMO + (EXTENDED if args.extended else [])


def run(args: argparse.Namespace) -> int:
    from gradcomp.apps.recipes import get_recipe
    from gradcomp.apps.train import TrainConfig

    _defaults(args)
    plan = _plan(args)
    for name, _ in plan:
        get_recipe(name)  # fail fast on a typo
    if args.seeds < 1:
        raise ValueError(f"--seeds must be an int >= 1, got {args.seeds}")
    if args.workload == "lm":
        return _run_lm(args, plan)
    if args.quick:
        args.max_train, args.epochs, args.width, max_test = 1024, 1, 8, 1000
    else:
        max_test = None
    seeds = list(range(args.seed, args.seed + args.seeds))
    out = Path(args.out)
    results, total = _train_all(args, plan, seeds, out, lambda name, seed, run_out: TrainConfig(
        recipe=name, model=args.model, dataset=args.dataset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=seed, device=args.device,
        out=str(run_out), overwrite=True, data_dir=args.data_dir,
        max_train=args.max_train, width=args.width, progress=not args.quiet,
        max_test=max_test))

    stats = {name: _stats(runs) for name, runs in results.items()}
    base = stats.get("baseline")
    rows, data = [], []
    for name, prediction in plan:
        st = stats[name]
        last = results[name][-1].history[-1]
        fmt = last.get("format", "")
        delta, verdict = _versus(st, base, len(seeds)) if name != "baseline" else ("-", "")
        acc = (f"{st['mean']:.2f} +- {st['std']:.2f}" if len(seeds) > 1 else f"{st['mean']:.2f}")
        rows.append([name + (f" ({fmt})" if fmt else ""), acc, delta, st["sparsity"],
                     st["bits"], verdict, prediction])
        data.append({"recipe": name, "format": fmt, "seeds": seeds,
                     "test_accuracy": st["mean"] / 100, "test_accuracy_std": st["std"] / 100,
                     "test_accuracies": [r.test_accuracy for r in results[name]],
                     "delta_pp": delta if name != "baseline" else 0.0,
                     "significant": verdict.startswith("yes"),
                     "sparsity": st["sparsity"], "bits_per_element": st["bits"],
                     "overflow": last.get("overflow"), "underflow": last.get("underflow"),
                     "prediction": prediction,
                     "history": [r.history for r in results[name]]})
    acc_head = "test acc % (mean +- std)" if len(seeds) > 1 else "test acc %"
    headers = ["recipe", acc_head, "delta pp", "sparsity", "bits/elem", "beyond seed spread?",
               "paper predicts"]
    table = format_table(headers, rows, ".2f")
    seeds_txt = _seeds_text(seeds)
    setup = (f"{args.model} (width {args.width}) on {args.dataset}, {args.epochs} epoch(s), "
             f"{args.max_train} training images, batch {args.batch_size}, SGD lr {args.lr} cosine, "
             f"{seeds_txt}; total {total:.0f} s")
    note = _NOTE if len(seeds) > 1 else _NOTE_ONE
    epochs_table, epochs_data = _sparsity_by_epoch(results, plan)
    print(f"\n{setup}\n\n{table}\n\n{note}\n")
    if epochs_table:
        print(f"{_EPOCHS_TITLE}\n\n{epochs_table}\n")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", {"setup": setup, "rows": data,
                                   "sparsity_by_epoch": epochs_data})
    png = _plot(results, plan, out)
    (out / "report.md").write_text(
        f"# gradcomp demo\n\n{setup}\n\n{table}\n\n"
        "sparsity: fraction of zeros in the compressed neural gradients (last epoch, mean over "
        "seeds); bits/elem: bits per neural-gradient element (FP width, or the entropy bound of "
        f"the pruned stream). {note} Step times belong to `benchmarks/bench_train_step.py` "
        "(interleaved runs), not to this table.\n\n"
        + (f"{_EPOCHS_TITLE}\n\n{epochs_table}\n\n" if epochs_table else "")
        + f"![curves]({png.name})\n"
    )
    print(f"wrote {out / 'report.md'}, {png}, {out / 'demo.json'}")
    return 0


def _train_all(args, plan, seeds, out: Path, make_cfg) -> tuple[dict[str, list], float]:
    """Every recipe of the plan over every seed (OUT/<recipe>[/seed<k>]); the results per
    recipe in seed order, and the wall time in seconds."""
    from gradcomp.apps.train import train

    results: dict[str, list] = {}
    t0 = time.perf_counter()
    for i, (name, _) in enumerate(plan):
        for seed in seeds:
            if not args.quiet:
                tag = f" seed {seed}" if len(seeds) > 1 else ""
                print(f"[{i + 1}/{len(plan)}] {name}{tag}", flush=True)
            run_out = _run_dir(out, name, seed if len(seeds) > 1 else None)
            results.setdefault(name, []).append(train(make_cfg(name, seed, run_out)))
    return results, time.perf_counter() - t0


_NOTE = ("beyond seed spread?: 'yes' when |delta| exceeds twice its standard error over the seeds "
         "(sqrt(s_r^2/n + s_b^2/n)); smaller differences are noise at this scale.")
_NOTE_ONE = ("beyond seed spread?: needs --seeds N >= 2; with one seed, differences of a point or "
             "two between recipes are within run-to-run noise at this scale.")


_EPOCHS_TITLE = ("Achieved sparsity per epoch (mean over seeds and over the epoch's metric steps; "
                 "the pruning recipes' target beside it):")


def _sparsity_by_epoch(results, plan) -> tuple[str, list]:
    """Per pruning recipe: its target sparsity and the achieved sparsity in each epoch (mean
    over seeds), with the largest deviation from the target in points: the exactness claim is
    per epoch, the first included, not only at the end of training."""
    from gradcomp.apps.recipes import get_recipe

    rows, data = [], []
    for name, _ in plan:
        prune = get_recipe(name).compression
        prune = prune.prune if prune is not None else None
        if prune is None:
            continue
        hist = [r.history for r in results[name]]
        n_epochs = min(len(h) for h in hist)
        per_epoch = [_measured_mean(h[e].get("sparsity") for h in hist) for e in range(n_epochs)]
        measured = [v for v in per_epoch if v is not None]
        worst = (max(abs(v - prune.sparsity) for v in measured) * 100 if measured else None)
        rows.append([name, prune.sparsity, *per_epoch, worst])
        data.append({"recipe": name, "target": prune.sparsity, "per_epoch": per_epoch,
                     "max_deviation_pp": worst})
    if not rows:
        return "", []
    width = max(len(r) for r in rows) - 3
    headers = ["recipe", "target", *[f"epoch {e + 1}" for e in range(width)],
               "max deviation pp"]
    rows = [r[:-1] + [None] * (width + 3 - len(r)) + r[-1:] for r in rows]
    return format_table(headers, rows, ".3f"), data


def _run_dir(out: Path, name: str, seed: int | None) -> Path:
    """OUT/<recipe>[/seed<k>]; a recipe file is named by its stem (not its whole path)."""
    d = out / (Path(name).stem if name.endswith((".toml", ".json")) else name)
    return d if seed is None else d / f"seed{seed}"


def _stats(runs) -> dict:
    accs = [100 * r.test_accuracy for r in runs]
    last = [r.history[-1] for r in runs]
    return {"mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
            "n": len(accs), "accs": accs,
            "sparsity": _measured_mean(row.get("sparsity", 0.0) for row in last),
            "bits": _measured_mean(row.get("bits_per_element", 32.0) for row in last)}


def _measured_mean(values) -> float | None:
    """Mean over the runs whose last epoch measured the metric; None when none did (a run too
    short for a metric step: the table shows '-', never a number that reads as uncompressed)."""
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _versus(st: dict, base: dict | None, n: int) -> tuple[float, str]:
    """(mean difference to the baseline in points, verdict against the seed spread)."""
    if base is None:
        return math.nan, ""
    delta = st["mean"] - base["mean"]
    if n < 2:
        return delta, "n/a (1 seed)"
    se = math.sqrt(st["std"] ** 2 / n + base["std"] ** 2 / n)
    if se == 0:
        return delta, "yes" if delta != 0 else "no"
    return delta, (f"yes ({abs(delta) / se:.1f} se)" if abs(delta) > 2 * se
                   else f"no ({abs(delta) / se:.1f} se)")


def _plot(results, plan, out: Path) -> Path:
    """Three panels: training loss (mean over seeds, moving average; a distinct colour, line
    style and marker per recipe), test accuracy (axis from 0, error bars = std over seeds), and
    what each recipe compresses to (sparsity and bits per element)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n, _ in plan]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*", "P", "h"]
    cmap = plt.get_cmap("tab10")
    fig = plt.figure(figsize=(17, 6.5))
    grid = fig.add_gridspec(2, 3, width_ratios=[1.6, 1, 1], height_ratios=[1.5, 1])
    ax1 = fig.add_subplot(grid[0, 0])
    ax1d = fig.add_subplot(grid[1, 0], sharex=ax1)  # the difference to the baseline
    ax2 = fig.add_subplot(grid[:, 1])
    ax3 = fig.add_subplot(grid[:, 2])
    smoothed = {}
    for k, name in enumerate(names):
        traces = [np.array(r.loss_trace) for r in results[name] if r.loss_trace]
        if not traces:
            continue
        n = min(t.size for t in traces)
        tr = np.mean([t[:n] for t in traces], axis=0)
        w = max(1, tr.size // 50)
        sm = np.convolve(tr, np.ones(w) / w, mode="valid")
        x = np.arange(sm.size) + w - 1
        smoothed[name] = (x, sm)
        style = dict(label=name, color=cmap(k % 10), linestyle=styles[k % len(styles)],
                     marker=markers[k % len(markers)], markevery=max(1, sm.size // 8),
                     markersize=5, linewidth=1.4)
        ax1.plot(x, sm, **style)
    # recipes whose losses lie on top of each other in the upper panel separate here
    if "baseline" in smoothed:
        bx, bs = smoothed["baseline"]
        for k, name in enumerate(names):
            if name == "baseline" or name not in smoothed:
                continue
            x, sm = smoothed[name]
            m = min(sm.size, bs.size)
            ax1d.plot(x[:m], sm[:m] - bs[:m], color=cmap(k % 10),
                      linestyle=styles[k % len(styles)], marker=markers[k % len(markers)],
                      markevery=max(1, m // 8), markersize=5, linewidth=1.2)
        ax1d.axhline(0.0, color="black", linewidth=1.0, linestyle=(0, (4, 3)), zorder=10)
        ax1d.set_ylabel("minus the baseline's loss")
    ax1d.set_xlabel("step")
    plt.setp(ax1.get_xticklabels(), visible=False)
    ax1.set_ylabel("training loss (moving avg., mean over seeds)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8, ncol=2)
    ax1.set_title("training loss")

    accs = [[100 * r.test_accuracy for r in results[n]] for n in names]
    mean = [float(np.mean(a)) for a in accs]
    std = [float(np.std(a, ddof=1)) if len(a) > 1 else 0.0 for a in accs]
    y = np.arange(len(names))
    ax2.barh(y, mean, xerr=std, color=[cmap(k % 10) for k in range(len(names))], capsize=3)
    ax2.set_yticks(y, names, fontsize=8)
    ax2.set_xlim(0, 100)  # from 0: a collapsed recipe must look collapsed
    for i, (a, e) in enumerate(zip(mean, std)):
        ax2.text(min(a + e, 88) + 1, i, f"{a:.1f}", va="center", fontsize=7)
    ax2.set_xlabel("test accuracy % (bars: std over seeds)")
    ax2.invert_yaxis()
    ax2.set_title("test accuracy")

    last = [results[n][-1].history[-1] for n in names]
    # a run too short for a metric step measured nothing: no bar (never 32 bits, which would
    # read as "uncompressed"), and the panel says so
    sp = [math.nan if row.get("sparsity") is None else float(row["sparsity"]) for row in last]
    bits = [math.nan if row.get("bits_per_element") is None else float(row["bits_per_element"])
            for row in last]
    h = 0.4
    measured = [not math.isnan(v) for v in sp]
    ax3.barh(y - h / 2, [v if ok else 0.0 for v, ok in zip(sp, measured)], height=h,
             color="0.35")
    ax3.set_xlim(0, 1)
    ax3.set_ylim(len(names) - 0.5, -0.5)  # first recipe on top
    for i, ok in enumerate(measured):
        if not ok:
            ax3.text(0.02, i, "not measured (no metric step ran)", va="center", fontsize=7)
    ax3.set_yticks(y, names, fontsize=8)
    ax3.set_xlabel("sparsity of the neural gradients (grey bars)")
    ax3b = ax3.twiny()
    ax3b.barh(y + h / 2, [b if ok else 0.0 for b, ok in zip(bits, measured)], height=h,
              color="C1")
    ax3b.set_xlim(0, 33)
    ax3b.set_ylim(len(names) - 0.5, -0.5)
    ax3b.set_xlabel("bits per neural-gradient element (orange bars)", color="C1")
    ax3.set_title("compression (last epoch)", pad=28)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _run_lm(args: argparse.Namespace, plan: list[tuple[str, str]]) -> int:
    """The language-model workload: each recipe trains ``--steps`` steps of AdamW (cosine) on
    byte windows of ``--context`` bytes, then validation loss and perplexity on the first 1024
    validation sequences (all with --quick's 256)."""
    from gradcomp.apps.train import TrainConfig

    for name, v in (("steps", args.steps), ("context", args.context)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be an int >= 1, got {v!r}")
    steps, max_val = (40, 256) if args.quick else (args.steps, 1024)
    seeds = list(range(args.seed, args.seed + args.seeds))
    out = Path(args.out)
    results, total = _train_all(args, plan, seeds, out, lambda name, seed, run_out: TrainConfig(
        recipe=name, model=args.model, dataset=args.dataset, batch_size=args.batch_size,
        lr=args.lr, optimizer="adamw", weight_decay=0.01, schedule="cosine", seed=seed,
        device=args.device, out=str(run_out), overwrite=True, data_dir=args.data_dir,
        max_train=args.max_train, width=args.width, progress=not args.quiet,
        max_steps=steps, max_test=max_val, context=args.context))

    def ppl(name):
        v = [r.val_perplexity for r in results[name]]
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else math.nan)

    base = ppl("baseline")[0] if "baseline" in results else math.nan
    rows, data = [], []
    for name, prediction in plan:
        mean, std = ppl(name)
        last = results[name][-1].history[-1]
        fmt = last.get("format", "")
        loss = statistics.fmean(r.val_loss for r in results[name])
        delta = mean - base
        rel = 100 * delta / base if math.isfinite(base) and base else math.nan
        sp = _measured_mean(r.history[-1].get("sparsity", 0.0) for r in results[name])
        bits = _measured_mean(r.history[-1].get("bits_per_element", 32.0)
                              for r in results[name])
        shown = f"{mean:.3f} +- {std:.3f}" if len(seeds) > 1 else f"{mean:.3f}"
        rows.append([name + (f" ({fmt})" if fmt else ""), shown, loss,
                     "-" if name == "baseline" else delta,
                     "-" if name == "baseline" else rel, sp, bits, prediction])
        data.append({"recipe": name, "format": fmt, "seeds": seeds, "val_perplexity": mean,
                     "val_perplexity_std": std, "val_loss": loss,
                     "val_perplexities": [r.val_perplexity for r in results[name]],
                     "delta_perplexity": 0.0 if name == "baseline" else delta,
                     "delta_percent": 0.0 if name == "baseline" else rel,
                     "sparsity": sp, "bits_per_element": bits,
                     "overflow": last.get("overflow"), "underflow": last.get("underflow"),
                     "skipped_steps": sum(r.history[-1].get("skipped_steps", 0)
                                          for r in results[name]),
                     "prediction": prediction, "history": [r.history for r in results[name]]})
    headers = ["recipe", "val perplexity", "val loss", "delta ppl", "delta %", "sparsity",
               "bits/elem", "paper predicts"]
    table = format_table(headers, rows, ".3f")
    seeds_txt = _seeds_text(seeds)
    setup = (f"{args.model} on {args.dataset} (byte tokens, context {args.context}), {steps} "
             f"steps, batch {args.batch_size}, AdamW lr {args.lr} cosine, validation on "
             f"{max_val} sequences, {seeds_txt}; total {total:.0f} s")
    note = ("val perplexity: exp(mean next-byte cross-entropy in nats) on the validation split "
            "(lower is better); delta: against the baseline. With one seed, differences of a "
            "few percent are within run-to-run noise at this scale (--seeds N to measure it).")
    print(f"\n{setup}\n\n{table}\n\n{note}\n")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", {"workload": "lm", "setup": setup, "rows": data})
    (out / "report.md").write_text(f"# gradcomp demo (language model)\n\n{setup}\n\n{table}\n\n"
                                   f"{note}\n")
    print(f"wrote {out / 'report.md'}, {out / 'demo.json'}")
    return 0
