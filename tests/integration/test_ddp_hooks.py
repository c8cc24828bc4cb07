"""DDP comm hooks on 2 gloo processes (CPU): training, identical replicas, ScaleCom, EF, errors.

One spawn runs every distributed check (``_session``) and the tests read its results: starting
two torch processes costs seconds on a shared CPU, so they are started once per module.
"""

import pytest
import torch
import torch.distributed as dist
from _ddp_worker import METHODS, FakeBucket, spawn, train_digits

from gradcomp.compressors.comm import QSGD, BlockCompress, ScaleCom, TopK
from gradcomp.integration import ddp_hooks as H
from gradcomp.integration.wrap import CompressionConfig, QuantizeSpec, compress_gradients

WORLD = 2


def _methods():
    return [m for m in METHODS if m.split("_")[0] in H.available_methods()]


def _ef_run(state, hook, rank, steps=5, n=300):
    """Drive a hook with FakeBuckets; return per-step data for conservation checks."""
    rec = {"g": [], "out": [], "idx": [], "corrected": []}
    for t in range(steps):
        g = torch.randn(n, generator=torch.Generator().manual_seed(100 * t + rank))
        corrected = state.memory.compensate(0, g) if t >= state.start_iter else g.clone()
        out = hook(state, FakeBucket(g.clone())).wait()
        if isinstance(out, list):
            out = out[0]
        rec["g"].append(g)
        rec["out"].append(out.clone())
        rec["corrected"].append(corrected)
        rec["idx"].append(getattr(state, "last_indices", None) if t >= state.start_iter else None)
    rec["memory"] = state.memory.memory[0].clone()
    return rec


