"""Communication compressors: QSGD statistics and bit stream, top-k, ScaleCom, FP, block
formats, memory."""

import math
import zlib

import numpy as np
import pytest
import torch

from gradcomp.compressors.comm import (
    BLOCK_COMM_FORMATS,
    QSGD,
    Aggregation,
    BlockCompress,
    ErrorFeedback,
    FPCompress,
    IncompatibleAggregationError,
    ScaleCom,
    StochasticPrune,
    TopK,
    payload_bytes,
    qsgd_bits_bound,
    require_aggregation,
)
from gradcomp.numerics.block import NAMED_BLOCK_FORMATS, block_scales, quantize_block


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
    # second moment: exact E||Q||^2 = sum (||v||/s)^2 (l^2 + (2l + 1) p), and QSGD Lemma 3.1's bound
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
    # the payload form: one uint8 tensor, decoded by decompress to the same values
    qb = QSGD(levels=2, bucket_size=128, code=code, bitstream=True)
    (stream,) = qb.compress(x, _gen())
    assert stream.dtype == torch.uint8 and np.array_equal(stream.numpy(), data)
    assert torch.equal(qb.decompress([stream], 1000), q.decompress([norms, lv], 1000))
    assert payload_bytes([stream]) <= qb.wire_bytes(1000)
    assert data.size == -(-q.encoded_bits(norms, lv, 1000) // 8)
    # far below 32 bits per coordinate; within QSGD's (asymptotic) code-length bound plus the
    # header and CRC (30 bytes)
    bpc = 8 * data.size / 1000
    assert bpc < qsgd_bits_bound(2, 128) + 240 / 1000 + 0.5


def _with_crc(body: np.ndarray) -> np.ndarray:
    """A stream body with a valid CRC-32 appended (so the decoder parses past the checksum)."""
    crc = zlib.crc32(body.tobytes()).to_bytes(4, "big")
    return np.concatenate([body, np.frombuffer(crc, np.uint8)])


def test_qsgd_corrupted_streams_raise():
    q = QSGD(levels=4, bucket_size=64)
    norms, lv = q.compress(torch.randn(500), _gen())
    data = q.encode(norms, lv, 500)
    with pytest.raises(ValueError, match="CRC"):
        bad = data.copy()
        bad[0] ^= 0xFF
        q.decode(bad)
    with pytest.raises(ValueError, match="magic"):
        bad = data[:-4].copy()
        bad[0] ^= 0xFF
        q.decode(_with_crc(bad))
    for cut in (1, 10, data.size - 20, data.size - 1, data.size):
        with pytest.raises(ValueError, match="truncated|corrupted"):
            q.decode(data[:-cut])
    with pytest.raises(ValueError, match="CRC"):
        q.decode(np.concatenate([data, np.array([0xFF], np.uint8)]))
    with pytest.raises(ValueError, match="trailing"):  # an extra byte under a valid CRC
        q.decode(_with_crc(np.concatenate([data[:-4], np.zeros(1, np.uint8)])))
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
    # ScaleCom's low-pass filter: m <- (1 - beta) m + beta (m + g - C(m + g))
    torch.testing.assert_close(ef.memory["k"], 0.75 * m0 + 0.25 * (m0 + g - sent))
    with pytest.raises(ValueError, match="beta"):
        ErrorFeedback(beta=0.0)


def test_scalecom_selects_and_gathers():
    sc = ScaleCom(ratio=0.3, beta=0.5)
    assert [sc.leader(t, 3) for t in range(5)] == [0, 1, 2, 0, 1]
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3, 0.0, 0.0])
    idx = sc.select(x)
    assert idx.tolist() == [1, 3, 6]
    (vals,) = sc.compress(x, indices=idx)
    assert sc.decompress([vals], 10, indices=idx).tolist() == [0, -5.0, 0, 3.0, 0, 0, 1.0, 0, 0, 0]
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
    c = FPCompress(fmt="e4m3fn", rounding="stochastic", compile=False)
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
    assert FPCompress(fmt="1-5-2").wire[0] == torch.bfloat16
    assert c.wire_bytes(512) == 512 + 4
    with pytest.raises(ValueError, match="rounding"):
        FPCompress(rounding="up")


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


def _old_fp_scale(x, scale, fmt):
    """The scale rules FPCompress had before it used numerics.scales (numbers must not change)."""
    from gradcomp.numerics.fit import fit_lognormal

    if scale == "lognormal":
        e = torch.floor(-fit_lognormal(x).mean_log2 - 3).float()
    else:
        e = torch.floor(torch.log2(fmt.max_normal / x.abs().amax().float()))
    e = torch.clamp(torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0), -126, 126)
    return torch.exp2(e)


