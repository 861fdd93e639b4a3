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
import dataclasses
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
        if m.training and isinstance(m, MoE) and m.config.selection_bias and m.records:
            load_E = sum(r.routed_E for r in m.records)
            m.pending_load_E = load_E if m.pending_load_E is None else m.pending_load_E + load_E
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


def update_selection_biases(model: torch.nn.Module, group=None) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, section 2.1.2), after each optimizer step: every layer's load
    since the last update (the routed assignments per expert that take() summed over the step's forward passes) is
    summed over the data-parallel `group`, and each expert's selection bias moves by moe.bias_update_speed towards
    equal load: up if the expert's load is below the mean, down if above, unchanged if equal. Collective: every
    rank calls it after every step, so that the biases stay identical on every rank."""
    layers = [m for m in router_layers(model) if isinstance(m, MoE) and m.config.selection_bias]
    if not layers:
        return
    loads = [m.pending_load_E if m.pending_load_E is not None else
             torch.zeros(m.num_experts, dtype=torch.long, device=m.deepspeed_moe.gate.selection_bias.device)
             for m in layers]
    flat = torch.cat(loads).double()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    i = 0
    for m in layers:
        E = m.num_experts
        load_E = flat[i:i + E]
        i += E
        m.pending_load_E = None
        speed = m.config.settings.bias_update_speed
        if speed and load_E.sum() > 0:
            bias = m.deepspeed_moe.gate.selection_bias
            bias.add_(torch.sign(load_E.mean() - load_E).to(bias.dtype) * speed)


def selection_biases(model: torch.nn.Module) -> dict:
    """label -> the layer's current selection biases (a list), for the layers with aux-loss-free balancing."""
    return {m.label: m.deepspeed_moe.gate.selection_bias.tolist() for m in router_layers(model)
            if isinstance(m, MoE) and m.config.selection_bias}


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
    # Experts per token: share of the tokens that got 0, 1, ..., E experts (expert choice: any number; token
    # choice: k, fewer after drops); empty for routers that do not report it (SwitchHead).
    experts_per_token: list = dataclasses.field(default_factory=list)


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
            hist = (r.experts_per_token.double() if r.experts_per_token is not None
                    else torch.zeros(r.routed_E.numel() + 1, dtype=torch.float64, device=r.routed_E.device))
            acc = self._acc.get(label)
            if acc is None:
                self._acc[label] = [r.routed_E.double(), r.kept_E.double(), scalars.double(), hist]
            else:
                acc[0] += r.routed_E.double()
                acc[1] += r.kept_E.double()
                acc[2] += scalars.double()
                acc[3] += hist

    def __bool__(self) -> bool:
        return bool(self._acc)

    def reduce(self, group=None) -> "OrderedDict[str, Summary]":
        """Every rank must call it (one all-reduce); returns label -> Summary and empties the window."""
        out: "OrderedDict[str, Summary]" = OrderedDict()
        if not self._acc:
            return out
        labels = list(self._acc)
        flat = torch.cat([torch.cat(a) for a in self._acc.values()])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        i = 0
        for label in labels:
            E = self._acc[label][0].numel()
            routed, kept, sc = flat[i:i + E], flat[i + E:i + 2 * E], flat[i + 2 * E:i + 2 * E + 5]
            hist = flat[i + 2 * E + 5:i + 3 * E + 6]
            i += 3 * E + 6
            n = float(sc[4])
            total = float(routed.sum())
            tokens = float(hist.sum())
            out[label] = Summary(load=(routed / max(total, 1.0)).tolist(),
                                 dropped=1.0 - float(kept.sum()) / max(total, 1.0),
                                 entropy=float(sc[2]) / n, balance=float(sc[0]) / n, z=float(sc[1]) / n,
                                 sequence_entropy=float(sc[3]) / n,
                                 experts_per_token=(hist / tokens).tolist() if tokens else [])
        self._acc.clear()
        return out


def mean_over(summaries: "OrderedDict[str, Summary]", field: str) -> Optional[float]:
    vals = [getattr(s, field) for s in summaries.values()]
    return sum(vals) / len(vals) if vals else None
