"""The fused-kernel machinery shared by every hot-path operator (``quantize_fp``,
``stochastic_prune``): one compile policy, one eager fallback.

Compile policy (the only place that reads ``GRADCOMP_COMPILE``):

* :func:`set_compile` ``(True | False)`` forces the fused or the eager path for every fused
  operator; ``set_compile(None)`` defers to the environment variable ``GRADCOMP_COMPILE``
  (``"1"``, the default: fused; ``"0"``: eager), read at each call so that tests can switch it.
* An operator's ``compile=`` argument (True/False) overrides both for one call.

A :class:`FusedOp` wraps one module-level function (its eager body). The fused path is
``torch.compile(fn, dynamic=True, fullgraph=True)``, built lazily on first use (never at import);
``dynamic=True`` so that a new tensor length does not recompile, ``fullgraph=True`` so that a
graph break is an error rather than a silent slow path; a variant's static ints are traced as
constants (``FusedOp._dynamo``). The eager body and the compiled one compute the same
integer/float operations, so both give identical bits (the random bits come from the
counter-based hash in :mod:`gradcomp.numerics.random`, whose keys are computed *outside* the
compiled region: see ``seed_keys``).

Dispatch: the first call of an argument signature (dtypes, devices, ranks, layouts) goes
through ``torch.compile``; the graph it compiles is then called directly (``_Direct``), once it
has returned bit for bit what dynamo returned, because dynamo's frame evaluation and guards cost
50-130 us per call, paid per layer and step by every hot-path kernel; where the same check also
finds equal strides and no output aliasing an input, the direct call is inductor's generated code
itself, without AOT autograd's runtime wrappers (``_generated_graph``).

In place: ``FusedOp(..., into=True)`` (``variant(..., into=True)``) writes the body's first
result into its first argument in the loop that computes it, for a caller that owns x (the
compressors' ``into``; the wrapper's ownership check decides).

Fallback: if compiling or running the fused kernel raises (no C++ toolchain, unsupported
backend), the fused path is switched off for the whole process (every operator), one
``RuntimeWarning`` says why, and the eager body answers the call. Dynamo's recompile limit (8
graphs per code object) is not such a failure: the operator compiles a fresh copy of its code
object (``FusedOp._renew``, at most 3 times). Nor is an in-place twin that fails to compile
while its out-of-place body compiles (inductor's scheduler has failed on some writes into an
input): that operator alone then writes its out-of-place result through a copy (one warning).

Eager memory: the eager body of an elementwise operator materialises about ten full-size
temporaries (the fused kernel none). The eager path therefore runs the body on chunks of
about ``EAGER_CHUNK`` elements (whole rows of a 2-D input) of the flat input (``start=`` tells
the body where the chunk begins, so the counter hash draws the same bits as in one pass:
identical results) and writes into one output tensor: peak memory about input + output + a
few chunk-sized temporaries.

Counts from the same pass: an elementwise operator may return ``(out, counts)``, ``counts`` a
1-d int64 tensor of element counts (non-finite inputs, zeros of the output, ...) reduced in the
same loop that writes ``out`` (inductor fuses the sums into the elementwise loop: one read of
the input, one write of the output, no second pass). The eager path adds the chunks' counts
(each chunk's reductions run on data still in cache).
"""

from __future__ import annotations

import os
import types
import warnings

import torch

from gradcomp.numerics._checks import require_choice

__all__ = ["Bound", "FusedOp", "INT32_LIMIT", "compile_enabled", "set_compile", "use_compiled",
           "variant"]

