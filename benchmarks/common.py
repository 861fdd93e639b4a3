"""What every benchmark does first: pick the device, quiet the libraries, and set up one rank (megatron's
parallel state), so that MoE layers and models build as in training. The benchmarks are scripts
(`python benchmarks/moe_layer.py ...`): they import this file as a sibling module and wider as an installed package."""

from __future__ import annotations

import os

import torch


def start(cpu: bool) -> torch.device:
    """CUDA unless --cpu was asked for or there is no GPU; single-rank process groups set up."""
    cuda = torch.cuda.is_available() and not cpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import warnings

    warnings.filterwarnings("ignore")
    import patches
    from wider import parallel

    patches.apply_defaults()
    parallel.init_distributed(1)
    return torch.device("cuda" if cuda else "cpu")
