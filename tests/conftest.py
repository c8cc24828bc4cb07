"""Suite-wide settings."""

import os

# The fused torch.compile kernels compile C++ on first use (10-25 s per variant); the tests of
# those kernels pass compile=True explicitly, everything else runs the bit-identical eager path.
os.environ.setdefault("GRADCOMP_COMPILE", "0")

import torch  # noqa: E402

# pytest-xdist runs one worker per core: one intra-op thread each, or OpenMP threads of the
# workers fight over the cores (small ops then take milliseconds of spinning).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fused_path_stays_on():
    # a compile failure switches the fused path off for the rest of the process
    # (numerics.kernels); the tests that compare the fused kernels with the eager ones would
    # then compare eager with eager and pass: every test must leave it on
    yield
    from gradcomp.numerics import kernels

    assert not kernels._BROKEN, "the fused path was switched off (kernels._BROKEN): see the " \
        "RuntimeWarning 'torch.compile failed'"
