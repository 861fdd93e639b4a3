"""Evaluation of wider checkpoints (recipes/evaluate.py; lm-evaluation-harness through wider.eval.harness).

- scoring.py     the engine: batched forward passes, per-token losses over windows, log-likelihoods of
                 continuations (with the conventions every evaluation here shares)
- session.py     a checkpoint opened for evaluation (load, scorer, description), shared by run.py and harness.py
- perplexity.py  raw text / JSONL, indexed datasets, and the run's own validation split
- tasks.py       zero-shot tasks from local files (LAMBADA, BLiMP, PIQA, HellaSwag, ARC-Easy, CBT), run as
                 lm-evaluation-harness tasks (task_defs.py: the harness's own definitions over our files)
- run.py         what recipes/evaluate.py does: load, score, print, write JSON and TensorBoard scalars
- harness.py     the lm-evaluation-harness model `wider` (WiderLM) and `python -m wider.eval.harness`
- lm_eval_hook.py  the .pth import hook that makes the plain `lm_eval --model wider` work wherever wider is installed

Importing this package imports nothing heavy (the lm_eval hook relies on that).
"""
