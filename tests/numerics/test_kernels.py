"""One compile policy for every fused operator; stochastic_prune lives in numerics."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from gradcomp.numerics import kernels
from gradcomp.numerics.pruning import prune_quantize, prune_quantize_amax, stochastic_prune
from gradcomp.numerics.rounding import quantize_fp

SRC = Path(__file__).resolve().parents[2] / "src"


def test_exactly_one_module_reads_the_compile_switch():
    out = subprocess.run(["grep", "-rl", "GRADCOMP_COMPILE\"", str(SRC)], capture_output=True,
                         text=True).stdout.split()
    readers = [p for p in out if "environ" in Path(p).read_text()
               and "os.environ.get(\"GRADCOMP_COMPILE\"" in Path(p).read_text()]
    assert [Path(p).name for p in readers] == ["kernels.py"]


def test_set_compile_switches_every_fused_operator(monkeypatch):
    calls = []
    real = torch.compile

    def spy(fn, **kw):
        calls.append(fn.__name__)
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    x = torch.randn(100)
    kernels.set_compile(False)
    try:
        stochastic_prune(x, 0.5, torch.Generator().manual_seed(0))
        quantize_fp(x, "e5m2")
        assert calls == []  # eager everywhere, whatever GRADCOMP_COMPILE says
    finally:
        kernels.set_compile(None)
    with pytest.raises(TypeError, match="enabled"):
        kernels.set_compile("yes")


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPILE", "maybe")
    with pytest.raises(ValueError, match="GRADCOMP_COMPILE must be one of"):
        kernels.compile_enabled()


def test_prune_is_importable_from_every_public_home():
    import gradcomp
    from gradcomp.compressors import pruning

    assert gradcomp.stochastic_prune is stochastic_prune is pruning.stochastic_prune


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_chunks_give_identical_bits_and_bound_the_temporaries(monkeypatch, dtype):
    x = torch.randn(10_007, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1e-3

    def run():
        g = torch.Generator().manual_seed(1)
        return (quantize_fp(x, "e4m3fn", "stochastic", scale=2.0**9, generator=g, compile=False),
                quantize_fp(x, "1-4-1", "nearest", compile=False),
                stochastic_prune(x, 1e-3, g, compile=False))

    whole = run()
    seen = []
    monkeypatch.setattr(kernels, "EAGER_CHUNK", 1000)
    orig_fn = {}

    def wrap(op):
        orig_fn[op] = op.body  # the body the eager path runs

        def fn(x, *rest, start=0):
            seen.append(x.numel())  # the body never sees more than one chunk
            return orig_fn[op](x, *rest, start=start)
        return fn

    from gradcomp.numerics import pruning

    ops = list(kernels._VARIANTS.values()) + [pruning._PRUNE]
    for op in ops:
        monkeypatch.setattr(op, "body", wrap(op))
    chunked = run()
    for a, b in zip(whole, chunked):
        assert torch.equal(a.view(torch.int64 if dtype == torch.float64 else torch.int32),
                           b.view(torch.int64 if dtype == torch.float64 else torch.int32))
    assert seen and max(seen) == 1000 and len(seen) == 3 * 11


def _mul_add(x, s, t, start: int = 0):
    return x * s + t + start


def _pair(x, s):
    return x * s, (x > 0).sum()


def test_compiled_kernels_skip_dynamo_after_a_bit_exact_check(monkeypatch):
    # the second call of a signature runs the compiled graph without dynamo, the first one
    # checked it against dynamo's result; other sizes, dtypes and layouts stay exact
    op = kernels.FusedOp(_mul_add, "mul_add")
    pair = kernels.FusedOp(_pair, "pair")
    s, t = torch.tensor(3.0), torch.tensor(0.5)
    x = torch.randn(1001)
    first = op(x, s, t, compile=True)
    assert torch.equal(first, _mul_add(x, s, t))
    dynamo = []
    real = op._compiled
    monkeypatch.setattr(op, "_compiled", lambda *a: dynamo.append(1) or real(*a))
    for n in (1001, 77, 4096):
        y = torch.randn(n)
        assert torch.equal(op(y, s, t, compile=True), _mul_add(y, s, t))
    assert dynamo == []  # every later call of that signature went direct
    # a new signature (float64, a strided view) goes through dynamo once, then direct
    for z in (torch.randn(500, dtype=torch.float64), torch.randn(800)[::2]):
        sz = s.to(z.dtype)
        for _ in range(3):
            assert torch.equal(op(z, sz, t.to(z.dtype), compile=True),
                               _mul_add(z, sz, t.to(z.dtype)))
    assert len(dynamo) == 2
    # a tuple result keeps its structure
    p, c = pair(x, s, compile=True)
    p2, c2 = pair(x, s, compile=True)
    assert torch.equal(p, p2) and int(c) == int(c2) == int((x > 0).sum())


def _scaled(x, s):
    return x * s, (x > 0).sum(0)


def _scaled_and_view(x, s):
    return x * s, x.view(-1)


def test_a_direct_call_runs_the_generated_code_unless_an_output_aliases_an_input():
    # the direct call skips AOT autograd's runtime wrappers (the generated code's own call)
    # when the validating call gave every bit and stride; an output that is a view of an input
    # keeps the wrappers (they rebuild the view), and still skips dynamo
    op = kernels.FusedOp(_scaled, "scaled")
    s = torch.tensor(3.0)
    for x in (torch.randn(40, 7), torch.randn(7, 40).t(), torch.randn(9, 5)):
        for _ in range(2):
            got = op(x, s, compile=True)
            want = _scaled(x, s)
            for a, b in zip(got, want):
                assert torch.equal(a, b) and a.stride() == b.stride()
    directs = [d for d in op._direct.values() if d]
    assert len(directs) == 2 and all(d.boxed for d in directs)  # contiguous, transposed
    view = kernels.FusedOp(_scaled_and_view, "scaled_and_view")
    x = torch.randn(6, 4)
    for _ in range(3):
        y, v = view(x, s, compile=True)
        assert torch.equal(y, x * s) and torch.equal(v, x.view(-1))
        assert v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    (d,) = view._direct.values()
    assert d and not d.boxed


def _scaled_counted(x, s, start: int = 0):
    return x * s + start, (x > 0).sum(0)


def test_an_in_place_operator_writes_its_first_result_into_x():
    # into=True: the first result lands in x (compiled: after the first call, the generated
    # code's own call, which writes x in the loop that computes it), the rest is returned, x's
    # version counter moves as for any in-place op; the validating call replays on a copy (x
    # is written once per call); the eager path gives the same bits
    op = kernels.FusedOp(_scaled_counted, "scaled_counted", elementwise=True, into=True)
    s = torch.tensor(3.0)
    for n in (1000, 77, 1000, 4096):
        x0 = torch.randn(n)
        x, e = x0.clone(), x0.clone()
        version = x._version
        got = op(x, s, compile=True)
        want = op(e, s, compile=False)
        assert torch.equal(x, x0 * s) and torch.equal(e, x) and x._version > version
        assert isinstance(got, tuple) and len(got) == 1 and int(got[0]) == int(want[0]) \
            == int((x0 > 0).sum())
    (direct,) = op._direct.values()
    assert direct and direct.boxed and direct.mutated
    # a result-only body has nothing left to return
    alone = kernels.FusedOp(_mul_add, "mul_add_into", elementwise=True, into=True)
    x = torch.ones(10)
    assert alone(x, s, torch.tensor(0.5), compile=True) == () and torch.equal(x, torch.full(
        (10,), 3.5))


def test_a_bound_operator_calls_with_its_fixed_arguments(monkeypatch):
    # op.bind(None, s, None): each call passes x and t; the same results as op(x, s, t), on the
    # direct call after the first call of a signature, through the operator's own dispatch for
    # a new signature, eager when compilation is off
    op = kernels.FusedOp(_mul_add, "mul_add_bound")
    s = torch.tensor(3.0)
    bound = op.bind(None, s, None)
    t = torch.tensor(0.5)
    x = torch.randn(1001)
    assert torch.equal(bound(x, t, compile=True), _mul_add(x, s, t))
    assert len(bound._direct) == 1 and next(iter(bound._direct.values())) is not None
    calls = []
    real = op.__call__
    monkeypatch.setattr(kernels.FusedOp, "__call__",
                        lambda self, *a, **k: calls.append(k) or real(*a, **k))
    for n in (1001, 77):
        y = torch.randn(n)
        assert torch.equal(bound(y, t, compile=True), _mul_add(y, s, t))
    assert calls == []  # the direct call: no operator dispatch
    z = torch.randn(800)[::2]  # a new signature of the varying arguments
    assert torch.equal(bound(z, t, compile=True), _mul_add(z, s, t))
    assert torch.equal(bound(z, t, compile=False), _mul_add(z, s, t))
    assert [k["compile"] for k in calls] == [True, False]
    with pytest.raises(TypeError, match="2 varying arguments"):
        bound(x)


def _broadcast(x, a, k1, *, k):
    return x * a + k1 * k


def _spy_dynamo(monkeypatch, op) -> list:
    calls = []
    real = op._compiled
    monkeypatch.setattr(op, "_compiled", lambda *a: calls.append(1) or real(*a))
    return calls


def test_direct_calls_take_shared_sizes_size_one_dimensions_and_int_statics(monkeypatch):
    # a (rows, 1) input broadcast against x shares x's row symbol; a keyword-only int static
    # is traced as a constant (not a graph input); a size-1 dimension is specialised by
    # dynamo: each signature goes through dynamo once, then every call is direct, bit for bit
    # the eager body's
    op = kernels.FusedOp(_broadcast, "broadcast", k=3)
    k1 = torch.tensor(0.25)
    x, a = torch.randn(6, 5), torch.randn(6, 1)
    assert torch.equal(op(x, a, k1, compile=True), x * a + k1 * 3)
    assert all(d is not None for d in op._direct.values())
    inputs = [n.name for gm, _ in op._graphs for n in gm.graph.nodes if n.op == "placeholder"]
    assert "l_k_" not in inputs and "l_x_" in inputs
    dynamo = _spy_dynamo(monkeypatch, op)
    for rows, cols in ((6, 5), (9, 4), (2, 33)):
        x, a = torch.randn(rows, cols), torch.randn(rows, 1)
        assert torch.equal(op(x, a, k1, compile=True), x * a + k1 * 3)
    assert dynamo == []
    one = torch.randn(1, 7), torch.randn(1, 1)  # a size-1 row: its own signature
    for _ in range(2):
        assert torch.equal(op(*one, k1, compile=True), one[0] * one[1] + k1 * 3)
    assert len(dynamo) == 1
    x, a = torch.randn(4, 3), torch.randn(4, 1)
    assert torch.equal(op(x, a, k1, compile=True), x * a + k1 * 3)
    assert len(dynamo) == 1  # the general graph's direct call still answers
    five = kernels.FusedOp(_broadcast, "broadcast", k=5)  # another static value: its own code
    for _ in range(2):
        assert torch.equal(five(x, a, k1, compile=True), x * a + k1 * 5)
    assert all(d is not None for d in five._direct.values())


def test_a_direct_call_refused_by_its_sizes_is_replaced_by_the_general_graph(monkeypatch):
    # compiled on a square x, duck-sizing ties its two sizes into one symbol: a later (4, 6)
    # call is refused by the direct call (its sizes compared), dynamo compiles the general
    # graph, whose direct call answers every later size
    op = kernels.FusedOp(_broadcast, "broadcast_square", k=2)
    k1 = torch.tensor(1.5)
    square = torch.randn(4, 4), torch.randn(4, 1)
    assert torch.equal(op(*square, k1, compile=True), square[0] * square[1] + k1 * 2)
    dynamo = _spy_dynamo(monkeypatch, op)
    for rows, cols in ((4, 6), (5, 3), (7, 7), (3, 9)):
        x, a = torch.randn(rows, cols), torch.randn(rows, 1)
        assert torch.equal(op(x, a, k1, compile=True), x * a + k1 * 2)
    assert len(dynamo) == 1 and len(op._graphs) == 2


def _rows_summed(y, *, n):
    rows = y.unbind(1)  # unbind specialises y's dim 1 to n: a constant size in the graph
    return torch.stack([r * (j + 1) for j, r in enumerate(rows)], dim=1)


def test_a_size_specialised_to_a_constant_still_calls_direct(monkeypatch):
    # the Hadamard butterfly's form: the graph's dim 1 is the constant n, the others symbols;
    # the call goes direct after its check (it went through dynamo on every call before), and
    # a tensor with another dim 1 is refused by the generated code's size asserts and goes
    # back to dynamo, with the same results as the body's
    op = kernels.FusedOp(_rows_summed, "rows_summed", n=4)
    y = torch.randn(3, 4, 5)
    assert torch.equal(op(y, compile=True), _rows_summed(y, n=4))
    assert all(d is not None for d in op._direct.values())
    dynamo = _spy_dynamo(monkeypatch, op)
    for shape in ((3, 4, 5), (7, 4, 2), (2, 4, 9)):
        y = torch.randn(shape)
        assert torch.equal(op(y, compile=True), _rows_summed(y, n=4))
    assert dynamo == []
    direct = next(iter(op._direct.values()))
    assert direct((torch.randn(3, 6, 5),)) is None  # dim 1 is not n: refused


def _keyed(x, keys):
    return x * keys[0] + keys[1]


def test_a_row_of_a_larger_tensor_calls_direct_at_every_offset(monkeypatch):
    # the wrapper's hash keys are rows of one table per step (``random.Stream``): dynamo
    # traces their storage offset as a symbol, which the direct call reads from the argument
    # (it went through dynamo on every call before); every row gives the eager body's bits
    op = kernels.FusedOp(_keyed, "keyed")
    table = torch.tensor([[2.0, 3.0], [5.0, 7.0], [11.0, 13.0], [17.0, 19.0]])
    x = torch.randn(37)
    assert torch.equal(op(x, table[3], compile=True), _keyed(x, table[3]))
    assert all(d is not None for d in op._direct.values())
    dynamo = _spy_dynamo(monkeypatch, op)
    for i in (2, 3, 1, 0, 2):
        y = torch.randn(11 * i + 5)
        assert table[i].storage_offset() == 2 * i
        assert torch.equal(op(y, table[i], compile=True), _keyed(y, table[i]))
    assert dynamo == []


def _keyed_again(x, keys):  # a code object of its own: dynamo's graphs are kept per code
    return x * keys[0] + keys[1]


def test_an_offset_traced_equal_to_a_size_is_compared_at_each_call(monkeypatch):
    # dynamo gives an offset equal to a size the size's symbol (duck sizing): the direct call
    # reads one and compares the other at each call, so a call where they still agree goes
    # direct, and one where they differ goes back to dynamo: never a wrong result
    op = kernels.FusedOp(_keyed_again, "keyed_tied")
    table = torch.arange(1.0, 17.0).view(8, 2)
    x = torch.randn(6)
    assert table[3].storage_offset() == x.numel()
    assert torch.equal(op(x, table[3], compile=True), _keyed_again(x, table[3]))
    direct = next(iter(op._direct.values()))
    assert direct is not None and direct.same  # the offset is compared with x's size
    dynamo = _spy_dynamo(monkeypatch, op)
    y = torch.randn(6)
    assert torch.equal(op(y, table[3], compile=True), _keyed_again(y, table[3]))
    assert dynamo == []  # the tie held: direct
    assert direct((y, table[1])) is None  # offset 2, size 6: refused, not misread
    for i, n in ((1, 6), (5, 10), (2, 9), (7, 6), (3, 6), (0, 4)):
        y = torch.randn(n)
        assert torch.equal(op(y, table[i], compile=True), _keyed_again(y, table[i])), (i, n)


def _first_plus_second(x, a, b):
    return x * a[0] + b[1]


def test_a_tensor_passed_twice_never_becomes_a_direct_call():
    # dynamo merges a tensor passed as two arguments into one graph input: a direct call of
    # that graph would read the first argument for both when later calls pass two tensors
    op = kernels.FusedOp(_first_plus_second, "first_plus_second")
    x, t = torch.randn(10), torch.tensor([2.0, 3.0])
    for _ in range(2):
        assert torch.equal(op(x, t, t, compile=True), x * 2.0 + 3.0)
    a, b = torch.tensor([2.0, 5.0]), torch.tensor([7.0, 11.0])
    for _ in range(2):
        assert torch.equal(op(x, a, b, compile=True), x * 2.0 + 11.0)
        assert torch.equal(op(x, t, t, compile=True), x * 2.0 + 3.0)


def _scale_by(x, s):
    return x * s


def test_the_recompile_limit_starts_a_fresh_code_object(monkeypatch):
    # more graphs than dynamo's recompile budget of one code object (here 2): the operator
    # compiles a fresh copy instead of switching every fused operator to the eager path
    import torch._dynamo

    monkeypatch.setattr(kernels, "_BROKEN", kernels._BROKEN)  # restored after the test
    op = kernels.FusedOp(_scale_by, "scale_by", split=("limit",))
    s = torch.tensor(3.0)
    # (dynamo's own patch: its config is not a plain module, monkeypatch's undo deletes the key)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=2):
        warnings.simplefilter("error", RuntimeWarning)
        for dtype in (torch.float32, torch.float64):
            for rank in (1, 2):
                x = torch.randn(*[3 + d for d in range(rank)]).to(dtype)
                assert torch.equal(op(x, s.to(dtype), compile=True), x * s.to(dtype))
    assert len(op._graphs) == 4 and op._copies >= 1
    assert not kernels._BROKEN  # the fused path stays on for every operator


@pytest.mark.parametrize("n", [64 * 1024, 1605632, 3 * 1024 * 77])
def test_pruning_in_the_2d_counter_layout_equals_the_flat_pass(n):
    # the fused CPU kernels run on a (rows, L) view (numerics.random.counter_layout); values,
    # counts, scales and random bits equal the eager flat pass, also on the direct
    # (dynamo-free) call
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-2
    x[::1001] = 0.0
    x[3], x[77], x[-1] = float("nan"), float("inf"), -float("inf")
    for seed in (1, 2):
        want = stochastic_prune(x, 5e-3, torch.Generator().manual_seed(seed), compile=False,
                                counts=True)
        got = stochastic_prune(x, 5e-3, torch.Generator().manual_seed(seed), compile=True,
                               counts=True)
        assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))
        assert torch.equal(got[1], want[1])
        plain = stochastic_prune(x.view(-1, 8), 5e-3, torch.Generator().manual_seed(seed),
                                 compile=True)
        assert plain.shape == (n // 8, 8)
        assert torch.equal(plain.reshape(-1).view(torch.int32), want[0].view(torch.int32))
        # prune + quantize (nearest: the 2-D layout; stochastic: flat), with and without the
        # amax scale, every count
        for rounding in ("nearest", "stochastic"):
            for fn, kw in ((prune_quantize, {"scale": 2.0**6}), (prune_quantize_amax, {})):
                outs = [fn(x, 5e-3, "e3m2", rounding, generator=torch.Generator().manual_seed(
                    seed), compile=c, counts=True, **kw) for c in (False, True)]
                for a, b in zip(*outs):  # NaN in x: amax and the kept scale's inputs are NaN
                    assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0,
                                                               atol=0), (fn.__name__, rounding)
                    if a.dtype == torch.float32:
                        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_eager_chunks_of_the_2d_counter_layout_are_whole_rows(monkeypatch):
    # the eager fallback of a 2-D call chunks whole rows and counts ``start`` in elements
    from gradcomp.numerics import pruning
    from gradcomp.numerics.random import counter_layout, draw_keys

    n = 64 * 1024
    x = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 1e-2
    keys = draw_keys(torch.Generator().manual_seed(4), "cpu")
    thr = torch.tensor(5e-3, dtype=torch.float64)
    flat = pruning._PRUNE.eager(x, thr, keys)
    x2, wide = counter_layout(x, keys, True)
    monkeypatch.setattr(kernels, "EAGER_CHUNK", 5000)
    seen = []
    body = pruning._PRUNE.body  # what the eager path runs

    def fn(x, *rest, start=0):
        seen.append((x.shape, start))
        return body(x, *rest, start=start)

    monkeypatch.setattr(pruning._PRUNE, "body", fn)
    out = pruning._PRUNE.eager(x2, thr, wide)
    assert out.shape == x2.shape
    assert torch.equal(out.reshape(-1).view(torch.int32), flat.view(torch.int32))
    width = x2.shape[1]
    rows = 5000 // width
    assert seen[0] == ((rows, width), 0) and seen[1] == ((rows, width), rows * width)
    assert sum(s[0][0] for s in seen) == x2.shape[0]


def _breaks_the_graph(x, s):
    torch._dynamo.graph_break()  # fullgraph: a compile error
    return kernels._write_first(x, x * s)


def test_an_in_place_twin_that_does_not_compile_writes_through_a_copy(monkeypatch):
    # the twin alone fails (x not yet written): its out-of-place body compiled, then copied
    # into x, from then on; one warning; the fused path stays on for every other operator
    import torch._dynamo

    monkeypatch.setattr(kernels, "_BROKEN", kernels._BROKEN)  # restored after the test
    op = kernels.FusedOp(_scale_by, "scale_by_into", into=True)
    op.fn = _breaks_the_graph
    s = torch.tensor(3.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(5)
            want = x * s
            assert op(x, s, compile=True) == () and torch.equal(x, want)
    assert sum("writing its result through a copy" in str(w.message) for w in seen) == 1
    assert op._plain is not None and len(op._plain._graphs) == 1
    assert not kernels._BROKEN
