"""Long fuzz of the decoders: the pruned-tensor codec, Elias codes and QSGD's bit stream.

Each decoder gets inputs from a fast loop of mutations of valid streams (single and multiple
bit flips, truncations, extensions, random bytes, header fields set to extreme values with the
checksum recomputed, payload bytes changed with the checksum recomputed, splices) and must
either return a well-formed result or raise the documented ``ValueError``. Reported per
decoder: inputs tried, how many decoded / raised ValueError, crashes (any other exception,
including MemoryError under the memory cap, or a result that breaks the decoder's contract),
the single-bit mutations of valid streams that decoded silently to a different result (a
checksum should make that 0: the pruned codec, QSGD's stream), and peak memory (RSS).

Usage:

    python benchmarks/fuzz_decoders.py [--seconds 60] [--inputs 1000000] [--mem-mb 2048]
        [--decoders pruned,elias,qsgd] [--workers 1] [--seed 0] [--show 5]

``--seconds`` bounds each decoder's run (per worker), ``--inputs`` stops it earlier (total over
workers); 10**6 inputs per decoder take minutes on a quiet core for ``pruned`` (most mutated
streams stop at the CRC) and longer for ``elias`` / ``qsgd`` (every call decodes speculatively
at every bit position): use ``--workers`` on a machine with idle cores. Each worker runs in its
own process with its address space capped (``RLIMIT_AS``) at its size after start-up plus
``--mem-mb``. Exit status 1 when any decoder crashed or mis-decoded a 1-bit mutation silently.

The QSGD part goes through the public API only: ``QSGD(levels, bucket_size, code,
bitstream=True)``, ``quantize`` / ``encode(norms, q, numel)`` / ``decode(data)`` returning
``(norms, levels, numel)``; ``_QSGD_HEADER`` lists the header's bit fields for the field
mutations. Adapt those few lines (``_qsgd_*``) if that API or layout changes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import struct
import sys
import time
import zlib

import numpy as np
import torch

from gradcomp.compressors.comm import QSGD
from gradcomp.compressors.elias import CODES, MAX_VALUE, elias_decode, elias_encode
from gradcomp.compressors.encoding import MAGIC, VERSION, decode_pruned, encode_pruned

# header values worth trying in any integer field: 0, 1, small, powers of two, the maxima
_EXTREMES = [0, 1, 2, 3, 7, 255, 256, 1 << 16, 1 << 31, 1 << 32, 10**9, 10**12, 1 << 40,
             (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _flip_bits(buf: bytearray, rng, k: int) -> None:
    for p in rng.integers(0, 8 * len(buf), k):
        buf[p >> 3] ^= 0x80 >> (p & 7)


# ---------------------------------------------------------------------------------- pruned
_FIXED = struct.Struct("<4sBBBBQ4QdQQ")
# (offset, struct format) of every fixed header field after the magic
_PRUNED_FIELDS = {"version": (4, "<B"), "dtype": (5, "<B"), "ndim": (6, "<B"),
                  "reserved": (7, "<B"), "numel": (8, "<Q"), "c0": (16, "<Q"), "c1": (24, "<Q"),
                  "c2": (32, "<Q"), "c3": (40, "<Q"), "threshold": (48, "<d"),
                  "words": (56, "<Q"), "escape_bytes": (64, "<Q")}
_THRESHOLDS = [float("nan"), float("inf"), -float("inf"), -1.0, -0.0, 0.0, 1e-300, 1e300,
               3.4e38, 65504.0, 0.1, 2.0]


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _pruned_corpus(rng) -> list:
    out = []
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    shapes = [(), (0,), (1,), (5,), (3, 7), (64,), (2, 0, 3), (4, 4, 4), (300,), (4096,)]
    for i in range(60):
        dtype = dtypes[i % 4]
        shape = shapes[int(rng.integers(len(shapes)))]
        n = int(np.prod(shape))
        kind = i % 5
        g = torch.Generator().manual_seed(i)
        a = 2.0 ** float(rng.integers(-8, 4))
        if kind == 0:  # a pruned tensor: 0, +-a and larger values
            x = torch.randn(n, generator=g) * 2 * a
            x = torch.where(x.abs() < a, torch.sign(x) * a * (torch.rand(n, generator=g) < 0.3),
                            x)
        elif kind == 1:
            x = torch.zeros(n)
        elif kind == 2:
            x = a * torch.sign(torch.randn(n, generator=g))
        elif kind == 3:  # specials: inf, -0.0, subnormal-ish, huge
            pool = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, a, -a, 6e4])
            x = pool[torch.randint(0, 8, (n,), generator=g)]
        else:
            x = torch.randn(n, generator=g)
        x = x.to(dtype).reshape(shape)
        threshold = None if i % 3 == 0 else a
        out.append((encode_pruned(x, threshold), x))
    return out


def _pruned_mutate(rng, corpus):
    data, x = corpus[int(rng.integers(len(corpus)))]
    r = int(rng.integers(100))
    if r < 30:
        buf = bytearray(data)
        _flip_bits(buf, rng, 1)
        return "flip1", bytes(buf), x
    if r < 40:
        buf = bytearray(data)
        _flip_bits(buf, rng, int(rng.integers(2, 9)))
        return "flipk", bytes(buf), x
    if r < 48:
        return "trunc", data[: int(rng.integers(len(data)))], x
    if r < 52:
        return "extend", data + rng.bytes(int(rng.integers(1, 9))), x
    if r < 58:
        head = MAGIC + bytes([VERSION]) if rng.integers(2) else b""
        return "random", head + rng.bytes(int(rng.integers(0, 160))), x
    body = bytearray(data[:-4])
    if r < 85:  # one header field set to an extreme value, checksum recomputed
        name = list(_PRUNED_FIELDS)[int(rng.integers(len(_PRUNED_FIELDS)))]
        off, fmt = _PRUNED_FIELDS[name]
        if name == "threshold":
            v = _THRESHOLDS[int(rng.integers(len(_THRESHOLDS)))]
        elif fmt == "<B":
            v = int(rng.integers(256))
        else:
            old = struct.unpack_from(fmt, body, off)[0]
            v = [old + 1, max(old - 1, 0), _EXTREMES[int(rng.integers(len(_EXTREMES)))]][
                int(rng.integers(3))] % (1 << 64)
        struct.pack_into(fmt, body, off, v)
        if rng.integers(4) == 0 and name == "numel":  # keep the shape consistent with it
            ndim = body[6]
            if ndim:
                struct.pack_into("<Q", body, _FIXED.size, v)
        return "header", _with_crc(bytes(body)), x
    if r < 95 and len(body) > _FIXED.size:  # payload bytes changed, checksum recomputed
        for _ in range(int(rng.integers(1, 4))):
            body[int(rng.integers(_FIXED.size, len(body)))] = int(rng.integers(256))
        return "payload", _with_crc(bytes(body)), x
    other = corpus[int(rng.integers(len(corpus)))][0]
    cut = int(rng.integers(_FIXED.size, max(len(other) - 4, _FIXED.size + 1)))
    return "splice", _with_crc(bytes(body[:_FIXED.size]) + other[_FIXED.size:cut]), x


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and bool((a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all()))


def _pruned_check(kind, data, x, out) -> str:
    """'' when the decoded ``out`` is acceptable, else what is wrong with it."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}"
    if kind in ("flip1", "flipk", "trunc", "extend", "random"):  # no valid checksum: refuse
        return "" if _bits_equal(out, x) else "silent"
    dtype_code = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
    if dtype_code.get(out.dtype) != data[5] or out.numel() != struct.unpack_from("<Q", data,
                                                                                  8)[0]:
        return "result disagrees with its header"
    return ""


