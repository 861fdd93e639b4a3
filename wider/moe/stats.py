"""Collecting MoE aux losses and health statistics from a model, per call of each MoE layer.

The training loop calls clear(model) before a forward pass and take(model) right after it (before the
backward pass: with activation recompute, the recomputed forward inside backward appends records again,
and those must not count). A layer shared by several blocks (WideNet) reports once per call; its calls
are labelled block00, block01, ... in call order; an unshared layer reports under its own label. A layer that
names its calls (`call_labels`, a list: MoEUT's layers, applied at several depths, label each application
layer03.ffn, layer03.attention, ...) reports the i-th call under call_labels[i].

The sequence entropy regulariser of sigmoid routers (MoEUT) is not a sum of per-call terms: the mean router
distribution of a sequence is pooled over the sequence's tokens AND over every call of the layer in the
forward pass (a layer repeated by layer grouping is called n_layers / G times), then its entropy is taken.
take() therefore adds, per layer, weight * entropy_regulariser(records) on top of the per-call aux terms.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from wider.moe.layer import MoE
from wider.moe.records import CallRecord
from wider.moe.router import sequence_entropy_loss


def router_layers(model: torch.nn.Module) -> list:
    """Every module that records routing: the MoE layers and routed attention (SwitchHead), which sets
    `records_routing = True` and keeps a `records` list of CallRecords, a `label` and `shared`."""
    return [m for m in model.modules() if isinstance(m, MoE) or getattr(m, "records_routing", False)]


def _call_label(m, i: int) -> str:
    """The label of the i-th call of a routing module (see the module docstring)."""
    names = getattr(m, "call_labels", None)
    if names:
        return names[i] if i < len(names) else f"{m.label}.call{i:02d}"
    return f"block{i:02d}" if m.shared else m.label


def clear(model: torch.nn.Module) -> None:
    for m in router_layers(model):
        m.records.clear()


def entropy_regulariser(records: list) -> Optional[torch.Tensor]:
    """Weighted minus-entropy of the mean router distribution of each sequence, pooled over the records' calls
    (every call must see the same sequences: the calls of one layer in one forward pass); None when the
    records carry no regulariser. Pooling: sum the per-sequence probability sums of all calls and divide by
    (calls x tokens per sequence), so every token of every call weighs the same."""
    rs = [r for r in records if r.prob_sums_BE is not None]
    if not rs:
        return None
    sums_BE = rs[0].prob_sums_BE
    for r in rs[1:]:
        if r.prob_sums_BE.shape != sums_BE.shape:
            raise ValueError(f"entropy regulariser: calls of one layer saw different batch layouts "
                             f"{tuple(r.prob_sums_BE.shape)} vs {tuple(sums_BE.shape)}; clear() the records "
                             "before each forward pass (wider.moe.stats.clear)")
        sums_BE = sums_BE + r.prob_sums_BE
    count = sum(r.tokens_per_seq for r in rs)
    return rs[0].entropy_weight * sequence_entropy_loss(sums_BE, count)


def take(model: torch.nn.Module) -> tuple[Optional[torch.Tensor], list[tuple[str, CallRecord]]]:
    """(sum of the weighted aux losses of every call plus each layer's pooled entropy regulariser, or None for a
    dense model; labelled records)."""
    labelled, total = [], None
    for m in router_layers(model):
        calls: dict = {}  # router name -> its records, in call order
        for r in m.records:
            i = len(calls.setdefault(r.router, []))
            calls[r.router].append(r)
            label = _call_label(m, i)
            labelled.append((f"{label}.{r.router}" if r.router else label, r))
            total = r.aux if total is None else total + r.aux
        for records in calls.values():  # each router's regulariser pools its own calls only
            reg = entropy_regulariser(records)
            if reg is not None:
                total = reg if total is None else total + reg
        m.records.clear()
    return total, labelled


@dataclass
class Summary:
    load: list  # fraction of routed assignments per expert (sums to 1)
    dropped: float  # fraction of routed assignments dropped by the capacity
    entropy: float  # mean per-token router entropy (nats)
    balance: float  # unweighted balance loss (1 = uniform)
    z: float  # unweighted router z-loss
    # Sigmoid routers: entropy of each sequence's mean router distribution in one call (nats), averaged over
    # sequences (and heads) and calls: what the entropy regulariser raises (log E = even use); 0 for others.
    sequence_entropy: float = 0.0


class Window:
    """Sums records over a logging window (or an evaluation) and reduces them over data-parallel ranks."""

    def __init__(self):
        self._acc: "OrderedDict[str, list]" = OrderedDict()

    def add(self, labelled: list) -> None:
        for label, r in labelled:
            seq_h = (-sequence_entropy_loss(r.prob_sums_BE.detach().float(), r.tokens_per_seq)
                     if r.prob_sums_BE is not None else torch.zeros((), device=r.balance.device))
            scalars = torch.stack([r.balance.float(), r.z.float(), r.entropy.float(), seq_h,
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
            routed, kept, sc = flat[i:i + E], flat[i + E:i + 2 * E], flat[i + 2 * E:i + 2 * E + 5]
            i += 2 * E + 5
            n = float(sc[4])
            total = float(routed.sum())
            out[label] = Summary(load=(routed / max(total, 1.0)).tolist(),
                                 dropped=1.0 - float(kept.sum()) / max(total, 1.0),
                                 entropy=float(sc[2]) / n, balance=float(sc[0]) / n, z=float(sc[1]) / n,
                                 sequence_entropy=float(sc[3]) / n)
        self._acc.clear()
        return out


def mean_over(summaries: "OrderedDict[str, Summary]", field: str) -> Optional[float]:
    vals = [getattr(s, field) for s in summaries.values()]
    return sum(vals) / len(vals) if vals else None
