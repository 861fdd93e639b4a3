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
                   mfu: Optional[float], extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - (self.start_step or 0)
        elapsed = time.time() - self.t_start
        eta = elapsed / max(done, 1) * (self.total - step)
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        mfu_s = f"{mfu:.3f}" if mfu is not None else "-"
        print(f"step {step:>6}/{self.total} | loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.1f} | lr {lr:.2e} | "
              f"gnorm {gn} | {fmt_count(tokens_per_s)} tok/s | mfu {mfu_s} | mem {peak_memory_gb():.2f}G | "
              f"eta {fmt_time(eta)}{extra}", flush=True)

    def eval_line(self, step: int, name: str, loss: float, tokens: int) -> None:
        if self.enabled:
            print(f"eval  {step:>6}/{self.total} | {name} loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f} | "
                  f"{fmt_count(tokens)} tokens", flush=True)

    def moe_scalars(self, step: int, split: str, summaries: dict) -> None:
        """Per MoE call (block): dropped fraction, router entropy, balance and z-loss, and each expert's share
        of the routed assignments (per expert only up to 16 experts; min / max share beyond)."""
        if not self.writer:
            return
        for label, s in summaries.items():
            E = len(s.load)
            values = {f"moe_{split}/{label}/dropped": s.dropped, f"moe_{split}/{label}/router_entropy": s.entropy,
                      f"moe_{split}/{label}/balance_loss": s.balance, f"moe_{split}/{label}/z_loss": s.z,
                      f"moe_{split}/{label}/load_max_x_E": max(s.load) * E,
                      f"moe_{split}/{label}/load_min_x_E": min(s.load) * E}
            if s.sequence_entropy:  # sigmoid routers (MoEUT): what the entropy regulariser raises
                values[f"moe_{split}/{label}/sequence_entropy"] = s.sequence_entropy
            if E <= 16:
                values.update({f"moe_{split}_load/{label}/expert{e:02d}": v for e, v in enumerate(s.load)})
            self.scalars(step, values)
        self.record({"kind": f"moe_{split}", "step": step,
                     **{label: dataclasses.asdict(s) for label, s in summaries.items()}})

    def moe_heatmap(self, step: int, summaries: dict) -> None:
        """Image of expert load, one row per MoE call (block), one column per expert. Colour: load x E, i.e.
        1 (white) = uniform share; blue = under-used (0 = never chosen); red = over-used (>= 2x its share).
        Routers with different expert counts (MoEUT: FFN experts and SwitchHead's heads x experts) get one
        image per count, tagged .../E<count>."""
        if not self.writer or not summaries:
            return
        by_size: dict = {}
        for s in summaries.values():
            by_size.setdefault(len(s.load), []).append(s.load)
        for E, rows in by_size.items():
            tag = "moe/expert_load_blocks_x_experts" + ("" if len(by_size) == 1 else f"/E{E}")
            self._heatmap(step, tag, rows)

    def _heatmap(self, step: int, tag: str, rows: list) -> None:
        import numpy as np

        load = np.array(rows, dtype=np.float64) * len(rows[0])
        cell = max(4, min(64, 512 // max(load.shape)))  # about 256-512 px on the long side
        x = np.clip(load, 0.0, 2.0) - 1.0  # [-1, 1]
        white = np.ones(x.shape + (3,))
        blue, red = np.array([0.13, 0.4, 0.85]), np.array([0.85, 0.15, 0.1])
        rgb = np.where((x < 0)[..., None], white + (-x)[..., None] * (blue - 1), white + x[..., None] * (red - 1))
        img = np.kron(rgb.transpose(2, 0, 1), np.ones((1, cell, cell)))  # [3, blocks*cell, experts*cell]
        self.writer.add_image(tag, img.astype(np.float32), step)

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