@pytest.mark.parametrize("scale", ["lognormal", "amax"])
def test_fp_compress_scales_are_the_shared_rules(scale):
    c = FPCompress(fmt="e4m3fn", scale=scale, compile=False)
    g = _gen(3)
    for _ in range(200):
        x = torch.randn(64, generator=g) * torch.exp(8 * torch.randn(1, generator=g))
        assert c.scale_of(x).item() == _old_fp_scale(x, scale, c.format).item()
    for x in (torch.zeros(8), torch.full((4,), float("nan")), torch.tensor([float("inf"), 1.0])):
        assert c.scale_of(x).item() == _old_fp_scale(x, scale, c.format).item()


def test_fp_compress_parses_format_once_and_checks_types():
    c = FPCompress(fmt="e5m2")
    assert c.format is c.format  # parsed at construction, not per access
    with pytest.raises(ValueError):
        FPCompress(fmt="e9m9")
    with pytest.raises(TypeError, match="compile"):
        FPCompress(compile="yes")


@pytest.mark.parametrize("comp", [QSGD(levels=4, bucket_size=16), TopK(ratio=0.1),
                                  FPCompress(compile=False), StochasticPrune(sparsity=0.5),
                                  QSGD(levels=4, bucket_size=16, bitstream=True),
                                  BlockCompress(compile=False),
                                  BlockCompress(fmt="nvfp4", compile=False)])