# ----------------------------------------------------------------------------------- elias
def _elias_corpus(rng) -> list:
    out = []
    for i in range(200):
        code = CODES[i % 2]
        k = int(rng.integers(1, 40))
        mag = rng.choice([3, 8, 20, 57], size=k, p=[0.5, 0.3, 0.15, 0.05])
        v = np.minimum(rng.integers(1, 1 << 62, size=k) >> (62 - mag), MAX_VALUE)
        v = np.maximum(v, 1).astype(np.int64)
        pre = rng.integers(0, 2, int(rng.integers(0, 9))).astype(np.uint8)
        post = rng.integers(0, 2, int(rng.integers(0, 17))).astype(np.uint8)
        bits = np.concatenate([pre, elias_encode(v, code), post])
        out.append((bits, k, pre.size, code, v))
    return out


def _elias_mutate(rng, corpus):
    bits, count, start, code, v = corpus[int(rng.integers(len(corpus)))]
    bits = bits.copy()
    r = int(rng.integers(100))
    if r < 30:
        kind = "flip1"
        bits[int(rng.integers(bits.size))] ^= 1
    elif r < 42:
        kind = "flipk"
        bits[rng.integers(0, bits.size, int(rng.integers(2, 9)))] ^= 1
    elif r < 54:
        kind = "trunc"
        bits = bits[: int(rng.integers(bits.size))]
    elif r < 66:
        kind = "count"
        count = [count + 1, count - 1, count * 2, 0, bits.size, bits.size + 1, 10**12,
                 (1 << 62), -1][int(rng.integers(9))]
    elif r < 74:
        kind = "start"
        start = int(rng.integers(-3, bits.size + 4))
    elif r < 86:
        kind = "random"
        bits = rng.integers(0, 2, int(rng.integers(0, 300))).astype(np.uint8)
        if rng.integers(3) == 0:
            bits[:] = int(rng.integers(2))  # all zeros / all ones: the degenerate cases
        count, start = int(rng.integers(0, 60)), 0
    elif r < 92:
        kind = "nonbinary"
        bits[int(rng.integers(bits.size))] = int(rng.integers(2, 256))
    else:
        kind = "code"
        code = CODES[1 - CODES.index(code)]
    return kind, (bits, count, start, code), v


