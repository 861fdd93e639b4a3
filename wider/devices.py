"""Device and dtype names as every tool takes them (--device, --dtype, from_pretrained(device=, dtype=)).

    resolve_device("auto")            cuda if available, else cpu; also "cpu", "cuda", "cuda:N", a torch.device
    resolve_dtype("auto", device)     bf16 on CUDA (the precision GPU runs train in), fp32 on CPU (exact comparisons)
    resolve_dtype("bf16")             also "fp32", "fp16", their long names, a torch dtype, or None (= fp32)
"""

from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device or dtype that does not exist here; the message names the value and what to use instead."""


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    if isinstance(name, torch.device):
        dev = name
    elif name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(name))
        except RuntimeError:
            raise DeviceError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name}: no CUDA device is available here; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name}: wider runs on cpu or cuda; use one of those")
    return dev


def resolve_dtype(name: Union[str, torch.dtype, None], device: Optional[torch.device] = None) -> torch.dtype:
    """A floating dtype a model can run in. None = fp32; 'auto' = bf16 on CUDA, fp32 elsewhere."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16, torch.float16):
            raise DeviceError(f"dtype {name} is not a floating dtype a model can run in; use torch.float32 or "
                              "torch.bfloat16")
        return name
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if str(name) not in DTYPES:
        raise DeviceError(f"dtype {name!r} is invalid; use auto, fp32, bf16 or fp16 (or a torch dtype)")
    return DTYPES[str(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ... for printing and JSON (torch's own name without the module)."""
    return str(dtype).replace("torch.", "")
