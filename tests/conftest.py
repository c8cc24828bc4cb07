"""Suite-wide settings."""

import os

import torch

# pytest-xdist runs one worker per core: one intra-op thread each, or OpenMP threads of the
# workers fight over the cores (small ops then take milliseconds of spinning).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
