r"""Evaluate a checkpoint: perplexity (the run's validation split, an indexed dataset, raw text / JSONL) and
zero-shot tasks (LAMBADA, BLiMP, PIQA, HellaSwag, ARC-Easy, CBT) from local files. One process, CPU or GPU.

CPU (after ./run.sh, which trains runs/widenet_smoke (the default preset)):
    python recipes/evaluate.py perplexity --checkpoint runs/widenet_smoke
    python recipes/evaluate.py perplexity --checkpoint runs/widenet_smoke --text corpus/held_out.jsonl.gz --json-key text
    python recipes/evaluate.py tasks --checkpoint runs/widenet_smoke --tasks lambada,blimp,piqa --task-dir data/tasks
GPU (bf16 by default on CUDA), an indexed dataset, a given checkpoint, overlapping windows:
    python recipes/evaluate.py perplexity --checkpoint runs/gpt350m/checkpoints/step_00010000 --device cuda \
        --data-path data/my_text_document --stride 1024 --batch-size 16
    python recipes/evaluate.py tasks --checkpoint releases/gpt350m --tasks all --task-dir data/tasks --limit 500
Results: RUN_DIR/eval/<name>.json (with the checkpoint's step) and TensorBoard scalars eval/<name>/... in
RUN_DIR/tensorboard. Tasks from lm-evaluation-harness: `lm_eval --model wider --model_args checkpoint=RUN_DIR
--tasks ...` (or `python -m wider.eval.harness ...`; see wider/eval/harness.py).
Every flag: python recipes/evaluate.py perplexity --help / python recipes/evaluate.py tasks --help
"""

import sys

from wider.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
