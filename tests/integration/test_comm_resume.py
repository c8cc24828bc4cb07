"""Exact resume of compressed data-parallel training (2 gloo processes, CPU).

An uninterrupted run of T steps and a run stopped after K steps (model, optimizer and every
rank's hook state saved with ``torch.save``, then a fresh model with other initial weights, a
fresh DDP and a fresh hook built and loaded) must end with identical weights and identical byte
counters: the error-feedback memory (top-k, ScaleCom), the generators (QSGD's stochastic
rounding), the iteration counter (warm-up, ScaleCom's leader) and the counters are all in the
hook's state.
"""

import io

import pytest
import torch
from _ddp_worker import digits_split, spawn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcomp.integration import ddp_hooks as H

RUNS = {
    "topk": ("topk", {"ratio": 0.05}),
    "scalecom": ("scalecom", {"ratio": 0.05, "beta": 0.5}),
    "qsgd": ("qsgd", {"levels": 4, "bucket_size": 128}),
    "qsgd_bits": ("qsgd", {"levels": 4, "bucket_size": 128, "bitstream": True}),
    "powersgd": ("powersgd", {"matrix_approximation_rank": 2}),
}
STEPS, STOP = 6, 3  # the stop lies after the fp32 warm-up (start_iter 2): memory is non-empty


def _build(name, init_seed):
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    ddp = DDP(model, bucket_cap_mb=0.005)  # several buckets: memory keyed by bucket index
    method, kw = RUNS[name]
    state, hook = H.make_comm_hook(method, **kw)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    return model, ddp, state, opt


def _steps(ddp, opt, xs, ys, rank, start, stop):
    for t in range(start, stop):  # the batch depends only on (rank, step): same after resume
        g = torch.Generator().manual_seed(1000 * t + rank)
        idx = torch.randint(len(ys), (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(xs[idx]), ys[idx]).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _session(rank, world):
    xs, ys, _, _ = digits_split(rank, world)
    out = {}
    for name in RUNS:
        model, ddp, state, opt = _build(name, 0)
        _steps(ddp, opt, xs, ys, rank, 0, STEPS)
        whole = (_flat(model), state.metrics())

        model, ddp, state, opt = _build(name, 0)
        _steps(ddp, opt, xs, ys, rank, 0, STOP)
        buf = io.BytesIO()  # what a checkpoint holds: every rank's hook state
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "comm": state.gather_state_dict()}, buf)
        stopped_metrics = state.metrics()
        del model, ddp, state, opt
        buf.seek(0)
        ck = torch.load(buf, weights_only=False)
        model, ddp, state, opt = _build(name, 123)  # other initial weights: the load must matter
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state.load_state_dict(ck["comm"])
        resumed_metrics0 = state.metrics()
        H.prime_buckets(ddp, state, xs[:4])  # the first step must see DDP's rebuilt buckets
        _steps(ddp, opt, xs, ys, rank, STOP, STEPS)
        out[name] = {"whole": whole, "resumed": (_flat(model), state.metrics()),
                     "stopped": stopped_metrics, "loaded": resumed_metrics0}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn("test_comm_resume:_session", tmp_path_factory.mktemp("resume"), 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_resume_ends_with_identical_weights_and_counters(results, name):
    for r in results:
        (w_whole, m_whole), (w_res, m_res) = r[name]["whole"], r[name]["resumed"]
        assert torch.equal(w_whole, w_res), f"{name}: max |diff| {(w_whole - w_res).abs().max()}"
        assert r[name]["loaded"] == r[name]["stopped"]  # counters restored, not restarted
        assert m_res == m_whole  # bytes_sent continues: 6 steps counted, not 3
        assert m_whole["iterations"] == STEPS
    # the compressed runs really compressed after the warm-up
    assert results[0][name]["whole"][1]["last_step_ratio"] > 2


