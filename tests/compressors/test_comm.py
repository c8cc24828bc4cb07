"""Communication compressors: QSGD statistics and bit stream, top-k, ScaleCom, FP, memory."""

import math

import numpy as np
import pytest
import torch

from gradcomp.compressors.comm import (
    QSGD,
    Aggregation,
    ErrorFeedback,
    FPQuantize,
    IncompatibleAggregationError,
    ScaleCom,
    StochasticPrune,
    TopK,
    payload_bytes,
    qsgd_bits_bound,
    require_aggregation,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("s,d", [(1, 64), (4, 64), (16, 32)])
def test_qsgd_unbiased_and_second_moment(s, d):
    torch.manual_seed(0)
    x = torch.randn(4 * d) * torch.exp(torch.randn(4 * d))  # heavy-tailed, like gradients
    reps = 4000
    q = QSGD(levels=s, bucket_size=d)
    # buckets never straddle copies (4 d is a multiple of d), so each row is an independent draw
    y = q.decompress(q.compress(x.repeat(reps), _gen(1)), x.numel() * reps).view(reps, -1)
    mean = y.double().mean(0)
    # per coordinate Var(Q_i) = (||v||/s)^2 p (1 - p) <= (||v||/s)^2 / 4, so the standard error of
    # the mean over `reps` draws is <= ||v|| / (2 s sqrt(reps)); 5 of those bound every one of the
    # 4 d coordinates except with probability < 4 d * 6e-7 (normal tail, CLT over 4000 draws).
    norms = x.double().view(-1, d).norm(dim=1).repeat_interleave(d)
    se = norms / (2 * s * math.sqrt(reps))
    assert torch.all((mean - x.double()).abs() <= 5 * se + 1e-12)
    # second moment: exact E||Q||^2 = sum (||v||/s)^2 (l^2 + (2l + 1) p), and the seed's bound
    r = s * x.double().abs() / norms
    low = torch.floor(r)
    exact = ((norms / s) ** 2 * (low**2 + (2 * low + 1) * (r - low))).sum()
    sq = (y.double() ** 2).sum(1)
    assert abs(sq.mean() - exact) <= 5 * sq.std() / math.sqrt(reps)
    bound = (1 + min(d / s**2, math.sqrt(d) / s)) * (x.double() ** 2).sum()
    assert exact <= bound
    assert sq.mean() <= bound + 5 * sq.std() / math.sqrt(reps)


def test_qsgd_levels_and_special_values():
    q = QSGD(levels=4, bucket_size=8)
    x = torch.tensor([3.0, -4.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, float("nan")])
    norms, lv = q.compress(x, _gen())
    assert lv.dtype == torch.int8 and lv.abs().max() <= 4
    assert norms[0] == 5.0 and norms[1] == 0.0
    y = q.decompress([norms, lv], x.numel())
    assert torch.all(y[8:16] == 0)  # zero bucket stays exactly zero
    assert torch.isnan(y[16:]).all()  # the NaN bucket is NaN everywhere, never silently finite
    assert QSGD(levels=200).level_dtype == torch.int16


@pytest.mark.parametrize(
    "kw,match",
    [({"levels": 0}, "levels"), ({"bucket_size": 0}, "bucket_size"), ({"code": "delta"}, "code")],
)
def test_qsgd_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QSGD(**kw)


@pytest.mark.parametrize("code", ["omega", "gamma"])
def test_qsgd_bitstream_round_trip_and_size(code):
    torch.manual_seed(0)
    q = QSGD(levels=2, bucket_size=128, code=code)
    x = torch.randn(1000)
    norms, lv = q.compress(x, _gen())
    data = q.encode(norms, lv, x.numel())
    n2, l2, n = q.decode(data)
    assert n == 1000 and torch.equal(n2, norms) and torch.equal(l2, lv)
    assert data.size == -(-q.encoded_bits(norms, lv, 1000) // 8)
    # far below 32 bits per coordinate; and within the seed's (asymptotic) bound + header
    bpc = 8 * data.size / 1000
    assert bpc < qsgd_bits_bound(2, 128) + 208 / 1000 + 0.5


def test_qsgd_corrupted_streams_raise():
    q = QSGD(levels=4, bucket_size=64)
    norms, lv = q.compress(torch.randn(500), _gen())
    data = q.encode(norms, lv, 500)
    with pytest.raises(ValueError, match="magic"):
        bad = data.copy()
        bad[0] ^= 0xFF
        q.decode(bad)
    for cut in (1, 10, data.size - 20):
        with pytest.raises(ValueError, match="truncated|corrupted"):
            q.decode(data[:-cut])
    with pytest.raises(ValueError, match="trailing"):
        q.decode(np.concatenate([data, np.array([0xFF], np.uint8)]))
    with pytest.raises(ValueError, match="levels=4"):
        QSGD(levels=8, bucket_size=64).decode(data)
    # a level above s: rewrite the stream of a compressor with larger s but the same header s
    big = QSGD(levels=4, bucket_size=64)
    lv2 = lv.clone()
    lv2[lv2.nonzero()[0]] = 9
    with pytest.raises(ValueError, match="exceeds s"):
        big.decode(big.encode(norms, lv2, 500))


def test_topk_and_payload_bytes():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3])
    t = TopK(ratio=0.25)
    p = t.compress(x)
    assert sorted(p[0].tolist()) == [1, 3]
    y = t.decompress(p, 8)
    assert y.tolist() == [0, -5.0, 0, 3.0, 0, 0, 0, 0]
    assert payload_bytes(p) == 2 * 4 + 2 * 4
    with pytest.raises(ValueError, match="ratio"):
        TopK(ratio=1.5)


