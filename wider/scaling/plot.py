"""PNG figures of a runs CSV against a law (matplotlib, Agg backend: no display needed).

    python -m wider.scaling plot runs/sweep/runs.csv                 # fits the CSV first
    python -m wider.scaling plot runs/sweep/runs.csv --coeffs paper

Written next to the CSV, named after it:
- STEM_loss_vs_flops.png: each run's loss against its training FLOPs, one colour per G, and per G the law's
  compute-optimal frontier (the lowest loss the law predicts for that FLOP budget at that G). Runs lie on or
  above their frontier; the distance is how far each run is from compute-optimal.
- STEM_optimum.png: the law's compute-optimal N, N_active, D and G as the budget grows (paper's shape rule).
- STEM_fit.png: predicted against observed loss, the law's residuals at a glance.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from wider.scaling.law import (PAPER_GRANULARITIES, Law, best_for_granularity, d_model_for_params,
                               flops_per_token, optimal)
from wider.scaling.sweep import Runs


def run_flops(runs: Runs) -> np.ndarray:
    """The CSV's flops column; where blank, the paper's FLOPs for N, D, G, E under its shape rule
    (d_model = 64 n_blocks) and E = 64 where E is blank too."""
    E = np.where(np.isnan(runs.E), 64.0, runs.E)
    derived = np.array([flops_per_token(d_model_for_params(n, e), e, g, routing=e > 1) * d
                        for n, d, g, e in zip(runs.N, runs.D, runs.G, E)])
    return np.where(np.isnan(runs.flops), derived, runs.flops)


def plot_all(runs: Runs, law: Law, csv_path: str, law_label: str,
             granularities: Sequence[float] = PAPER_GRANULARITIES, expansion: Optional[float] = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = os.path.splitext(os.path.abspath(csv_path))[0]
    flops = run_flops(runs)
    E = expansion or (float(np.nanmedian(runs.E)) if np.any(~np.isnan(runs.E)) else 64.0)
    paths = []

    # 1. loss vs FLOPs per G, with the law's per-G frontier.
    fig, ax = plt.subplots(figsize=(7, 5))
    Gs = sorted(set(runs.G.tolist()))
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(Gs), 1)))
    budgets = np.logspace(math.log10(flops.min() / 2), math.log10(flops.max() * 2), 40)
    for G, col in zip(Gs, colours):
        sel = runs.G == G
        ax.scatter(flops[sel], runs.loss[sel], color=col, label=f"G {G:g} runs", zorder=3)
        frontier = [best_for_granularity(law, F, G, E).loss for F in budgets]
        ax.plot(budgets, frontier, color=col, lw=1.2, label=f"G {G:g} law optimum")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (paper's count, eq. 10)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"loss vs compute, {law_label}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, f"{stem}_loss_vs_flops.png"))

    # 2. The optimum as the budget grows: from the smallest run to 10^6 times the largest.
    wide = np.logspace(math.log10(flops.min()), math.log10(flops.max()) + 6, 30)
    best = [optimal(law, F, E, granularities).best for F in wide]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    top.plot(wide, [p.N for p in best], label="N (total non-embedding)")
    top.plot(wide, [p.N_active for p in best], label="N_active")
    top.plot(wide, [p.D for p in best], label="D (tokens)")
    top.set_yscale("log")
    top.set_xscale("log")
    top.set_ylabel("count")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    top.set_title(f"compute-optimal allocation, E {E:g}, {law_label}")
    bottom.step(wide, [p.granularity for p in best], where="mid")
    bottom.set_yscale("log", base=2)
    bottom.set_ylabel("optimal G")
    bottom.set_xlabel("training FLOPs")
    bottom.grid(alpha=0.3, which="both")
    paths.append(_save(fig, f"{stem}_optimum.png"))

    # 3. Predicted vs observed.
    pred = law.loss(runs.N, runs.D, runs.G)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(runs.loss, pred, c=np.log2(runs.G), cmap="viridis")
    lo, hi = float(min(runs.loss.min(), pred.min())), float(max(runs.loss.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    rmse = float(np.sqrt(np.mean((pred - runs.loss) ** 2)))
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"{law_label}: RMSE {rmse:.4f}")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, f"{stem}_fit.png"))
    return paths


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