# inductor's CPU code generator picks serial loops for some kernels whose shapes are dynamic
# (measured: the pruning kernel with its counts ran on one thread, 2x slower on two cores);
# dynamic_threads keeps one parallel loop in every kernel and lets OpenMP split it at run time
# no floating-point contraction (inductor's default, pinned here against a user's
# TORCHINDUCTOR_CPP_ENABLE_FLOATING_POINT_CONTRACT_FLAG): the float path of nearest rounding
# (Veltkamp's splitting, numerics.rounding) needs a*K rounded before c - a, and an FMA
# would skip that rounding
# size_asserts (inductor's default, pinned): the generated code checks the sizes and strides of
# the inputs its kernels read against the symbols it is called with (a second line of defence
# for ``_Direct``, which compares the sizes that share a symbol itself)
COMPILE_OPTIONS = {"cpp.dynamic_threads": True, "cpp.enable_floating_point_contract_flag": "off",
                   "cpp.enable_unsafe_math_opt_flag": False, "size_asserts": True}
# tensors of this many elements or more take int64 counts (rounding.stack_counts) and their
# own direct-call signature
INT32_LIMIT = 1 << 31
EAGER_CHUNK = 1 << 20  # elements per eager chunk (bounded temporaries; large enough to be fast)

_OVERRIDE: bool | None = None
_BROKEN = False
_ENV = [None, True]  # (the last GRADCOMP_COMPILE read, whether it means the fused path)


def set_compile(enabled: bool | None) -> None:
    """Process-wide switch of every fused operator: True/False force the fused/eager path,
    None defers to ``GRADCOMP_COMPILE``."""
    global _OVERRIDE
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _OVERRIDE = enabled


def compile_enabled() -> bool:
    """Whether a call with ``compile=None`` takes the fused (torch.compile) path."""
    if _BROKEN:
        return False
    if _OVERRIDE is not None:
        return _OVERRIDE
    raw = os.environ.get("GRADCOMP_COMPILE", "1")
    if raw != _ENV[0]:  # parsed once per value (this runs per kernel call)
        value = raw.strip()
        require_choice(value, "GRADCOMP_COMPILE", ("0", "1"))
        _ENV[:] = [raw, value == "1"]
    return _ENV[1]


