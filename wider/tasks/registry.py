"""The task of a run config (DESIGN 5.8): model.task -> its wider.tasks.base.Task."""

from __future__ import annotations

from wider.tasks.base import Task
from wider.tasks.causal_lm import CausalLM
from wider.tasks.classification import Classification
from wider.tasks.images import ImageClassification
from wider.tasks.masked_lm import MaskedLM

TASKS: dict[str, type] = {t.name: t for t in (CausalLM, MaskedLM, Classification, ImageClassification)}


def task_of(cfg) -> Task:
    """The Task of cfg.model.task, bound to cfg (wider.config.validate_task_fields has checked the name)."""
    return TASKS[cfg.model.task](cfg)
