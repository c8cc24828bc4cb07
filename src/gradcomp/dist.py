"""``gradcomp.dist``: data-parallel compressed communication, the public namespace.

    import gradcomp.dist as gd
    ddp_model.register_comm_hook(gd.CommHookState(gd.QSGD(levels=16)), gd.comm_hook)
    # or, by name (what ``gradcomp train --comm METHOD`` uses):
    gd.validate_comm("scalecom", {"ratio": 0.01})   # cheap, no process group needed
    state, hook = gd.make_comm_hook("scalecom", ratio=0.01)
    ddp_model.register_comm_hook(state, hook)
    ...
    state.metrics()  # {"bytes_sent", "dense_bytes", "compression_ratio", ...}

See ``gradcomp.integration.ddp_hooks`` (the hook, its state, the registry) and
``gradcomp.compressors.comm`` (QSGD, TopK, ScaleCom, StochasticPrune, FPCompress,
BlockCompress); FSDP2's compressed reduce-scatter: ``gradcomp.integration.fsdp`` (``setup_fsdp``,
``FP8ReduceScatter``, ``BlockReduceScatter``, ``AllToAllReduceScatter``, ``save_sharded`` /
``load_sharded``).
"""

from __future__ import annotations

from gradcomp.compressors.comm import (
    QSGD,
    Aggregation,
    BlockCompress,
    CommCompressor,
    ErrorFeedback,
    FPCompress,
    IncompatibleAggregationError,
    ScaleCom,
    StochasticPrune,
    TopK,
    qsgd_bits_bound,
)
from gradcomp.integration.ddp_hooks import (
    CommHookState,
    TorchHookState,
    allreduce_hook,
    available_methods,
    block_hook,
    check_same_config,
    comm_hook,
    fp16_hook,
    fp_hook,
    make_comm_hook,
    powersgd_hook,
    prune_hook,
    qsgd_hook,
    scalecom_hook,
    topk_hook,
    validate_comm,
)
from gradcomp.integration.fsdp import (
    AllToAllReduceScatter,
    BlockReduceScatter,
    FP8ReduceScatter,
    ScaleComReduceScatter,
    TopKReduceScatter,
    load_sharded,
    make_fsdp_comm,
    save_sharded,
    setup_fsdp,
    validate_fsdp_comm,
)

__all__ = [
    "AllToAllReduceScatter",
    "BlockReduceScatter",
    "FP8ReduceScatter",
    "ScaleComReduceScatter",
    "TopKReduceScatter",
    "load_sharded",
    "make_fsdp_comm",
    "save_sharded",
    "setup_fsdp",
    "validate_fsdp_comm",
    "QSGD",
    "Aggregation",
    "BlockCompress",
    "CommCompressor",
    "CommHookState",
    "ErrorFeedback",
    "FPCompress",
    "IncompatibleAggregationError",
    "ScaleCom",
    "StochasticPrune",
    "TopK",
    "TorchHookState",
    "allreduce_hook",
    "available_methods",
    "block_hook",
    "check_same_config",
    "comm_hook",
    "fp16_hook",
    "fp_hook",
    "make_comm_hook",
    "powersgd_hook",
    "prune_hook",
    "qsgd_bits_bound",
    "qsgd_hook",
    "scalecom_hook",
    "topk_hook",
    "validate_comm",
]