def _dynamic_scale_skips(rank):
    """compress_gradients with one dynamic loss scale on every rank, the same data on both, and
    rank 0's loss x 1e30 at step 30, once the scale has settled (its neural gradients overflow
    the scale; alone, rank 1 takes that step): which steps each rank skipped, and its weights
    after step 30."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    h = compress_gradients(m, CompressionConfig(
        quantize=QuantizeSpec(bits=4, scaling="dynamic"), nonfinite="keep"))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    skips = []
    for step in range(31):
        loss = m(torch.randn(16, 6, generator=g)).square().mean()
        if rank == 0 and step == 30:
            loss = loss * 1e30
        opt.zero_grad()
        loss.backward()
        skips.append(not h.step(opt))
    return skips, torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _session(rank, world):
    out = {"train": {}, "dynamic": _dynamic_scale_skips(rank)}
    for name in _methods():
        acc, flat, state = train_digits(name, rank, world)
        out["train"][name] = {"acc": acc, "flat": flat, "metrics": state.metrics(),
                              "compressor": state.config.get("name")}
    sc = H.CommHookState(ScaleCom(ratio=0.1), start_iter=1)
    out["scalecom"] = _ef_run(sc, H.scalecom_hook, rank)
    tk = H.CommHookState(TopK(ratio=0.1), start_iter=1)
    out["topk"] = _ef_run(tk, H.topk_hook, rank)
    try:
        H.make_comm_hook("qsgd", levels=4 + rank)
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # an empty bucket is a no-op on every rank: nothing sent, nothing stored, iteration counted
    out["empty"] = {}
    for name, comp in (("topk", TopK(ratio=0.1)), ("scalecom", ScaleCom(ratio=0.1)),
                       ("qsgd", QSGD(bitstream=True))):
        st = H.CommHookState(comp, start_iter=1)
        st.iter = 1
        res = H.comm_hook(st, FakeBucket(torch.zeros(0))).wait()
        out["empty"][name] = (res.numel(), st.metrics()["bytes_sent"], st.iter,
                              st.state_dict()["memory"])
    # per-period counters (one epoch, say) next to the cumulative ones
    st = H.CommHookState(TopK(ratio=0.1), start_iter=1)
    for _ in range(2):
        H.comm_hook(st, FakeBucket(torch.randn(100))).wait()
    first = st.metrics(reset=True)
    H.comm_hook(st, FakeBucket(torch.randn(100))).wait()
    out["period"] = (first, st.metrics())
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn("test_ddp_hooks:_session", tmp_path_factory.mktemp("ddp"), WORLD)


def test_a_loss_scale_overflow_on_one_rank_skips_the_step_on_every_rank(results):
    # rank 0 alone overflows at step 30; a rank that stepped there would leave the replicas apart
    (skips0, w0), (skips1, w1) = results[0]["dynamic"], results[1]["dynamic"]
    assert skips0[30] and skips0 == skips1
    assert not all(skips0)  # the other steps were taken
    assert torch.equal(w0, w1)


def test_every_hook_trains_and_replicas_stay_identical(results):
    base = results[0]["train"]["allreduce"]["acc"]
    assert base > 0.9  # the uncompressed reference must itself have learned digits
    for name in _methods():
        r0, r1 = results[0]["train"][name], results[1]["train"][name]
        assert torch.equal(r0["flat"], r1["flat"]), f"{name}: replicas diverged"
        # tolerance: 3 points of test accuracy = 11 of 360 test digits (measured gaps were <= 0.6
        # points; a hook that breaks averaging or loses the residual costs far more)
        assert r0["acc"] >= base - 0.03, f"{name}: {r0['acc']:.3f} vs uncompressed {base:.3f}"


def test_bytes_counted_and_compression_ratio(results):
    m = {k: v["metrics"] for k, v in results[0]["train"].items()}
    assert m["allreduce"]["compression_ratio"] == 1.0
    assert m["fp16"]["compression_ratio"] == 2.0
    for name in ("qsgd", "qsgd_bits", "topk", "scalecom", "powersgd", "fp"):
        if name.split("_")[0] in H.available_methods():
            assert m[name]["last_step_ratio"] > 2.5, (name, m[name])
    assert m["qsgd_bits"]["last_step_ratio"] > m["qsgd"]["last_step_ratio"]
    # block formats: bytes actually sent (codes + scales, + t per bucket for NVFP4) against the
    # large-bucket limit 32 / bits_per_element; the buckets here hold ~2500 elements, so the
    # ragged last block and t cost well under 1%
    for name, fmt in (("block_mxfp8", "mxfp8_e4m3"), ("block_nvfp4", "nvfp4")):
        limit = 32 / BlockCompress(fmt=fmt).bits_per_element
        assert 0.99 * limit < m[name]["last_step_ratio"] <= limit, (name, m[name], limit)


def test_fp_with_a_block_format_is_block_compress(results):
    for r in results:
        assert r["train"]["block_mxfp8"]["compressor"] == "BlockCompress"
        assert r["train"]["block_nvfp4"]["compressor"] == "BlockCompress"
        assert r["train"]["fp"]["compressor"] == "FPCompress"


def test_scalecom_indices_shared_and_values_averaged(results):
    a, b = results[0]["scalecom"], results[1]["scalecom"]
    for t in range(1, len(a["g"])):
        idx = a["idx"][t].long()
        assert torch.equal(idx, b["idx"][t].long())
        # the leader (t mod 2) picked the top-k of its own m + g
        lead = (a, b)[t % WORLD]
        k = idx.numel()
        top = torch.topk(lead["corrected"][t].abs(), k).indices
        assert set(top.tolist()) == set(idx.tolist())
        want = torch.zeros_like(a["out"][t])
        want[idx] = (a["corrected"][t][idx] + b["corrected"][t][idx]) / WORLD
        torch.testing.assert_close(a["out"][t], want, rtol=1e-6, atol=1e-7)
        assert torch.equal(a["out"][t], b["out"][t])


@pytest.mark.parametrize("name", ["scalecom", "topk"])
def test_error_feedback_conserves_residual(results, name):
    # sent + memory = accumulated gradient: sum_t world * avg_t + sum_r m_r = sum_t sum_r g_r
    a, b = results[0][name], results[1][name]
    sent = sum(WORLD * o for o in a["out"])
    grads = sum(a["g"]) + sum(b["g"])
    torch.testing.assert_close(sent + a["memory"] + b["memory"], grads, rtol=0, atol=1e-4)


def test_config_mismatch_names_the_differing_field(results):
    for r in results:
        assert r["mismatch"] is not None and "different comm-hook configurations" in r["mismatch"]
        assert "differing fields: levels)" in r["mismatch"]
        assert "rank 0 4, rank 1 5" in r["mismatch"]


@pytest.mark.parametrize("name", ["topk", "scalecom", "qsgd"])
def test_empty_bucket_is_a_no_op(results, name):
    for r in results:
        numel, sent, iters, memory = r["empty"][name]
        assert (numel, sent, iters) == (0, 0, 2)
        assert memory is None or memory["memory"] == {}


def test_the_named_hooks_are_one_hook():
    assert H.qsgd_hook is H.topk_hook is H.scalecom_hook is H.prune_hook is H.fp_hook
    assert H.block_hook is H.comm_hook
    assert H.qsgd_hook is H.comm_hook
    with pytest.raises(TypeError, match="CommHookState"):
        H.comm_hook(object(), FakeBucket(torch.zeros(3)))


def test_validate_comm_names_method_and_suggests():
    with pytest.raises(ValueError, match="'qsdg' is not a method; did you mean 'qsgd'") as e:
        H.validate_comm("qsdg", {})
    assert "allowed: allreduce, fp16, powersgd, qsgd, topk, scalecom, prune, fp, block" in str(
        e.value)
    with pytest.raises(ValueError, match="is not a method; allowed"):
        H.validate_comm("zzz", {})
    with pytest.raises(ValueError, match="is not a method"):
        H.validate_comm(None, {})


@pytest.mark.parametrize("method,options,match", [
    ("qsgd", {"level": 8}, "'level' is not accepted by qsgd; did you mean 'levels'.*allowed: "
                           "bitstream, bucket_size, check_config, code, levels, seed, start_iter"),
    ("qsgd", {"levels": "8"}, "'levels' of qsgd must be int; got str '8'"),
    ("qsgd", {"levels": 8.0}, "'levels' of qsgd must be int"),
    ("qsgd", {"bitstream": 1}, "'bitstream' of qsgd must be bool"),
    ("qsgd", {"levels": 0}, "levels"),
    ("qsgd", {"beta": 0.5}, "'beta' is not accepted by qsgd"),
    ("topk", {"ratio": "0.1"}, "'ratio' of topk must be float"),
    ("topk", {"ratio": 1.5}, "ratio"),
    ("topk", {"beta": 0.0}, "'beta' must lie in"),
    ("topk", {"start_iter": 0}, "'start_iter' must be >= 1"),
    ("topk", {"seed": True}, "'seed' of topk must be int"),
    ("scalecom", {"beta": 2.0}, "beta"),
    ("fp", {"fmt": "e9m9"}, "comm option of fp"),
    ("fp", {"compile": "no"}, "'compile' of fp must be bool | None"),
    ("fp", {"fmt": "mxfp4", "scale": "amax"},
     "'scale' is not accepted by fp with block format 'mxfp4' \\(its scales are the format's "
     "own, one per block\\); allowed: check_config, compile, fmt, rounding, seed, start_iter"),
    ("fp", {"fmt": "nvfp4_2d"}, "comm option of fp: fmt 'nvfp4_2d' has 2-D tiles.*one of "
                                "mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4, "
                                "fp8_block128"),
    ("fp", {"fmt": "mxfp9"}, "comm option of fp: fmt 'mxfp9' is not a format.*or a block format "
                             "\\(mxfp8_e4m3, .*fp8_block128"),
    ("block", {"fmt": "e4m3fn"}, "comm option of block: fmt must be a block format: one of "
                                 "mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4, "
                                 "fp8_block128"),
    ("block", {"rounding": "up"}, "comm option of block: rounding must be one of 'stochastic', "
                                  "'nearest'"),
    ("block", {"fmt": "mxfp4", "beta": 0.5}, "'beta' is not accepted by block"),
    ("block", {"fmt": 4}, "'fmt' of block must be str"),
    ("allreduce", {"ratio": 0.1}, "'ratio' is not accepted by allreduce; allowed: check_config"),
    ("powersgd", {"rank": 2}, "did you mean 'matrix_approximation_rank'"),
    ("powersgd", {"matrix_approximation_rank": 0}, "must be >= 1"),
    ("qsgd", [("levels", 8)], "must be a dict"),
])
def test_validate_comm_refuses_bad_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        H.validate_comm(method, options)
    if isinstance(options, dict):  # make_comm_hook refuses them before any collective
        with pytest.raises(ValueError, match=match):
            H.make_comm_hook(method, **options)


def test_validate_comm_accepts_good_options():
    for method, options in [("qsgd", {"levels": 8, "bucket_size": 256, "bitstream": True}),
                            ("topk", {"ratio": 0.01, "beta": 0.5, "start_iter": 3, "seed": 1}),
                            ("scalecom", {"ratio": 0.1, "beta": 0.5}), ("prune", {}),
                            ("fp", {"fmt": "e5m2", "compile": None, "scale": "amax"}),
                            ("fp", {"fmt": "mxfp8_e4m3"}), ("fp", {"fmt": "nvfp4"}),
                            ("fp", {"fmt": "mxfp4", "rounding": "nearest", "start_iter": 3}),
                            ("block", {}), ("block", {"fmt": "e4m3fn:32:e8m0:rceil"}),
                            ("powersgd", {"matrix_approximation_rank": 2}), ("fp16", {})]:
        assert H.validate_comm(method, options) is None
    assert set(H.available_methods()) == {"allreduce", "fp16", "powersgd", "qsgd", "topk",
                                          "scalecom", "prune", "fp", "block"}


def test_period_and_cumulative_counters(results):
    first, second = results[0]["period"]
    # step 1 is the fp32 warm-up (400 bytes), then top-k 10%: 10 int32 + 10 fp32 = 80 bytes
    assert (first["bytes_sent"], first["period_bytes_sent"]) == (480, 480)
    assert (second["bytes_sent"], second["period_bytes_sent"]) == (560, 80)
    assert second["period_compression_ratio"] == 400 / 80
    assert second["compression_ratio"] == 1200 / 560