def test_error_feedback_conserves_residual():
    torch.manual_seed(0)
    ef, t = ErrorFeedback(1.0), TopK(ratio=0.1)
    total_g, total_sent = torch.zeros(100), torch.zeros(100)
    for _ in range(20):
        g = torch.randn(100)
        c = ef.compensate("w", g)
        sent = t.decompress(t.compress(c), 100)
        ef.update("w", c, sent)
        total_g += g
        total_sent += sent
    torch.testing.assert_close(total_sent + ef.memory["w"], total_g, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="key 'w'"):
        ef.compensate("w", torch.zeros(7))


def test_low_pass_error_feedback_formula():
    ef = ErrorFeedback(beta=0.25)
    m0 = torch.tensor([1.0, -2.0, 0.5])
    ef.memory["k"] = m0.clone()
    g = torch.tensor([0.5, 0.5, 0.5])
    c = ef.compensate("k", g)
    sent = torch.tensor([1.5, 0.0, 0.0])
    ef.update("k", c, sent)
    # notes section 6: m <- (1 - beta) m + beta (m + g - C(m + g))
    torch.testing.assert_close(ef.memory["k"], 0.75 * m0 + 0.25 * (m0 + g - sent))
    with pytest.raises(ValueError, match="beta"):
        ErrorFeedback(beta=0.0)


def test_scalecom_selects_and_gathers():
    sc = ScaleCom(ratio=0.3, beta=0.5)
    assert [sc.leader(t, 3) for t in range(5)] == [0, 1, 2, 0, 1]
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3, 0.0, 0.0])
    idx = sc.select(x)
    assert idx.tolist() == [1, 3, 6]
    (vals,) = sc.compress(x, idx)
    assert sc.decompress([vals], idx, 10).tolist() == [0, -5.0, 0, 3.0, 0, 0, 1.0, 0, 0, 0]
    with pytest.raises(ValueError, match="beta"):
        ScaleCom(beta=1.5)


def test_aggregation_pairing_refused():
    assert QSGD().aggregation is Aggregation.ALLGATHER
    assert ScaleCom().aggregation is Aggregation.ALLREDUCE
    with pytest.raises(IncompatibleAggregationError, match="QSGD declares allgather"):
        require_aggregation(QSGD(), Aggregation.ALLREDUCE)
    with pytest.raises(IncompatibleAggregationError):
        require_aggregation(TopK(), Aggregation.ALLREDUCE)
    require_aggregation(ScaleCom(), Aggregation.ALLREDUCE)


def test_fp_quantize_round_trip_and_unbiased():
    c = FPQuantize(fmt="e4m3fn", rounding="stochastic", compile=False)
    torch.manual_seed(0)
    x = torch.randn(512) * 1e-3
    codes, s = c.compress(x, _gen())
    assert codes.dtype == torch.uint8 and payload_bytes([codes, s]) == 512 + 4
    assert s.item() == 2.0 ** math.floor(-torch.log2(x.abs()).mean().item() - 3)
    # decoded values lie on the e4m3fn grid after scaling
    y = c.decompress([codes, s], 512)
    grid = torch.tensor(c.format.grid(), dtype=torch.float32)
    assert torch.isin((y * s).abs(), grid).all()
    # unbiased: mean over 2000 draws within 5 standard errors; a draw takes one of the two grid
    # neighbours, so its std is <= spacing / 2 and the SE of the mean <= spacing / (2 sqrt n)
    reps = 2000
    ys = c.decompress(c.compress(x[:64].repeat(reps), _gen(2)), 64 * reps).view(reps, 64)
    k = torch.searchsorted(grid, (x[:64] * s).abs(), right=True)
    spacing = (grid[k] - grid[k - 1]) / s
    assert torch.all((ys.double().mean(0) - x[:64]).abs() <= 5 * spacing / (2 * math.sqrt(reps)))
    assert FPQuantize(fmt="1-5-2").wire[0] == torch.bfloat16
    with pytest.raises(ValueError, match="rounding"):
        FPQuantize(rounding="up")


def test_stochastic_prune_sparsity_and_unbiased(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")  # eager path: same numbers, no compile time
    torch.manual_seed(0)
    n = 20000
    x = torch.randn(n).sign() * torch.exp(1.5 * torch.randn(n) - 4)  # exactly lognormal |x|
    c = StochasticPrune(sparsity=0.9)
    idx, vals = c.compress(x, _gen())
    # achieved sparsity: binomial over n elements, SD = sqrt(0.9 * 0.1 / n) = 0.0021; 5 SD
    assert abs(1 - idx.numel() / n - 0.9) < 5 * math.sqrt(0.09 / n) + 0.005
    y = c.decompress([idx, vals], n)
    a = c.threshold(x)
    small = x.abs() < a
    assert torch.all((y[small] == 0) | (y[small].abs() == a.float()))  # Eq. 5: 0 or sign(x) a
    assert torch.equal(y[~small], x[~small])
    # unbiased in total: sum(T(x) - x) has variance sum over pruned |x| (a - |x|) <= n a^2 / 4
    se = math.sqrt(float((x.abs() * (a - x.abs())).clamp_min(0)[small].sum()))
    assert abs(float((y - x).sum())) <= 5 * se
    # an all-zero bucket is not pruned and costs nothing
    idx0, _ = c.compress(torch.zeros(100), _gen())
    assert idx0.numel() == 0
