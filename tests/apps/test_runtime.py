"""apps.runtime: the process's malloc policy (retain_freed_memory)."""

import json
import platform
import subprocess
import sys

import pytest

import gradcomp
from gradcomp.apps.runtime import MALLOC_POLICIES, apply_malloc_policy, retain_freed_memory
from gradcomp.apps.train import TrainConfig

# Each cycle allocates eight 8 MiB float32 tensors, writes them and frees them (a step's
# temporaries). glibc's own counters (mallinfo2, or mallinfo before glibc 2.33) say where the
# blocks came from: hblks counts mmapped blocks (read while the tensors are alive), arena the
# heap's size and fordblks its free bytes (read after the free). Run in a fresh process per
# policy. (Not page faults: the kernel's counts also take NUMA-balancing faults.)
_PROBE = r"""
import ctypes, json, sys, torch
from gradcomp.apps.runtime import apply_malloc_policy

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
libc = ctypes.CDLL(None)
wide = hasattr(libc, "mallinfo2")

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t if wide else ctypes.c_int) for n in FIELDS]

info = libc.mallinfo2 if wide else libc.mallinfo
info.restype = Info

def cycle(n=2 << 20, k=8):
    ts = [torch.empty(n) for _ in range(k)]
    for t in ts:
        t.fill_(1.0)
    alive = info().hblks
    del ts, t
    after = info()
    return alive, after.arena, after.fordblks

ok = apply_malloc_policy(sys.argv[1])
start = info()
print(json.dumps({"ok": ok, "hblks": start.hblks, "free": start.fordblks,
                  "cycles": [cycle() for _ in range(6)]}))
"""

_BLOCKS = 8 << 20  # bytes of one tensor


def _probe(policy):
    res = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_policy_names_and_errors():
    assert MALLOC_POLICIES == ("retain", "default")
    assert gradcomp.retain_freed_memory is retain_freed_memory  # the public name
    assert apply_malloc_policy("default") is False  # leaves the process's policy as it is
    with pytest.raises(ValueError, match="malloc must be one of 'retain', 'default'; got 'keep'"):
        apply_malloc_policy("keep")
    with pytest.raises(ValueError, match="malloc must be one of"):
        TrainConfig(malloc="never")
    assert TrainConfig().malloc == "retain"


def test_retained_memory_is_kept_and_reused():
    """Under glibc's default policy the first 8 MiB blocks are mapped one by one and unmapped
    when freed (nothing kept for the next step); retained, they come from the heap, stay in it
    when freed (all 64 MiB), and later cycles reuse them (the heap stops growing). Without
    glibc (no mallopt) the call changes nothing and says so."""
    if platform.libc_ver()[0] != "glibc":
        assert apply_malloc_policy("retain") is False
        return
    default, retain = _probe("default"), _probe("retain")
    assert default["ok"] is False and retain["ok"] is True
    (mapped, _, free), *_ = default["cycles"]
    assert mapped - default["hblks"] == 8, default  # one mapping per tensor
    assert free - default["free"] < _BLOCKS, default  # unmapped when freed
    cycles = retain["cycles"]
    assert all(mapped == retain["hblks"] for mapped, _, _ in cycles), retain  # none mapped
    assert cycles[0][2] - retain["free"] >= 8 * _BLOCKS, retain  # all eight kept, none trimmed
    assert len({arena for _, arena, _ in cycles[2:]}) == 1, retain  # reused: no more growth