class FusedOp:
    """One fused operator: ``op(*tensors, compile=None)`` runs ``fn`` compiled or eager.

    ``fn`` must be a module-level function of tensors only (constants passed as tensors, so
    that a new format or threshold reuses the compiled graph instead of recompiling). With
    ``elementwise=True`` its first argument is a flat tensor (or the (rows, L) view of one:
    ``random.counter_layout``), its result has that tensor's shape, and it takes ``start=``
    (the chunk's offset in the whole tensor, in elements): the eager path then runs in chunks
    of whole rows (module docstring). A result may also be a pair ``(out, counts)``
    with ``counts`` a 1-d int64 tensor of sums over the elements (added over the chunks).
    Keyword arguments ``static`` (Python constants) are bound to the body: each set is its own
    variant, compiled separately (``FusedOp(body, name, True, stochastic=True)``). ``split``:
    values that get a variant of their own without being arguments (dtype, device type: each
    would otherwise be one more graph of the same code object, whose recompile budget dynamo
    limits to 8).

    ``into=True``: the in-place twin of ``fn``: its first result is written into its first
    argument (``x.copy_``, fused by inductor into the loop that computes it: x is read and
    written in place, no output buffer) and the call returns the other results (a tuple, ``()``
    when there are none). The eager path runs ``fn`` (chunked) and copies. The caller owns x:
    nothing else may read its old values afterwards.
    """

    def __init__(self, fn, name: str, elementwise: bool = False, split: tuple = (),
                 into: bool = False, **static):
        self.name, self.elementwise, self.into = name, elementwise, bool(into)
        if static or split:
            # one variant of a kernel: ``static`` (Python constants: which rounding, which
            # counts) bound to a copy of fn's code object, because dynamo's recompile budget is
            # per code object and one body serves many variants
            # (bound as keyword defaults: torch.compile of a functools.partial would compile a
            # shared wrapper frame instead)
            tag = "_".join([f"{k}={v}" for k, v in static.items()] + list(map(str, split)))
            fn = _copy(fn, f"{fn.__name__}__{tag}", {**(fn.__kwdefaults__ or {}), **static})
        self.body = fn  # what the eager path runs
        self.fn = _into_first(fn) if self.into else fn  # what dynamo compiles
        self._compiled = None
        self._graphs: list = []  # (FX graph, compiled callable) as the backend built them
        self._direct: dict = {}  # argument signature -> _Direct (or None: take dynamo)
        self._copies = 0  # fresh code objects made after dynamo's recompile limit (``_renew``)
        self._plain = None  # an in-place twin that failed to compile: its out-of-place body

    def _backend(self, gm, example_inputs):
        # inductor itself (torch.compile(..., options=COMPILE_OPTIONS) does the same); the
        # compiled callable is kept so that later calls can skip dynamo (``_Direct``)
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=COMPILE_OPTIONS)
        self._graphs.append((gm, compiled))
        return compiled

    def __call__(self, *args, compile: bool | None = None):
        global _BROKEN
        use = compile_enabled() if compile is None else bool(compile)
        if self._plain is not None:  # an in-place twin that did not compile
            return _write_first(args[0], self._plain(*args, compile=compile))
        if use and not _BROKEN:
            try:
                sig = _signature(args)
                direct = self._direct.get(sig, False)
                if direct and self.into and _repeats(args):
                    direct = None  # x passed twice: the write would feed a read, so dynamo
                if direct:  # validated: the compiled code without dynamo's frame machinery
                    out = direct(args)
                    if out is not None:
                        return out
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True,
                                                   backend=self._backend)
                built = len(self._graphs)
                # an in-place call's input as it was, to replay the validating call on a copy
                before = args[0].clone() if self.into and direct is not None else None
                try:
                    res = self._dynamo(args)
                except Exception as exc:
                    if not self._renew(exc):
                        raise
                    built = len(self._graphs)
                    res = self._dynamo(args)
                if direct is not None and not _repeats(args):
                    # first call with this signature, or one whose sizes the direct graph
                    # does not take (sizes that duck-sizing tied together when it was
                    # compiled): dynamo compiled a more general graph, which replaces it;
                    # no new graph: dynamo from now on for this signature. A call passing one
                    # tensor twice builds nothing: dynamo merged the two into one graph input,
                    # and a direct call would read the first for both on later calls
                    try:
                        self._direct[sig] = _Direct.validated(self, args, res, built, before)
                    except Exception:  # noqa: BLE001 - dynamo keeps the calls; never rerun an
                        self._direct[sig] = None  # in-place call whose x is already written
                return res
            except Exception as exc:  # a missing C++ toolchain must not break training
                if self.into and self._compiles_out_of_place(args, exc):
                    # this in-place twin alone failed to compile (x not yet written): the
                    # out-of-place kernel, then a copy into x, from now on
                    return _write_first(args[0], self._plain(*args, compile=True))
                _BROKEN = True
                warnings.warn(f"{self.name}: torch.compile failed ({type(exc).__name__}: {exc}); "
                              "using the eager path for every fused operator",
                              RuntimeWarning, stacklevel=3)
        return self.eager(*args)

    def _compiles_out_of_place(self, args, exc: Exception) -> bool:
        """After the in-place twin failed (``exc``): whether the out-of-place body compiles
        and runs on these arguments (x is not written); then ``_plain`` takes this operator's
        calls from now on (one RuntimeWarning names the failure)."""
        if self._plain is None:
            plain = FusedOp(self.body, self.name, elementwise=self.elementwise)
            try:
                with warnings.catch_warnings():  # its failure is the caller's one warning
                    warnings.simplefilter("ignore", RuntimeWarning)
                    plain(*args, compile=True)
            except Exception:  # noqa: BLE001 - the caller switches the fused path off
                return False
            if _BROKEN:
                return False
            self._plain = plain
            warnings.warn(f"{self.name}: the in-place kernel failed to compile "
                          f"({type(exc).__name__}: {exc}); writing its result through a copy",
                          RuntimeWarning, stacklevel=4)
        self._compiled, self._direct = None, {}
        return True

    def _dynamo(self, args):
        # the body's int arguments are a variant's static values (its tensors carry everything
        # that varies): traced as constants, not as symbolic graph inputs (dynamo's default
        # for an int argument, ``specialize_int=False``), whose arithmetic inductor's CPU code
        # then redoes per vector of the loop (LUQ's 2^E: a ``std::pow`` per 16 elements, the
        # kernel 2.5x slower, measured)
        with torch._dynamo.config.patch(specialize_int=True):
            return self._compiled(*args)

    def _renew(self, exc: Exception) -> bool:
        """After dynamo's recompile limit (8 graphs per code object: dtypes, size-1
        specialisations and duck-sized shapes of a long run add up), compile a fresh copy of
        the body's code object, whose budget starts again (the graphs built so far stay
        reachable through their direct calls); True when it did (at most 3 copies: each graph
        is a C++ compilation)."""
        if type(exc).__name__ != "FailOnRecompileLimitHit" or self._copies >= 3:
            return False
        self._copies += 1
        self.fn = _copy(self.fn, f"{self.fn.__code__.co_name}_{self._copies}",
                        self.fn.__kwdefaults__)
        self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True,
                                       backend=self._backend)
        return True

    def bind(self, *template) -> Bound:
        """This operator with the arguments of ``template`` fixed; ``None`` marks what each
        call passes (``Bound``)."""
        return Bound(self, template)

    def eager(self, *args):
        """The eager body, chunked for an elementwise operator (then, ``into``, copied into
        the first argument)."""
        res = self._eager(args)
        return _write_first(args[0], res) if self.into else res

    def _eager(self, args):
        x, rest = args[0], args[1:]
        n = x.numel()
        if not self.elementwise or n <= EAGER_CHUNK:
            return self.body(*args)
        # chunks of whole rows: a flat x has rows of one element, the counter hash's 2-D
        # layout (``random.counter_layout``) rows of L; ``start`` counts elements
        rows = x.shape[0]
        row = n // rows
        step = max(1, EAGER_CHUNK // row)
        first = self.body(x[:step], *rest, start=0)
        counts = None
        if isinstance(first, tuple):
            first, counts = first
        out = torch.empty(x.shape, dtype=first.dtype, device=first.device)
        out[:step] = first
        del first
        for i in range(step, rows, step):
            j = min(i + step, rows)
            res = self.body(x[i:j], *rest, start=i * row)
            if counts is None:
                out[i:j] = res
            else:
                out[i:j] = res[0]
                counts = counts + res[1]
        return out if counts is None else (out, counts)


def _write_first(x: torch.Tensor, res):
    """An in-place operator's results (``FusedOp(..., into=True)``): ``res``'s first tensor
    written into x, the rest returned."""
    if isinstance(res, tuple):
        x.copy_(res[0])
        return res[1:]
    x.copy_(res)
    return ()


def _into_first(fn):
    """``fn``'s in-place twin for dynamo: a function of the same parameters (names, defaults,
    keyword-only statics: ``_Direct`` maps the graph's inputs to them by name) that returns
    ``_write_first(x, fn(...))``. Generated, since only a function's own code fixes the names
    dynamo gives its inputs."""
    code = fn.__code__
    pos = code.co_varnames[:code.co_argcount]
    kw = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    if not pos or code.co_flags & (0x04 | 0x08):  # no x, or *args / **kwargs
        raise TypeError(f"{code.co_name}: an in-place twin needs named parameters, x first")
    params = ", ".join(pos) + "".join([", *"] + [f", {k}" for k in kw] if kw else [])
    call = ", ".join(pos) + "".join(f", {k}={k}" for k in kw)
    scope = {"_body": fn, "_write_first": _write_first}
    exec(f"def _twin({params}):\n    return _write_first({pos[0]}, _body({call}))\n",  # noqa: S102
         scope)
    twin = scope["_twin"]
    # named after fn (a variant's name holds its statics, not an identifier)
    twin.__name__ = twin.__qualname__ = f"{code.co_name}__into"
    twin.__code__ = twin.__code__.replace(co_name=twin.__name__)
    twin.__defaults__ = fn.__defaults__
    twin.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    return twin


def _copy(fn, name: str, kwdefaults: dict | None):
    """``fn`` with a code object of its own named ``name`` (dynamo keeps its compiled graphs
    and its recompile budget per code object) and keyword-only defaults ``kwdefaults``."""
    code = fn.__code__.replace(co_name=name)
    clone = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = kwdefaults
    return clone


class Bound:
    """A ``FusedOp`` with some arguments fixed (``op.bind(*template)``): ``bound(*varying,
    compile=None)`` is ``op(*args, compile=compile)``, ``args`` the template with the varying
    arguments in its ``None`` slots, in order. The same results; what it saves is per call:
    the fixed arguments' part of the signature (``_signature``, computed from the varying
    ones alone) and the caller's rebuilding of the fixed tensors, so that a hot path (a layer's
    compression, once per layer and step) costs a dictionary lookup and the compiled call.
    The fixed tensors are held, so they must not change in place between calls.
    """

    __slots__ = ("op", "template", "slots", "_direct")

    def __init__(self, op: FusedOp, template: tuple):
        self.op, self.template = op, tuple(template)
        self.slots = tuple(i for i, a in enumerate(self.template) if a is None)
        self._direct: dict = {}  # the varying arguments' signature -> _Direct or None

    def __call__(self, *varying, compile: bool | None = None):
        if len(varying) != len(self.slots):
            raise TypeError(f"{self.op.name}: {len(self.slots)} varying arguments expected, "
                            f"got {len(varying)}")
        args = list(self.template)
        for i, v in zip(self.slots, varying):
            args[i] = v
        args = tuple(args)
        if not use_compiled(compile):
            return self.op(*args, compile=False)
        sig = _signature(varying)
        direct = self._direct.get(sig, False)
        if direct and self.op.into and _repeats(args):
            direct = None  # x passed twice to an in-place operator: its own dispatch
        if direct:
            out = direct(args)
            if out is not None:
                return out
        res = self.op(*args, compile=True)
        if direct is not None:
            # first call with this signature, or sizes the direct call did not take: the
            # operator's validated call as it holds it now (None: its own dispatch from now on)
            self._direct[sig] = self.op._direct.get(_signature(args)) or None
        return res


def _signature(args) -> tuple:
    """What a compiled graph was specialised on besides sizes: each tensor's dtype, device,
    dimensions, contiguity and autograd flag, whether it has 2^31 elements or more (the
    kernels' int32 counts and counters test that size: a guard in the graph, which a direct
    call would skip) and which of its sizes are 0 or 1 (dynamo specialises those: a graph
    compiled for a size-1 dimension does not take others, nor the general graph size 1);
    each other argument's value."""
    return tuple((a.dtype, a.device, a.dim(), a.is_contiguous(), a.requires_grad,
                  a.numel() >= INT32_LIMIT, _small(a.shape))
                 if isinstance(a, torch.Tensor) else (type(a), a) for a in args)


def _repeats(args) -> bool:
    """Whether one tensor object is passed as two of ``args``."""
    ids = [id(a) for a in args if isinstance(a, torch.Tensor)]
    return len(set(ids)) < len(ids)


def _small(shape) -> tuple | bool:
    """The sizes of ``shape`` with those of 2 and above as 2 (False when none is 0 or 1)."""
    return (0 in shape or 1 in shape) and tuple(map(min, shape, _TWOS))


_TWOS = (2,) * 64  # more than any tensor's dimensions
# a ``_Direct`` getter's code for a tensor's storage offset (sizes are d >= 0, strides -1 - d
# for the at most 64 dimensions it takes: ``_Direct.validated`` refuses more)
_OFFSET = -65


def _read(t: torch.Tensor, d: int) -> int:
    """The size (d >= 0), stride (-1 - d) or storage offset (``_OFFSET``) a getter names."""
    return t.shape[d] if d >= 0 else t.storage_offset() if d == _OFFSET else t.stride(-1 - d)


class _Direct:
    """Calls one compiled graph without dynamo: ``torch.compile``'s frame evaluation, guard
    checks and runtime wrappers cost 50-130 us per call on the CPU (measured: a compiled
    ``x * s`` on 0.4M floats took 82 us through dynamo, 36 us called directly, as long as
    eager), paid per layer and step by every hot-path kernel.

    Built from the graph that dynamo captured on a call (its placeholders are the function's
    tensor arguments, ``l_<name>_``, their symbolic sizes, and any int argument dynamo made an
    input: none, as ``FusedOp._dynamo`` traces ints as constants); used only for arguments of
    the same signature (``_signature``: the guards that matter to a pure tensor kernel), only
    when every symbolic size, stride or storage offset is an argument's own (an offset: a
    row of a larger tensor, e.g. a ``random.Stream``'s keys), and only after it returned
    bit for bit what dynamo returned for the same arguments (that check, at the first call of a
    signature, is the one host synchronisation it adds on a GPU, beside the compilation
    itself). A symbol shared by several dimensions (an input broadcast against another, or
    duck-sizing) is read from the first and the others are compared with it at each call
    (``same``); a size the graph does not take (those comparisons, or the generated code's own
    size asserts) returns None: the caller goes back to dynamo, which compiles a more general
    graph (then validated in turn) or keeps that signature.
    """

    def __init__(self, compiled, getters, single: bool, tail: tuple, same: tuple = (),
                 boxed: bool = False, mutated: tuple = ()):
        self.compiled, self.getters, self.single = compiled, getters, single
        # the defaults of the positional parameters the call leaves out, then the values of
        # the keyword-only (static) ones
        self.tail = tail
        self.same = same  # ((i, d, j, e), ...): _read(args[i], d) must equal _read(args[j], e)
        # boxed: ``compiled`` is the generated code's own ``call``, taking one list
        # (``_generated_graph``); else the callable ``compile_fx`` returned, taking the values
        self.boxed = boxed
        # positions (in the values passed) of the inputs the generated code writes in place:
        # their version counters are bumped after the call, as AOT's wrapper does
        self.mutated = mutated

    def __call__(self, args):
        args = args + self.tail
        for i, d, j, e in self.same:
            if _read(args[i], d) != _read(args[j], e):
                return None
        values = [args[i] if d is None else _read(args[i], d) for i, d in self.getters]
        written = [values[i] for i in self.mutated]  # the generated call empties its list
        try:
            out = self.compiled(values) if self.boxed else self.compiled(*values)
        except Exception:  # noqa: BLE001 - e.g. assert_size_stride on a specialised size
            return None
        for t in written:
            torch.autograd.graph.increment_version(t)
        return out[0] if self.single else tuple(out)

    @classmethod
    def validated(cls, op: FusedOp, args, res, built: int, before=None):
        """A ``_Direct`` for this signature, or None (dynamo keeps the calls). ``before``: an
        in-place operator's first argument before dynamo's call wrote it (each check replays
        the call on a copy of it and compares what it wrote too)."""
        if len(op._graphs) != built + 1:  # no new graph (or several): nothing to tie to
            return None
        gm, compiled = op._graphs[-1]
        code = op.fn.__code__
        names = code.co_varnames[:code.co_argcount]
        defaults = op.fn.__defaults__ or ()
        missing = len(names) - len(args)
        if missing > len(defaults):
            return None
        tail = tuple(defaults[len(defaults) - missing:]) if missing else ()
        # the keyword-only parameters: a variant's static values (``FusedOp(..., **static)``),
        # constants of the graph (``FusedOp._dynamo``), passed on as the call passes them
        kwonly = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
        kwdefaults = op.fn.__kwdefaults__ or {}
        if any(k not in kwdefaults for k in kwonly):
            return None
        names += kwonly
        tail += tuple(kwdefaults[k] for k in kwonly)
        args = args + tail
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        dims: dict = {}  # symbol -> (argument index, dimension)
        same = []  # dimensions that share a symbol with the one it is read from
        getters = []
        for n in nodes:
            ev = n.meta.get("example_value")
            if not isinstance(ev, torch.Tensor):
                continue
            if ev.dim() > len(_TWOS):  # the getters' codes cover 64 dimensions
                return None
            name = n.name[2:-1] if n.name.startswith("l_") and n.name.endswith("_") else None
            if name not in names or not isinstance(args[names.index(name)], torch.Tensor):
                return None
            # sizes as dimension d >= 0, strides as -1 - d (a strided view's stride symbol)
            for d, size in enumerate(ev.shape):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if expr.is_number:
                        # a size the trace specialised to a constant (the Hadamard butterfly's
                        # n rows, which it unbinds): the generated code's size asserts
                        # (``size_asserts``) refuse any other, and the call returns None
                        continue
                    if not expr.is_Symbol:
                        return None
                    # a symbol shared by several dimensions (an input broadcast against
                    # another, or duck-sizing): read from its first, the others compared
                    first = dims.setdefault(str(expr), (names.index(name), d))
                    if first != (names.index(name), d):
                        same.append((*first, names.index(name), d))
        for n in nodes:  # a stride or offset symbol that no size explains (a strided view;
            # a row of a larger tensor, as a ``random.Stream``'s keys: its storage offset)
            ev = n.meta.get("example_value")
            if isinstance(ev, torch.Tensor):
                i = names.index(n.name[2:-1])
                for j, st in enumerate(ev.stride()):
                    if isinstance(st, torch.SymInt) and st.node.expr.is_Symbol:
                        dims.setdefault(str(st.node.expr), (i, -1 - j))
                off = ev.storage_offset()
                if isinstance(off, torch.SymInt) and off.node.expr.is_Symbol:
                    # an offset equal to a size when dynamo traced it shares that size's
                    # symbol (duck sizing): read from the size, compared at each call
                    first = dims.setdefault(str(off.node.expr), (i, _OFFSET))
                    if first != (i, _OFFSET):
                        same.append((*first, i, _OFFSET))
        for n in nodes:
            ev = n.meta.get("example_value")
            param = n.name[2:-1] if n.name.startswith("l_") and n.name.endswith("_") else None
            if isinstance(ev, torch.Tensor):
                getters.append((names.index(param), None))
            elif isinstance(ev, torch.SymInt) and param in names:
                if not isinstance(args[names.index(param)], int):
                    return None
                getters.append((names.index(param), None))  # an int argument (``start``)
            elif isinstance(ev, torch.SymInt) and str(ev.node.expr) in dims:
                getters.append(dims[str(ev.node.expr)])
            else:
                return None
        single = isinstance(res, torch.Tensor)
        given = args[:len(args) - len(tail)]
        wrote = None if before is None else (before, args[0])
        direct = cls(compiled, getters, single, tail, tuple(same))
        if not _returns(direct, given, res, False, wrote):
            return None
        graph = _generated_graph(compiled)
        if graph is not None and not any(isinstance(a, torch.Tensor) and a.requires_grad
                                         for a in given):
            # the generated code called as AOT autograd's runtime wrapper calls it, without
            # the wrappers (kept when its results differ in any bit, stride or aliasing)
            mutated = tuple(sorted(graph.mutated_input_idxs))
            if mutated and (before is None or any(getters[i] != (0, None) for i in mutated)):
                return direct  # a write the operator does not declare
            raw = cls(graph.current_callable, getters, single, tail, tuple(same), boxed=True,
                      mutated=mutated)
            if _returns(raw, given, res, True, wrote):
                return raw
        return direct


def _returns(direct: _Direct, args, res, strides: bool, wrote=None) -> bool:
    """Whether ``direct(args)`` returns what dynamo returned (``res``): the same number of
    tensors, each of the same dtype, shape and bits; with ``strides`` also the same strides,
    and none sharing memory with an argument (nor do dynamo's). ``wrote``: (the first
    argument before dynamo's call, after it) of an in-place operator: the call runs on a copy
    of the first, which must then hold the same bits as the second."""
    if wrote is not None:
        work = wrote[0].clone()
        args = (work, *args[1:])
    try:
        got = direct(args)
    except Exception:  # noqa: BLE001 - any failure: keep dynamo
        return False
    if wrote is not None and not torch.equal(_as_bits(work), _as_bits(wrote[1])):
        return False
    single = isinstance(res, torch.Tensor)
    want = (res,) if single else res
    have = (got,) if single else got
    if got is None or not isinstance(want, tuple) or len(have) != len(want):
        return False
    for a, b in zip(have, want):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_as_bits(a), _as_bits(b))):
            return False
        if strides and a.stride() != b.stride():
            return False
    if strides:
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        for t in have + want:
            if t.untyped_storage().data_ptr() in inputs:
                return False
    return True