def _elias_decode(inp):
    bits, count, start, code = inp
    return elias_decode(bits, count, code, start)


def _elias_check(kind, inp, v, out) -> str:
    bits, count, start, code = inp
    vals, end = out
    if vals.dtype != np.int64 or vals.size != count or not start <= end <= bits.size:
        return "result shape / end position out of contract"
    if count and (vals.min() < 1 or vals.max() > MAX_VALUE):
        return "value outside [1, MAX_VALUE]"
    # a prefix code parses uniquely: the decoded values must re-encode to the consumed bits
    if not np.array_equal(elias_encode(vals, code), bits[start:end]):
        return "decoded values do not re-encode to the consumed bits"
    if kind == "none" and not np.array_equal(vals, v):
        return "silent"
    return ""


# ------------------------------------------------------------------------------------ qsgd
# header bit fields of QSGD.encode's stream (name: (first bit, width)); MSB first
_QSGD_HEADER = {"magic": (0, 16), "levels": (16, 16), "bucket_size": (32, 48),
                "numel": (80, 64), "nnz": (144, 64)}
_QSGD_CONFIGS = [(4, 8, "omega"), (16, 64, "omega"), (127, 32, "gamma"), (300, 16, "omega"),
                 (1, 1, "gamma")]


def _qsgd_encode(qs: QSGD, x: torch.Tensor, g: torch.Generator):
    norms, q = qs.quantize(x, g)
    return qs.encode(norms, q, x.numel()), (norms, q, x.numel())


def _qsgd_decode(inp):
    qs, data = inp
    return qs.decode(data)


def _qsgd_same(a, b) -> bool:
    (na, qa, ma), (nb, qb, mb) = a, b
    return (int(ma) == int(mb) and na.shape == nb.shape
            and bool((na.view(torch.int32) == nb.view(torch.int32)).all())
            and qa.shape == qb.shape and bool((qa == qb).all()))


def _qsgd_corpus(rng) -> list:
    out = []
    for i in range(60):
        s, d, code = _QSGD_CONFIGS[i % len(_QSGD_CONFIGS)]
        qs = QSGD(levels=s, bucket_size=d, code=code, bitstream=True)
        g = torch.Generator().manual_seed(i)
        n = int(rng.integers(0, 300))
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < rng.random())
        data, orig = _qsgd_encode(qs, x, g)
        out.append((qs, np.asarray(data, dtype=np.uint8), orig))
    return out


