"""Time the pruning threshold refresh for many layers: Eq. 8 and the empirical solve.

Both solves run for ``--layers`` layers at once, as ``PrunerGroup.update`` calls them:

* ``lognormal_threshold`` (Eq. 8) from per-layer (mu, sigma, zero fraction); target 1 ms;
* ``empirical_threshold`` on ``--layers`` samples of ``--sample`` float32 values, given as a
  list of tensors (what ``PrunerGroup`` passes) and as one padded matrix; target 5 ms.

References measured in the same run, interleaved with the solves so that all see the same
machine load: the previous Eq. 8 solver (60 safeguarded Newton/bisection steps, still the
fallback of the current one), the previous empirical solver (torch.sort plus passes over the
whole matrix, reproduced below) and ``torch.sort`` of the same matrix, its dominant step.
Every figure is the minimum over ``--rounds`` x ``--repeats`` calls. Usage:

    python benchmarks/bench_refresh.py [--layers 100] [--sample 4096] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradcomp.numerics.sparsity import (
    _bracketed_solve,
    empirical_threshold,
    lognormal_threshold,
)

TARGET_MS = {"lognormal": 1.0, "empirical": 5.0}


def _previous_empirical(sample: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The previous empirical solver on a (rows, n) matrix of finite values (same results)."""
    v, _ = torch.sort(sample.double().abs(), dim=1)
    n = v.shape[1]
    P = torch.cumsum(v, dim=1)
    j = torch.arange(1, n + 1, dtype=torch.float64)
    f_knot = ((j - 1) - (P - v) / v.clamp_min(1e-300)) / n
    f_knot = torch.where(v > 0, f_knot, torch.zeros_like(f_knot))
    jstar = (f_knot <= sparsity).sum(1, keepdim=True)
    Pj = torch.gather(P, 1, (jstar - 1).clamp_min(0))
    a = Pj / (jstar.to(torch.float64) - n * sparsity)
    zeros = (v == 0).sum(1, keepdim=True)
    return torch.where((zeros >= n * sparsity) | (jstar == 0), torch.zeros_like(a), a).reshape(-1)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--sample", type=int, default=4096, help="values per layer sample")
    p.add_argument("--repeats", type=int, default=20, help="calls per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--sparsity", type=float, default=0.8)
    args = p.parse_args(argv)
    L, S = args.layers, args.sparsity
    g = torch.Generator().manual_seed(1)
    mu = -12 + 6 * torch.rand(L, generator=g, dtype=torch.float64)
    sig = 1 + 3 * torch.rand(L, generator=g, dtype=torch.float64)
    z = 0.5 * torch.rand(L, generator=g, dtype=torch.float64)
    s_nz = (S - z) / (1 - z)
    mat = torch.exp(torch.randn(L, args.sample, generator=g) * 2)
    mat *= torch.where(torch.rand(L, args.sample, generator=g) < 0.5, -1.0, 1.0)
    samples = list(mat.unbind(0))

    a_new = lognormal_threshold(S, mu, sig, z)
    a_old = torch.exp(mu + _bracketed_solve(s_nz, sig))
    e_new = empirical_threshold(samples, S)
    e_old = _previous_empirical(mat, S)
    print(f"{L} layers, sparsity {S}; threads {torch.get_num_threads()}; agreement with the "
          f"previous solvers: Eq. 8 max rel diff "
          f"{float(((a_new - a_old) / a_old).abs().max()):.1e}, empirical "
          f"{int((e_new == e_old).sum())}/{L} bit-identical")

    cases = {
        "lognormal (Eq. 8)": lambda: lognormal_threshold(S, mu, sig, z),
        "  previous 60-step solve": lambda: _bracketed_solve(s_nz, sig),
        f"empirical, list of {L}": lambda: empirical_threshold(samples, S),
        "empirical, padded matrix": lambda: empirical_threshold(mat, S),
        "  previous empirical": lambda: _previous_empirical(mat, S),
        "  torch.sort of the matrix": lambda: torch.sort(mat, dim=1),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):  # interleaved: every case sees the same load
        for name, fn in cases.items():
            fn()
            best[name] = min(best[name], _best(fn, args.repeats))
    print(f"{'case':<28s} {'min ms':>8s}  vs target")
    for name, t in best.items():
        target = TARGET_MS["lognormal" if "Eq. 8" in name else "empirical"]
        note = f"{t * 1e3 / target:.2f}x of {target:g} ms" if not name.startswith(" ") else ""
        print(f"{name:<28s} {t * 1e3:8.3f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