def test_payload_matches_wire_bytes_promise(comp, monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")
    for n in (1, 37, 1000):
        p = comp.compress(torch.randn(n, generator=_gen(n)), _gen())
        if comp.variable_size:
            assert payload_bytes(p) <= comp.wire_bytes(n)
        else:
            assert payload_bytes(p) == comp.wire_bytes(n)


def test_empty_tensor_is_a_no_op():
    e = torch.zeros(0)
    idx, vals = TopK(ratio=0.1).compress(e)
    assert idx.numel() == 0 and vals.numel() == 0
    assert TopK(ratio=0.1).decompress([idx, vals], 0).numel() == 0
    sc = ScaleCom(ratio=0.1)
    sel = sc.select(e)
    assert sel.numel() == 0 and sc.num_selected(0) == 0
    assert sc.decompress(sc.compress(e, indices=sel), 0, indices=sel).numel() == 0
    for comp in (QSGD(), QSGD(bitstream=True), StochasticPrune()):
        assert comp.decompress(comp.compress(e, _gen()), 0).numel() == 0


def test_qsgd_decoder_refuses_what_the_encoder_never_writes():
    q = QSGD(levels=4, bucket_size=8)
    x = torch.tensor([3.0, -4.0, 0, 0, 0, 0, 0, 0, 1.0, 1.0])
    norms, lv = q.compress(x, _gen())
    body = q.encode(norms, lv, 10)[:-4]

    def header(n, nnz):
        h = body[:26].copy()
        h[10:18] = np.frombuffer(n.to_bytes(8, "big"), np.uint8)
        h[18:26] = np.frombuffer(nnz.to_bytes(8, "big"), np.uint8)
        return h

    # a short stream announcing 2^40 coordinates: refused before any allocation
    with pytest.raises(ValueError, match="truncated QSGD stream: .* norms"):
        q.decode(_with_crc(np.concatenate([header(1 << 40, 0), body[26:]])))
    with pytest.raises(ValueError, match="non-zeros"):
        q.decode(_with_crc(np.concatenate([header(10, (1 << 63) + 5), body[26:]])))
    with pytest.raises(ValueError, match="non-zeros"):  # more non-zeros than bits to code them
        q.decode(_with_crc(np.concatenate([header(10, 10), body[26:35]])))
    neg = body.copy()
    neg[26] |= 0x80  # sign bit of the first norm
    with pytest.raises(ValueError, match="negative norm"):
        q.decode(_with_crc(neg))
    zero = q.encode(torch.tensor([5.0, 0.0]), lv, 10)[:-4]  # bucket 1 has levels, norm 0
    with pytest.raises(ValueError, match="norm 0"):
        q.decode(_with_crc(zero))
    # a bucket with NaN is legitimate (the encoder writes its non-finite norm)
    nan = torch.tensor([float("nan")] + [1.0] * 9)
    nn, nl = q.compress(nan, _gen())
    n2, l2, _ = q.decode(q.encode(nn, nl, 10))
    assert torch.isnan(n2[0]) and torch.isnan(q.dequantize(n2, l2, 10)[:8]).all()
    with pytest.raises(TypeError, match="uint8"):
        q.decode(np.zeros(40, dtype=np.int16))


@pytest.mark.parametrize("code", ["omega", "gamma"])
def test_qsgd_single_bit_flips_never_decode_silently(code):
    # every single-bit flip of a valid stream must raise the documented ValueError: CRC-32
    # detects every single-bit error, so none may decode to a different gradient (or crash)
    q = QSGD(levels=4, bucket_size=32, code=code)
    rng = np.random.default_rng(0)
    streams = []
    for n in (1, 50, 300):
        x = torch.randn(n, generator=_gen(n)) * torch.exp(torch.randn(n, generator=_gen(n + 1)))
        norms, lv = q.compress(x, _gen())
        streams.append(q.encode(norms, lv, n))
    flips = 0
    for data in streams:
        for _ in range(1000 // len(streams) + 1):
            bit = int(rng.integers(8 * data.size))
            bad = data.copy()
            bad[bit // 8] ^= np.uint8(1 << (7 - bit % 8))
            with pytest.raises(ValueError):
                q.decode(bad)
            flips += 1
    assert flips >= 1000


def test_qsgd_random_bodies_with_valid_crc_raise_only_value_error():
    # past the checksum: random bytes under a valid CRC and the right header prefix must end in
    # ValueError or decode to levels within [-s, s] (never IndexError / OverflowError)
    q = QSGD(levels=4, bucket_size=32)
    rng = np.random.default_rng(1)
    prefix = q.encode(*q.compress(torch.randn(10), _gen()), 10)[:10]
    for _ in range(1000):
        tail = rng.integers(0, 256, size=int(rng.integers(0, 60)), dtype=np.uint8)
        if tail.size >= 16 and rng.random() < 0.5:  # n, nnz < 256 now and then: deeper parsing
            tail[0:7] = 0
            tail[8:15] = 0
        try:
            norms, lv, n = q.decode(_with_crc(np.concatenate([prefix, tail])))
        except ValueError:
            continue
        assert lv.numel() == norms.numel() * 32 and (n == 0 or lv.abs().max() <= 4)


# ---- BlockCompress: block formats on the wire --------------------------------------------------

def _adversarial_bucket() -> torch.Tensor:
    """Seven 128-element segments (each a whole block for block sizes 16, 32 and 128) plus a
    ragged tail of 5: zeros with -0, a NaN, +-inf, float32-subnormal values (E8M0 / FP32
    subnormal-range scales), values near float32's max, lognormal sigma 3, powers of two."""
    g = _gen(11)
    seg = [torch.zeros(128)]
    seg[0][1::2] = -0.0
    nan = torch.randn(128, generator=g)
    nan[5] = float("nan")
    inf = torch.randn(128, generator=g)
    inf[7], inf[40] = float("inf"), float("-inf")
    tiny = torch.randn(128, generator=g) * 1e-40
    huge = torch.randn(128, generator=g).clamp(-1, 1) * 3e38
    logn = torch.exp(3 * torch.randn(128, generator=g)) * torch.sign(torch.randn(128, generator=g))
    pow2 = 2.0 ** torch.randint(-20, 20, (128,), generator=g).float()
    tail = torch.randn(5, generator=g) * 1e-3
    return torch.cat([*seg, nan, inf, tiny, huge, logn, pow2, tail])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (signed zeros, infs), NaN where the other is NaN."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", BLOCK_COMM_FORMATS)
def test_block_round_trip_is_quantize_block_bit_for_bit(name, rounding):
    c = BlockCompress(fmt=name, rounding=rounding, compile=False)
    for x in (_adversarial_bucket(), torch.randn(1000, generator=_gen(3)) * 1e-4):
        payload = c.compress(x, _gen(7))
        want = quantize_block(x, name, rounding, generator=_gen(7), compile=False)
        got = c.decompress(payload, x.numel())
        assert got.dtype == torch.float32 and got.shape == (x.numel(),)
        assert _same_bits(got, want)
        assert payload_bytes(payload) == c.wire_bytes(x.numel())
    # other input dtypes travel as their float32 values; decompress casts to the asked dtype
    xb = _adversarial_bucket()[640:901].bfloat16()
    got = c.decompress(c.compress(xb, _gen(1)), xb.numel(), dtype=torch.bfloat16)
    want = quantize_block(xb.float(), name, rounding, generator=_gen(1), compile=False)
    assert got.dtype == torch.bfloat16 and _same_bits(got.float(), want.bfloat16().float())


@pytest.mark.parametrize("name", BLOCK_COMM_FORMATS)
def test_block_codes_are_the_formats_own_encodings(name):
    ml_dtypes = pytest.importorskip("ml_dtypes")  # the dev extra's oracle
    elem = NAMED_BLOCK_FORMATS[name][0]
    np_dtype = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
                "e3m2fn": ml_dtypes.float6_e3m2fn, "e2m3fn": ml_dtypes.float6_e2m3fn,
                "e2m1fn": ml_dtypes.float4_e2m1fn}[elem]
    c = BlockCompress(fmt=name, rounding="nearest", compile=False)
    x = _adversarial_bucket()
    x = x[torch.isfinite(x)][:900]  # 900 finite values, ragged for every block size
    codes, scales, t = c.parts(c.compress(x), x.numel())
    q = quantize_block(x, name) / torch.repeat_interleave(block_scales(x, name),
                                                          c.format.block[0])[: x.numel()]
    want = np.asarray(q.numpy(), dtype=np_dtype).view(np.uint8)
    assert np.array_equal(codes.numpy(), want)
    assert (t is not None) == (name == "nvfp4")
    assert scales.numel() == -(-900 // c.format.block[0])


def test_mxfp4_bytes_are_torchao_packed_fp4():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4
    c = BlockCompress(fmt="mxfp4", rounding="nearest", compile=False)
    x = torch.randn(320, generator=_gen(4))
    (buf,) = c.compress(x)
    q = quantize_block(x, "mxfp4") / torch.repeat_interleave(block_scales(x, "mxfp4"), 32)
    assert torch.equal(buf[10:], pack_uint4(f32_to_f4_unpacked(q)))  # after 10 E8M0 bytes


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "nvfp4", "fp8_block128"])
def test_block_stochastic_rounding_is_unbiased(name):
    c = BlockCompress(fmt=name, rounding="stochastic", compile=False)
    g = _gen(21)
    x = torch.exp(1.5 * torch.randn(256, generator=g)) * torch.sign(torch.randn(256, generator=g))
    reps = 2000  # 256 is a whole number of blocks: every copy gets the same scales (and t)
    ys = c.decompress(c.compress(x.repeat(reps), _gen(5)), 256 * reps).view(reps, 256).double()
    # elements whose scaled value exceeds the element maximum saturate (a documented bias of
    # the floor / nearest scale rules for a block's largest element): left out
    scaled = x.abs() / torch.repeat_interleave(block_scales(x, name), c.format.block[0])
    inside = scaled <= c.format.elem.max_normal * (1 - 1e-6)
    assert inside.sum() >= 240
    # each draw is one of the two grid neighbours of x / s, so its sd is at most half their
    # spacing and the mean of reps draws lies within 5 spacing / (2 sqrt(reps)) of x
    deq = torch.repeat_interleave(block_scales(x, name), c.format.block[0]).double()
    grid = torch.tensor(c.format.elem.grid(), dtype=torch.float64)
    k = torch.searchsorted(grid, scaled.double(), right=True).clamp(max=grid.numel() - 1)
    spacing = (grid[k] - grid[k - 1]) * deq
    err = (ys.mean(0) - x.double()).abs()
    assert torch.all(err[inside] <= 5 * spacing[inside] / (2 * math.sqrt(reps)))
    # the bound has teeth: rounding to nearest misses it for most elements
    near = quantize_block(x, name).double()
    assert ((near - x.double()).abs()[inside] > 5 * spacing[inside] / (2 * math.sqrt(reps))
            ).float().mean() > 0.5
    # and the draws really are random: most elements take both neighbours
    assert (ys.std(0)[inside] > 0).float().mean() > 0.9
    # nearest rounding ignores the generator
    n = BlockCompress(fmt=name, rounding="nearest", compile=False)
    assert torch.equal(n.compress(x, _gen(1))[0], n.compress(x, _gen(2))[0])