def _qsgd_mutate(rng, corpus):
    qs, data, orig = corpus[int(rng.integers(len(corpus)))]
    buf = bytearray(data.tobytes())
    r = int(rng.integers(100))
    if r < 40:
        kind = "flip1"
        _flip_bits(buf, rng, 1)
    elif r < 50:
        kind = "flipk"
        _flip_bits(buf, rng, int(rng.integers(2, 9)))
    elif r < 62:
        kind = "trunc"
        buf = buf[: int(rng.integers(len(buf)))]
    elif r < 67:
        kind = "extend"
        buf += rng.bytes(int(rng.integers(1, 9)))
    elif r < 77:
        kind = "random"
        buf = bytearray(rng.bytes(int(rng.integers(0, 120))))
    elif r < 95 and len(buf) * 8 >= 208:
        kind = "header"
        first, width = list(_QSGD_HEADER.values())[int(rng.integers(len(_QSGD_HEADER)))]
        v = _EXTREMES[int(rng.integers(len(_EXTREMES)))] % (1 << width)
        bits = np.unpackbits(np.frombuffer(bytes(buf), dtype=np.uint8))
        bits[first:first + width] = [(v >> (width - 1 - j)) & 1 for j in range(width)]
        buf = bytearray(np.packbits(bits).tobytes())
    else:
        kind = "config"  # a valid stream read by a decoder with other levels / bucket size
        s, d, code = _QSGD_CONFIGS[int(rng.integers(len(_QSGD_CONFIGS)))]
        qs = QSGD(levels=s, bucket_size=d, code=code, bitstream=True)
    return kind, (qs, np.frombuffer(bytes(buf), dtype=np.uint8)), orig


def _qsgd_check(kind, inp, orig, out) -> str:
    qs, _ = inp
    if not (isinstance(out, tuple) and len(out) == 3):
        return "result is not (norms, levels, numel)"
    norms, q, n = out
    if q.numel() != norms.numel() * qs.bucket_size or int(n) > q.numel():
        return "result sizes inconsistent"
    if q.numel() and int(q.abs().max()) > qs.levels:
        return "a level exceeds s"
    if kind in ("flip1", "flipk", "trunc", "extend") and not _qsgd_same(out, orig):
        return "silent"
    return ""


# ----------------------------------------------------------------------------------- driver
TARGETS = {
    "pruned": (_pruned_corpus, _pruned_mutate, decode_pruned, lambda c: c[0], _pruned_check),
    "elias": (_elias_corpus, _elias_mutate, _elias_decode, lambda c: (c[0], c[1], c[2], c[3]),
              _elias_check),
    "qsgd": (_qsgd_corpus, _qsgd_mutate, _qsgd_decode, lambda c: (c[0], c[1]), _qsgd_check),
}
# decoders whose stream carries a checksum: a silent 1-bit mis-decode is a finding
CHECKSUMMED = {"pruned", "qsgd"}


