"""Let megatron-core's model-parallel RNG tracker and seeding run on CPU.

Why: megatron-core 0.16.1 `model_parallel_cuda_manual_seed` and `CudaRNGStatesTracker.add/fork` read and
write CUDA generator states only (`torch.cuda.get_rng_state`), so seeding fails with "Torch not compiled
with CUDA enabled" on a CPU-only machine, and any module that forks the tracker (dropout in
tensor-parallel regions, megatron's GPU-side initialisation) cannot run there.
Fix: when CUDA is unavailable, the tracker keeps CPU generator states instead; seeds follow upstream's
scheme (data-parallel seed, tensor-parallel seed = seed + 2718 + tp_rank, expert seed). On a CUDA machine
upstream code runs unchanged.
Versions: megatron-core 0.16.1. Delete when upstream seeds without CUDA
(tests/test_patches.py::test_seed_patch_still_needed fails then).
"""

from __future__ import annotations

import torch

PACKAGE = "megatron-core"
VERSIONS = ("0.16.1",)


def apply() -> None:
    from megatron.core.tensor_parallel import random as r

    orig_get, orig_set = r._get_cuda_rng_state, r._set_cuda_rng_state
    orig_add = r.CudaRNGStatesTracker.add

    def _get_state(*args, **kwargs):
        if torch.cuda.is_available():
            return orig_get(*args, **kwargs)
        return torch.get_rng_state()

    def _set_state(new_state, *args, **kwargs):
        if torch.cuda.is_available():
            return orig_set(new_state, *args, **kwargs)
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        if torch.cuda.is_available():
            return orig_add(self, name, seed)
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    r._get_cuda_rng_state = _get_state
    r._set_cuda_rng_state = _set_state
    r.CudaRNGStatesTracker.add = add
    # model_parallel_cuda_manual_seed itself also calls torch.cuda.manual_seed, which torch queues lazily
    # and ignores without CUDA; with the replacements above it seeds the CPU states.
