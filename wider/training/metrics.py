"""What a run reports: TensorBoard scalars, a compact console line with an ETA, and metrics.jsonl.

Only rank 0 writes. metrics.jsonl holds one record per optimizer step (loss, lr, grad norm) and one per
evaluation, so that tests and scripts read exact numbers without parsing TensorBoard files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
from typing import Optional

import torch


def drop_records_after(path: str, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step`: a run resumed at `step` logs
    those steps again, and a script reading the file must see each step once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        from wider.files import atomic_write_text

        atomic_write_text(path, "".join(kept))


def fmt_count(n: float) -> str:
    for unit, div in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Reporter:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, config_json: str):
        self.enabled = enabled
        self.total = total_steps
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = os.path.join(run_dir, "tensorboard")
            self.writer = SummaryWriter(self.tb_dir)
            self.writer.add_text("config", "```\n" + config_json + "\n```", 0)
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.t_start = time.time()
        self.t_last = time.time()
        self.steps_since = 0
        self.start_step: Optional[int] = None

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at `step`: the ETA counts from here."""
        self.start_step = step
        self.t_start = time.time()

    def record(self, rec: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        if self.writer:
            for k, v in values.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.writer.add_scalar(k, v, step)

    def train_line(self, step: int, loss: float, lr: float, grad_norm: Optional[float], tokens_per_s: float,
                   mfu: Optional[float], extra: str = "", ppl: bool = True) -> None:
        if not self.enabled:
            return
        done = step - (self.start_step or 0)
        elapsed = time.time() - self.t_start
        eta = elapsed / max(done, 1) * (self.total - step)
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        mfu_s = f"{mfu:.3f}" if mfu is not None else "-"
        ppl_s = f" | ppl {math.exp(min(loss, 50)):.1f}" if ppl else ""  # language models (wider.tasks: reports_ppl)
        print(f"step {step:>6}/{self.total} | loss {loss:.4f}{ppl_s} | lr {lr:.2e} | "
              f"gnorm {gn} | {fmt_count(tokens_per_s)} tok/s | mfu {mfu_s} | mem {peak_memory_gb():.2f}G | "
              f"eta {fmt_time(eta)}{extra}", flush=True)

    def eval_line(self, step: int, name: str, loss: float, tokens: int, ppl: bool = True, unit: str = "tokens",
                  extra: str = "") -> None:
        if self.enabled:
            ppl_s = f" | ppl {math.exp(min(loss, 50)):.2f}" if ppl else ""
            print(f"eval  {step:>6}/{self.total} | {name} loss {loss:.4f}{ppl_s}{extra} | {fmt_count(tokens)} {unit}",
                  flush=True)

    def moe_scalars(self, step: int, split: str, summaries: dict) -> None:
        """Per MoE call (block): dropped fraction, router entropy, balance and z-loss, and each expert's share of the
        routed assignments (per expert only up to 16 experts; min / max share beyond). Tags `train_moe/...` and
        `valid_moe/...`: TensorBoard sorts groups by name, so these come after `train/` and `valid/` (the losses)."""
        if not self.writer:
            return
        group = f"{split}_moe"
        for label, s in summaries.items():
            E = len(s.load)
            values = {f"{group}/{label}/dropped": s.dropped, f"{group}/{label}/router_entropy": s.entropy,
                      f"{group}/{label}/balance_loss": s.balance, f"{group}/{label}/z_loss": s.z,
                      f"{group}/{label}/load_max_x_E": max(s.load) * E,
                      f"{group}/{label}/load_min_x_E": min(s.load) * E}
            if s.sequence_entropy:  # sigmoid routers (MoEUT): what the entropy regulariser raises
                values[f"{group}/{label}/sequence_entropy"] = s.sequence_entropy
            if s.experts_per_token:
                values[f"{group}/{label}/unrouted"] = s.experts_per_token[0]
                values[f"{group}/{label}/experts_per_token"] = mean_of_shares(s.experts_per_token)
                self.share_histogram(f"{group}/{label}/experts_per_token_distribution", s.experts_per_token, step)
            if E <= 16:
                values.update({f"{group}_load/{label}/expert{e:02d}": v for e, v in enumerate(s.load)})
            self.scalars(step, values)
        self.record({"kind": f"moe_{split}", "step": step,
                     **{label: summary_record(s) for label, s in summaries.items()}})

    def share_histogram(self, tag: str, shares: list, step: int) -> None:
        """A TensorBoard histogram of an integer quantity from its shares (shares[n]: the fraction of items with
        value n), one bucket per value."""
        if not self.writer or not shares:
            return
        import numpy as np

        counts = np.asarray(shares, dtype=np.float64)
        values = np.arange(len(counts), dtype=np.float64)
        used = np.nonzero(counts)[0]
        lo, hi = (float(values[used[0]]), float(values[used[-1]])) if len(used) else (0.0, 0.0)
        self.writer.add_histogram_raw(tag, min=lo, max=hi, num=float(counts.sum()), sum=float((counts * values).sum()),
                                      sum_squares=float((counts * values ** 2).sum()),
                                      bucket_limits=(values + 0.5).tolist(), bucket_counts=counts.tolist(),
                                      global_step=step)

    def selection_biases(self, step: int, biases: dict) -> None:
        """Aux-loss-free balancing: each layer's per-expert selection bias (label -> list), as a histogram, the
        largest magnitude and (up to 16 experts) one curve per expert; and in metrics.jsonl."""
        if not biases:
            return
        if self.writer:
            for label, b in biases.items():
                self.writer.add_histogram(f"train_moe/{label}/selection_bias", torch.tensor(b), step)
                values = {f"train_moe/{label}/selection_bias_max_abs": max(abs(v) for v in b)}
                if len(b) <= 16:
                    values.update({f"train_moe_bias/{label}/expert{e:02d}": v for e, v in enumerate(b)})
                self.scalars(step, values)
        self.record({"kind": "moe_bias", "step": step, **biases})

    def moe_heatmap(self, step: int, summaries: dict) -> None:
        """A figure of expert load: one row per MoE call (block), one column per expert, the colour and (for up to
        24 x 24 cells) the number each expert's share x E, so 1 = a uniform share, 0 = never chosen, 2 = twice its
        share; labelled axes and a colour bar. Routers with different expert counts (MoEUT: FFN experts and
        SwitchHead's heads x experts) get one figure per count, tagged .../E<count>."""
        if not self.writer or not summaries:
            return
        by_size: dict = {}
        for label, s in summaries.items():
            by_size.setdefault(len(s.load), []).append((label, s.load))
        for E, rows in by_size.items():
            tag = "moe/expert_load_blocks_x_experts" + ("" if len(by_size) == 1 else f"/E{E}")
            self.writer.add_figure(tag, load_figure(rows, step), step)

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
        sys.stdout.flush()


def mean_of_shares(shares: list) -> float:
    """The mean of an integer quantity given the share of items at each value."""
    return sum(n * share for n, share in enumerate(shares))


def summary_record(s) -> dict:
    """A wider.moe.stats.Summary for metrics.jsonl: the experts-per-token distribution as its mean and the share of
    tokens no expert took (the full histogram is in TensorBoard; fine-grained layers have hundreds of values)."""
    rec = dataclasses.asdict(s)
    shares = rec.pop("experts_per_token")
    if shares:
        rec["unrouted"], rec["experts_per_token"] = shares[0], mean_of_shares(shares)
    return rec


def load_figure(rows: list, step: int):
    """matplotlib figure of [(label, shares)] (shares summing to 1): share x E per cell on a diverging scale centred
    on 1 (white), blue under-used, red over-used, clipped at 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _ in rows]
    load = np.array([shares for _, shares in rows], dtype=np.float64) * len(rows[0][1])
    n_rows, n_cols = load.shape
    fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 0.45 * n_cols), min(10.0, 1.8 + 0.4 * n_rows)), dpi=80)
    image = ax.imshow(load, cmap="RdBu_r", vmin=0.0, vmax=2.0, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE call")
    ax.set_yticks(range(n_rows), labels, fontsize=8)
    step_x = max(1, n_cols // 16)
    ax.set_xticks(range(0, n_cols, step_x))
    ax.set_title(f"expert load x E at step {step} (1 = uniform)")
    if n_rows * n_cols <= 24 * 24:
        for r in range(n_rows):
            for c in range(n_cols):
                ax.text(c, r, f"{load[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(load[r, c] - 1.0) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="share x E")
    fig.tight_layout()
    return fig
