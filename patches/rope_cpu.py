"""Let megatron-core's RotaryEmbedding run on CPU.

Why: megatron-core 0.16.1 `RotaryEmbedding.get_emb` moves `inv_freq` to `torch.cuda.current_device()` at the
first forward pass whenever it is on the CPU, which raises "Torch not compiled with CUDA enabled" on a
machine without a GPU (and would also be wrong for a model kept on CPU on a GPU machine).
Fix: keep `inv_freq` where it is unless CUDA is available and the tensor is on the CPU, then compute the
same embedding as upstream: [seq, 1, 1, dim] with (freqs, freqs) concatenated, or interleaved.
Versions: megatron-core 0.16.1. Delete when upstream stops calling torch.cuda.current_device() in get_emb
(tests/test_patches.py::test_rope_patch_still_needed fails then).
"""

from __future__ import annotations

import torch

PACKAGE = "megatron-core"
VERSIONS = ("0.16.1",)


def _get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    if self.inv_freq.device.type == "cpu" and torch.cuda.is_available():
        self.inv_freq = self.inv_freq.to(device=torch.cuda.current_device())  # upstream's behaviour on GPU
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


def apply() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding.get_emb = _get_emb