def test_block_wire_bytes_formula_and_compression_ratio():
    # 1000 elements: ceil(1000 / n) scales + ceil(1000 * bits / 8) code bytes (+ 4 for t)
    want = {"mxfp8_e4m3": 32 + 1000, "mxfp8_e5m2": 32 + 1000, "mxfp6_e3m2": 32 + 750,
            "mxfp6_e2m3": 32 + 750, "mxfp4": 32 + 500, "nvfp4": 4 + 63 + 500,
            "fp8_block128": 4 * 8 + 1000}
    assert set(want) == set(BLOCK_COMM_FORMATS)
    for name, nbytes in want.items():
        c = BlockCompress(fmt=name, compile=False)
        assert c.wire_bytes(1000) == nbytes
        assert c.wire_bytes(0) == 0
        for n in (1, 15, 16, 17, 31, 33, 127, 129):
            assert payload_bytes(c.compress(torch.randn(n, generator=_gen(n)))) == c.wire_bytes(n)
    n = 32 * 16 * 1000  # a whole number of blocks of every size
    assert 4 * n / BlockCompress(fmt="mxfp4").wire_bytes(n) == 32 / 4.25
    assert 4 * n / BlockCompress(fmt="mxfp8_e4m3").wire_bytes(n) == 32 / 8.25
    assert BlockCompress(fmt="nvfp4").bits_per_element == 4.5
    assert BlockCompress(fmt="nvfp4").wire_bytes(n) == 4 + n * 4.5 / 8  # + t, once per bucket


