"""Evaluation of wider checkpoints (recipes/evaluate.py; lm-evaluation-harness through wider.eval.harness).

- scoring.py     the engine: batched forward passes, per-token losses over windows, log-likelihoods of
                 continuations (with the conventions every evaluation here shares)
- perplexity.py  raw text / JSONL, indexed datasets, and the run's own validation split
- tasks.py       zero-shot tasks from local files (LAMBADA, BLiMP, PIQA, HellaSwag, ARC-Easy, CBT)
- run.py         what recipes/evaluate.py does: load, score, print, write JSON and TensorBoard scalars
- harness.py     the lm-evaluation-harness model `wider` (WiderLM) and `python -m wider.eval.harness`
- lm_eval_hook.py  the .pth import hook that makes the plain `lm_eval --model wider` work in .venv

Importing this package imports nothing heavy (the lm_eval hook relies on that).
"""
