"""Scaling laws for fine-grained MoE (DESIGN 5.5): which granularity, size and token count to train for a budget.

One command line, `python -m wider.scaling {fit,optimal,plot,sweep}`:

    python -m wider.scaling sweep --grid preset=fine_smoke G=2,4 iters=10 --out runs/smoke   # train, collect CSV
    python -m wider.scaling fit runs/smoke/runs.csv --bootstrap 200 --json > law.json        # fit the law
    python -m wider.scaling optimal --flops 1e20 --coeffs law.json                          # N, D, G for a budget
    python -m wider.scaling optimal --table                                                 # vs the paper's Table 2
    python -m wider.scaling plot runs/smoke/runs.csv                                        # PNGs beside the CSV

Modules: law (the law, the paper's coefficients, the fitter, the compute-optimal allocation), sweep (grid runs
through the recipes' command line, and the runs CSV), plot. The toolkit launches training only through the
recipes and reads their run directories; it never imports the training loop.
"""