def test_block_compress_contract():
    c = BlockCompress(fmt="mxfp4", compile=False)
    assert c.aggregation is Aggregation.ALLGATHER and not c.variable_size
    with pytest.raises(IncompatibleAggregationError):
        require_aggregation(c, Aggregation.ALLREDUCE)
    assert c.config() == {"name": "BlockCompress", "fmt": "mxfp4", "rounding": "stochastic",
                          "compile": False}
    e = torch.zeros(0)
    assert c.decompress(c.compress(e), 0).numel() == 0 and payload_bytes(c.compress(e)) == 0
    (buf,) = c.compress(torch.randn(64))
    with pytest.raises(ValueError, match="holds 34 bytes; 65 elements of mxfp4 take 36"):
        c.decompress([buf], 65)
    with pytest.raises(ValueError, match="list of one"):
        c.decompress([buf, buf], 64)


@pytest.mark.parametrize("kw,exc,match", [
    ({"fmt": "nvfp4_2d"}, ValueError, r"2-D tiles \(16, 16\).*1-D blocks: one of mxfp8_e4m3, "
                                      r"mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4, "
                                      r"fp8_block128"),
    ({"fmt": "fp8_block128x128"}, ValueError, "2-D tiles"),
    ({"fmt": "e4m3fn"}, ValueError, "fmt must be a block format: one of mxfp8_e4m3.*got "
                                    "'e4m3fn' \\(element formats such as e4m3fn are FPCompress"),
    ({"fmt": "mxfp9"}, ValueError, "fmt must be a block format: one of mxfp8_e4m3"),
    ({"fmt": "e4m3fn:32:e8m0:bad"}, ValueError, "fmt must be one of mxfp8_e4m3.*rule"),
    ({"fmt": "e6m2:32:e8m0:floor"}, ValueError, "too deep in float32's subnormals"),
    ({"fmt": "e4m3fn:32:e8m0:floor:dims=1"}, ValueError, r"blocks along dimensions \(1,\)"),
    ({"fmt": "e4m3fn:32:e8m0:floor:dims=0,1"}, ValueError, r"along dimensions \(0, 1\)"),
    ({"fmt": 4}, TypeError, "fmt must be a block format name"),
    ({"rounding": "up"}, ValueError, "rounding must be one of 'stochastic', 'nearest'"),
    ({"compile": "yes"}, TypeError, "compile must be None or a bool"),
])
def test_block_compress_refuses_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        BlockCompress(**kw)


def test_custom_block_formats_round_trip():
    for fmt in ("e4m3fn:32:e8m0:rceil", "e2m1fn:16:e4m3:nearest", "e3m2fn:64:fp32:nearest",
                "e4m3fn:32:e8m0:floor:dims=0"):
        c = BlockCompress(fmt=fmt, compile=False)
        x = _adversarial_bucket()
        got = c.decompress(c.compress(x, _gen(2)), x.numel())
        assert _same_bits(got, quantize_block(x, fmt, "stochastic", _gen(2), compile=False))


def test_fp_compress_points_block_names_to_block_compress():
    with pytest.raises(ValueError, match="fmt 'mxfp4' is a block format: use BlockCompress"):
        FPCompress(fmt="mxfp4")
    with pytest.raises(ValueError, match="e9m9.*or a block format \\(mxfp8_e4m3, .*nvfp4"):
        FPCompress(fmt="e9m9")