def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _run(name: str, seconds: float, max_inputs: int, seed: int, mem_mb: int, show: int):
    torch.set_num_threads(1)
    corpus_fn, mutate, decode, valid_input, check = TARGETS[name]
    rng = np.random.default_rng(seed)
    corpus = corpus_fn(rng)
    capped = False
    vm = _vm_bytes()
    if vm is not None and mem_mb > 0:
        limit = vm + mem_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        capped = True
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = {"inputs": 0, "decoded": 0, "value_error": 0, "crashes": 0, "silent_1bit": 0,
             "silent_other": 0, "flip1": 0, "examples": [], "by_kind": {}}

    def record(kind, what, inp):
        stats["crashes"] += 1
        if len(stats["examples"]) < show:
            raw = inp if isinstance(inp, (bytes, bytearray)) else repr(inp)[:300]
            stats["examples"].append(f"{kind}: {what} on {raw[:200]!r}")

    # the unmodified corpus first: every valid stream must decode to its original
    for case in corpus:
        inp, orig = valid_input(case), case[-1]
        try:
            out = decode(inp)
            bad = check("none", inp, orig, out)
            same = {"pruned": _bits_equal, "qsgd": _qsgd_same}.get(name)
            if not bad and same is not None and not same(out, orig):
                bad = "valid stream decoded differently"
        except Exception as e:  # noqa: BLE001 - a fuzzer records every exception
            bad = f"valid stream raised {type(e).__name__}: {e}"
        stats["inputs"] += 1
        if bad:
            record("valid", bad, inp)
    t0 = time.perf_counter()
    while stats["inputs"] < max_inputs:
        if stats["inputs"] % 256 == 0 and time.perf_counter() - t0 > seconds:
            break
        kind, inp, orig = mutate(rng, corpus)
        stats["inputs"] += 1
        k = stats["by_kind"].setdefault(kind, [0, 0])
        k[0] += 1
        stats["flip1"] += kind == "flip1"
        try:
            out = decode(inp)
        except ValueError:
            stats["value_error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - anything else is what we are looking for
            record(kind, f"{type(e).__name__}: {str(e)[:120]}", inp)
            continue
        stats["decoded"] += 1
        k[1] += 1
        bad = check(kind, inp, orig, out)
        if bad == "silent":  # decoded to something else although no checksum was forged
            stats["silent_1bit" if kind == "flip1" else "silent_other"] += 1
        elif bad:
            record(kind, bad, inp)
    stats["seconds"] = time.perf_counter() - t0
    stats["rss_start_mb"] = rss0 / 1024
    stats["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats["capped"] = capped
    return stats


def _worker(args):
    return _run(*args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="time bound per decoder and "
                   "worker (default 60)")
    p.add_argument("--inputs", type=int, default=1_000_000, help="stop a decoder after this "
                   "many inputs over all workers (default 10**6)")
    p.add_argument("--decoders", default="pruned,elias,qsgd",
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--workers", type=int, default=1, help="processes per decoder (default 1)")
    p.add_argument("--mem-mb", type=int, default=2048, help="address-space cap above each "
                   "worker's start-up size, MiB (0: no cap; default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=5, help="crash examples printed per decoder")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.decoders.split(",") if s.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        p.error(f"--decoders: unknown {unknown}; choose from {', '.join(TARGETS)}")
    if args.workers < 1 or args.seconds <= 0 or args.inputs < 1 or args.mem_mb < 0:
        p.error("--workers, --seconds and --inputs must be positive, --mem-mb >= 0")
    ctx = mp.get_context("fork")
    findings = 0
    print(f"{'decoder':8} {'inputs':>9} {'per s':>7} {'decoded':>8} {'ValueError':>10} "
          f"{'crashes':>7} {'silent 1-bit':>12} {'peak RSS MB':>11}")
    for name in names:
        per = -(-args.inputs // args.workers)
        jobs = [(name, args.seconds, per, args.seed + 1000 * w, args.mem_mb, args.show)
                for w in range(args.workers)]
        with ctx.Pool(args.workers) as pool:  # a fresh process per worker: its own peak RSS
            results = pool.map(_worker, jobs, chunksize=1)
        tot = {k: sum(r[k] for r in results) for k in ("inputs", "decoded", "value_error",
                                                        "crashes", "silent_1bit", "silent_other",
                                                        "flip1")}
        secs = max(r["seconds"] for r in results)
        peak = max(r["rss_peak_mb"] for r in results)
        start = max(r["rss_start_mb"] for r in results)
        silent = f"{tot['silent_1bit']}/{tot['flip1']}"
        print(f"{name:8} {tot['inputs']:9d} {tot['inputs'] / secs:7.0f} {tot['decoded']:8d} "
              f"{tot['value_error']:10d} {tot['crashes']:7d} {silent:>12} "
              f"{peak:6.0f} ({peak - start:+.0f})")
        kinds = {}
        for r in results:
            for k, (n, ok) in r["by_kind"].items():
                kinds.setdefault(k, [0, 0])
                kinds[k][0] += n
                kinds[k][1] += ok
        print("    decoded / tried by mutation: " + ", ".join(
            f"{k} {ok}/{n}" for k, (n, ok) in sorted(kinds.items())))
        print(f"    multi-bit flips, cuts, extensions decoded to a different result: "
              f"{tot['silent_other']}")
        if not all(r["capped"] for r in results):
            print("    (memory not capped: /proc/self/statm unavailable or --mem-mb 0)")
        for r in results:
            for ex in r["examples"]:
                print(f"    crash: {ex}")
        silent_all = tot["silent_1bit"] + tot["silent_other"]
        findings += tot["crashes"] + (silent_all if name in CHECKSUMMED else 0)
    print(f"memory cap {args.mem_mb} MiB above start-up per worker; peak RSS in MB "
          f"(growth during the run); seed {args.seed}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
