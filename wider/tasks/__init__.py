"""Tasks (DESIGN 5.8): what a run learns, each owning its data, its loss and its metrics.

    causal_lm             next-token prediction on indexed datasets; validation loss and perplexity
    masked_lm             ALBERT-style masked-LM + sentence-order prediction (megatron-core's BERT dataset)
    classification        sequence / sentence-pair classification from GLUE TSV or JSONL; accuracy, F1, MCC
    image_classification  ViT on an image folder with the field's augmentations (kornia); top-1 / top-5

The training loop (wider.training.loop) calls a task through wider.tasks.base.Task and never branches on which task
it is; the model a task trains comes from the architecture registry (wider.models: the task's embeddings and heads
around the architecture's blocks). `wider.tasks.registry.task_of(cfg)` gives the task of a config.

This module stays light (standard library only): ./run.sh reads the recipe of a preset from it.
"""

from __future__ import annotations

# Entry scripts of the tasks other than causal_lm (the causal LM of an arch is trained by that arch's own recipe,
# wider.models.ARCHITECTURES[arch].recipe), and the preset each trains without --preset.
RECIPES = {"masked_lm": "recipes/pretrain_mlm.py", "classification": "recipes/finetune.py",
           "image_classification": "recipes/train_vit.py"}
DEFAULT_PRESETS = {"masked_lm": "widenet_mlm_smoke", "classification": "widenet_finetune_smoke",
                   "image_classification": "widenet_vit_smoke"}


def recipe_for(arch: str, task: str) -> str:
    """The entry script that trains `task` (for causal_lm: the architecture's own, recipes/pretrain_<arch>.py)."""
    return RECIPES.get(task, f"recipes/pretrain_{arch}.py")
