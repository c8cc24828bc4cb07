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
