"""Activation recompute through torch.utils.checkpoint(use_reentrant=False).

Why: megatron-core 0.16.1's `tensor_parallel.checkpoint` (CheckpointFunction, used by TransformerBlock for
recompute_granularity='full') is a reentrant autograd.Function that saves and restores the CUDA RNG state
(it fails without CUDA), and reentrant recompute fires the gradient hook of a parameter used in several
blocks more than once, which breaks DeepSpeed ZeRO-2's gradient partitioning for shared parameters
(WideNet, MoEUT). Non-reentrant checkpointing has neither problem and restores CPU and CUDA RNG states.
Fix: replace `megatron.core.tensor_parallel.checkpoint` (looked up at call time by TransformerBlock) with a
non-reentrant torch checkpoint. `distribute_saved_activations` (splitting saved inputs across TP ranks) is
not supported and is refused.
Versions: megatron-core 0.16.1. Delete when upstream's recompute is non-reentrant
(tests/test_patches.py::test_recompute_patch_still_needed fails then).
"""

from __future__ import annotations

import torch.utils.checkpoint

PACKAGE = "megatron-core"
VERSIONS = ("0.16.1",)


def checkpoint(function, distribute_saved_activations, *args):
    if distribute_saved_activations:
        raise ValueError("distribute_saved_activations is not supported with non-reentrant recompute; "
                         "set distribute_saved_activations=False")
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def apply() -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.checkpoint = checkpoint
