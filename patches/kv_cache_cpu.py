"""Let megatron-core's static inference key/value cache live on the model's device (CPU included).

Why: megatron-core 0.16.1 `Attention._allocate_memory` (megatron/core/transformer/attention.py) allocates
the KV buffers of the static inference path (StaticInferenceContext, used by wider.generation for the gpt,
gpt_moe and widenet architectures) on `torch.cuda.current_device()`, which raises "Torch not compiled with
CUDA enabled" on a machine without a GPU, and puts the cache on the wrong device for a model kept on CPU on a
GPU machine.
Fix: allocate the same buffer ([max_sequence_length, max_batch_size, query groups per partition, dim],
upstream's shape and dtype) on the device of the attention's own QKV weight. On a GPU model this is the
current CUDA device, as upstream.
Versions: megatron-core 0.16.1. Delete when upstream stops calling torch.cuda.current_device() in
_allocate_memory (tests/test_patches.py::test_kv_cache_patch_still_needed fails then).
"""

from __future__ import annotations

import torch

PACKAGE = "megatron-core"
VERSIONS = ("0.16.1",)


def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
    """Upstream's buffer, on the device of this attention's parameters."""
    device = next(self.parameters()).device
    return torch.empty(inference_max_sequence_length, batch_size, self.num_query_groups_per_partition, dim,
                       dtype=dtype, device=device)


def apply() -> None:
    from megatron.core.transformer.attention import Attention

    Attention._allocate_memory = _allocate_memory
