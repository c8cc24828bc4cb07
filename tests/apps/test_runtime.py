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
# temporaries); it reports the minor page faults of the cycle and the bytes malloc holds free
# afterwards (glibc's mallinfo: mallinfo2 where there is one). Run in a fresh process per policy.
_PROBE = r"""
import ctypes, json, resource, sys, torch
from gradcomp.apps.runtime import apply_malloc_policy

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
libc = ctypes.CDLL("libc.so.6")
if hasattr(libc, "mallinfo2"):
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]
    info = libc.mallinfo2
else:
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_int) for n in FIELDS]
    info = libc.mallinfo
info.restype = Info

def cycle(n=2 << 20, k=8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(n) for _ in range(k)]
    for t in ts:
        t.fill_(1.0)
    del ts, t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, info().fordblks

ok = apply_malloc_policy(sys.argv[1])
print(json.dumps({"ok": ok, "cycles": [cycle() for _ in range(6)]}))
"""

_PAGES = 8 * (8 << 20) // 4096  # pages one cycle writes


def _probe(policy):
    res = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_policy_names_and_errors():
    assert MALLOC_POLICIES == ("retain", "default")
    assert gradcomp.retain_freed_memory is retain_freed_memory  # the public name
    assert apply_malloc_policy("default") is False  # leaves the C library's policy alone
    with pytest.raises(ValueError, match="malloc must be one of 'retain', 'default'; got 'keep'"):
        apply_malloc_policy("keep")
    with pytest.raises(ValueError, match="malloc must be one of"):
        TrainConfig(malloc="never")
    assert TrainConfig().malloc == "retain"


def test_retained_memory_is_kept_and_reused():
    """glibc's default policy maps each fresh 8 MiB block and unmaps it when freed (nothing
    kept: the next cycle faults its pages in again); retained, the freed 64 MiB stay in malloc
    and, once the heap has grown (at most three cycles), a cycle faults in no page. Without
    glibc (no mallopt) the call changes nothing and says so."""
    if platform.libc_ver()[0] != "glibc":
        assert apply_malloc_policy("retain") is False
        return
    default, retain = _probe("default"), _probe("retain")
    assert default["ok"] is False and retain["ok"] is True
    assert default["cycles"][0][1] < (8 << 20), default  # freed blocks unmapped, not kept
    assert retain["cycles"][0][1] >= (64 << 20), retain  # all eight kept for reuse
    assert all(f <= 0.01 * _PAGES for f, _ in retain["cycles"][3:]), retain