def _generated_graph(compiled):
    """Inductor's ``CompiledFxGraph`` inside the callable ``compile_fx`` returned (found in
    the closures of AOT autograd's wrappers), whose ``current_callable`` is the generated
    code's ``call``; None when there is none, several, or no callable.

    Why: AOT autograd's runtime wrappers and dynamo's disable context cost 20-40 us per call
    when warm and several times that in a backward pass, where a layer's hook finds the
    interpreter's and torch's Python state evicted from the caches by the convolutions between
    two hooks (measured in alternate steps of one process: about 1 ms of a ResNet-8 step's
    6 ms of FP6 hooks). The wrappers do
    nothing for these graphs beyond bumping the version counter of an input written in place
    (an ``into`` operator's x: ``_Direct`` does that) and setting the grad and autocast modes
    around the call, which a graph of tensors that do not require grad (``validated`` checks
    it; ``_signature`` keys it) and make no autocast-sensitive op (the generated code calls
    its own kernels) does not read: none is passed twice (``_repeats``; for an in-place
    operator checked at every call) and no output aliases an input (``_returns`` checks that
    on the validating call, with every bit and stride of the results)."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:  # another torch: keep the wrappers
        return None
    found, seen, todo = [], set(), [(compiled, 0)]
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or depth > 6:
            continue
        seen.add(id(obj))
        if isinstance(obj, CompiledFxGraph):
            found.append(obj)
            continue
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append((cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                continue
        # AOT's compiled-function objects hold the next callable as an attribute
        inner = getattr(obj, "compiled_fn", None) if not isinstance(obj, type) else None
        if inner is not None:
            todo.append((inner, depth + 1))
    if len(found) != 1 or getattr(found[0], "current_callable", None) is None \
            or not hasattr(found[0], "mutated_input_idxs"):
        return None
    return found[0]


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so that NaN equals the same NaN)."""
    if not t.is_floating_point():
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[
        t.element_size()])


_VARIANTS: dict = {}


def variant(fn, name: str, elementwise: bool = True, split: tuple = (), into: bool = False,
            **static) -> FusedOp:
    """The ``FusedOp`` of ``fn`` with ``static`` bound, built on first use and kept (one
    compiled code object per variant: a rounding mode, a set of counts, ..., and per ``split``
    value, see ``FusedOp``; ``into``: its in-place twin)."""
    key = (fn, elementwise, split, bool(into), tuple(sorted(static.items())))
    op = _VARIANTS.get(key)
    if op is None:
        op = _VARIANTS[key] = FusedOp(fn, name, elementwise=elementwise, split=split,
                                      into=into, **static)
    return op


def use_compiled(compile: bool | None) -> bool:
    """Whether a call with this ``compile=`` argument takes the fused path (for operators that
    compose a different eager path themselves, e.g. a reduction then a chunked pass)."""
    return not _BROKEN and (compile_enabled() if compile is None else bool(compile))
