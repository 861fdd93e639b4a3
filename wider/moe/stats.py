"""Collecting MoE aux losses and health statistics from a model, per call of each MoE layer.

The training loop calls clear(model) before a forward pass and take(model) right after it (before the
backward pass: with activation recompute, the recomputed forward inside backward appends records again,
and those must not count). A layer shared by several blocks (WideNet) reports once per call; its calls
are labelled block00, block01, ... in call order; an unshared layer reports under its own label.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from wider.moe.layer import CallRecord, MoE


def moe_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoE)]  # modules() lists a shared layer once


def clear(model: torch.nn.Module) -> None:
    for m in moe_layers(model):
        m.records.clear()


def take(model: torch.nn.Module) -> tuple[Optional[torch.Tensor], list[tuple[str, CallRecord]]]:
    """(sum of the weighted aux losses of every call, or None for a dense model; labelled records)."""
    labelled, total = [], None
    for m in moe_layers(model):
        for i, r in enumerate(m.records):
            labelled.append((f"block{i:02d}" if m.shared else m.label, r))
            total = r.aux if total is None else total + r.aux
        m.records.clear()
    return total, labelled


@dataclass
class Summary:
    load: list  # fraction of routed assignments per expert (sums to 1)
    dropped: float  # fraction of routed assignments dropped by the capacity
    entropy: float  # mean per-token router entropy (nats)
    balance: float  # unweighted balance loss (1 = uniform)
    z: float  # unweighted router z-loss


class Window:
    """Sums records over a logging window (or an evaluation) and reduces them over data-parallel ranks."""

    def __init__(self):
        self._acc: "OrderedDict[str, list]" = OrderedDict()

    def add(self, labelled: list) -> None:
        for label, r in labelled:
            scalars = torch.stack([r.balance.float(), r.z.float(), r.entropy.float(),
                                   torch.ones((), device=r.balance.device)])
            acc = self._acc.get(label)
            if acc is None:
                self._acc[label] = [r.routed_E.double(), r.kept_E.double(), scalars.double()]
            else:
                acc[0] += r.routed_E.double()
                acc[1] += r.kept_E.double()
                acc[2] += scalars.double()

    def __bool__(self) -> bool:
        return bool(self._acc)

    def reduce(self, group=None) -> "OrderedDict[str, Summary]":
        """Every rank must call it (one all-reduce); returns label -> Summary and empties the window."""
        out: "OrderedDict[str, Summary]" = OrderedDict()
        if not self._acc:
            return out
        labels = list(self._acc)
        flat = torch.cat([torch.cat([a[0], a[1], a[2]]) for a in self._acc.values()])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        i = 0
        for label in labels:
            E = self._acc[label][0].numel()
            routed, kept, sc = flat[i:i + E], flat[i + E:i + 2 * E], flat[i + 2 * E:i + 2 * E + 4]
            i += 2 * E + 4
            n = float(sc[3])
            total = float(routed.sum())
            out[label] = Summary(load=(routed / max(total, 1.0)).tolist(),
                                 dropped=1.0 - float(kept.sum()) / max(total, 1.0),
                                 entropy=float(sc[2]) / n, balance=float(sc[0]) / n, z=float(sc[1]) / n)
        self._acc.clear()
        return out


def mean_over(summaries: "OrderedDict[str, Summary]", field: str) -> Optional[float]:
    vals = [getattr(s, field) for s in summaries.values()]
    return sum(vals) / len(vals) if vals else None
