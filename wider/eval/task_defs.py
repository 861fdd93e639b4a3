"""lm-evaluation-harness task definitions of the zero-shot tasks, over documents read from local files.

wider/eval/tasks.py reads each task's public file format into documents laid out as the Hugging Face dataset that
lm-evaluation-harness's own definition of the task reads (the field names and types of that dataset); this module
turns them into lm-eval Task objects whose prompts, choices, targets and metrics are lm-eval's:

- lambada, piqa, hellaswag, arc_easy, and each BLiMP paradigm: lm-eval's shipped YAML (lambada_openai.yaml,
  piqa.yaml, hellaswag.yaml with its utils.process_docs, arc_easy.yaml, blimp/_template_yaml), loaded by lm-eval's
  own YAML loader, with only the data source replaced (`shipped_config`). The task keeps its eval split's name
  (PIQA and HellaSwag evaluate "validation", BLiMP "train", LAMBADA and ARC "test") and loses its training split:
  the tasks run zero-shot.
- blimp: a group of the per-paradigm tasks whose `acc` is the accuracy over all pairs (size-weighted mean); lm-eval's
  own `blimp` group (blimp/_blimp.yaml) averages the paradigms unweighted, which `blimp_macro_group` reproduces.
- cbt_cn / cbt_ne: lm-eval 0.4.13 ships no Children's Book Test task, so `cbt_config` defines one over the layout
  of the Hugging Face `cbt` dataset (sentences, question, answer, options): each option substituted for XXXXX, the
  option plus the rest of the query sentence is the continuation scored after the 20 story sentences and the query's
  start (the GPT-2 paper's method), `acc` only.

Documents reach lm-eval through LocalTask.download, the override point lm-eval's Task API documents for data from
elsewhere. (TaskConfig.custom_dataset would do too, but lm-eval then logs, for every task, a warning about passing
kwargs through --metadata, which does not apply here.) Nothing is downloaded and nothing is written to a cache: the
datasets are in memory.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import lm_eval.tasks
from lm_eval.api.group import Group
from lm_eval.api.task import ConfigurableTask
from lm_eval.config.group import GroupConfig
# lm-eval 0.4.13 (pinned in requirements.txt) has no public function that returns a shipped task's config; this
# is the loader its TaskManager reads every task YAML with (includes and `!function` resolved the same way).
from lm_eval.tasks._yaml_loader import load_yaml

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent
# Our task name -> lm-eval's YAML that defines it.
SHIPPED = {"lambada": "lambada/lambada_openai.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
           "arc_easy": "arc/arc_easy.yaml", "blimp": "blimp/_template_yaml"}
BLIMP_GROUP = "blimp/_blimp.yaml"
QUERY_BLANK = "XXXXX"  # the CBT query's placeholder for the missing word


class LocalTask(ConfigurableTask):
    """An lm-eval ConfigurableTask whose dataset is a given dict of split name -> documents."""

    def __init__(self, config: dict, splits: dict):
        self._splits = splits  # before ConfigurableTask.__init__, which calls download()
        super().__init__(config=config)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        self.dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in self._splits.items()})


def eval_split(config: dict) -> str:
    """The split lm-eval evaluates a config on: its test split, else its validation split."""
    return config.get("test_split") or config["validation_split"]


def shipped_config(name: str, task: str, source: str) -> dict:
    """lm-eval's own config of the task, reading its documents from `source` (a local path, recorded in the
    config lm-eval reports) instead of the Hugging Face hub."""
    cfg = load_yaml(LM_EVAL_TASKS / SHIPPED[name])
    for key in ("tag", "group"):  # registry keys, not TaskConfig fields (lm-eval's TaskFactory drops them too)
        cfg.pop(key, None)
    split = eval_split(cfg)
    cfg.update(task=task, dataset_path=source, dataset_name=None, dataset_kwargs=None, training_split=None,
               validation_split=None if cfg.get("test_split") else split, num_fewshot=0)
    return cfg


def build_task(config: dict, docs: list) -> LocalTask:
    return LocalTask(config, {eval_split(config): docs})


def _blimp_group(name: str, aggregate_metric_list: list, tasks: list) -> Group:
    group = Group.from_config(GroupConfig(group=name, aggregate_metric_list=aggregate_metric_list,
                                          metadata=load_yaml(LM_EVAL_TASKS / BLIMP_GROUP).get("metadata")))
    for t in tasks:
        group.add(t)
    return group


def blimp_group(tasks: list) -> Group:
    """The per-paradigm tasks as the group `blimp`: acc over all pairs (each paradigm weighted by its size)."""
    return _blimp_group("blimp", [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}], tasks)


def blimp_macro_group(tasks: list) -> Group:
    """lm-eval's own `blimp` group (blimp/_blimp.yaml's aggregate_metric_list: the unweighted mean of the
    paradigms' acc) over the same tasks, to aggregate their results a second way (Group.aggregate)."""
    return _blimp_group("blimp_macro", load_yaml(LM_EVAL_TASKS / BLIMP_GROUP)["aggregate_metric_list"], tasks)


# --- the Children's Book Test (no lm-eval definition to reuse) ------------------------------------------------

def _query_parts(doc: dict) -> tuple[str, str]:
    before, after = doc["question"].split(QUERY_BLANK, 1)
    return before, after


def cbt_doc_to_text(doc: dict) -> str:
    """The 20 story sentences, then the query up to the blank."""
    before, _ = _query_parts(doc)
    return " ".join(list(doc["sentences"]) + ([before.rstrip()] if before.strip() else []))


def cbt_doc_to_choice(doc: dict) -> list:
    """Each option followed by the rest of the query. The separator travels with the choice (the task's
    target_delimiter is empty) because it depends on the query: CBT's tokenized text glues some blanks to the
    token before them ("``XXXXX"), and those options are scored without a space."""
    before, after = _query_parts(doc)
    sep = "" if before and not before[-1].isspace() else " "
    return [sep + option + after for option in doc["options"]]


def cbt_doc_to_target(doc: dict) -> int:
    return list(doc["options"]).index(doc["answer"])


def cbt_config(task: str, source: str) -> dict:
    return {"task": task, "dataset_path": source, "output_type": "multiple_choice", "test_split": "test",
            "doc_to_text": cbt_doc_to_text, "doc_to_choice": cbt_doc_to_choice, "doc_to_target": cbt_doc_to_target,
            "target_delimiter": "", "num_fewshot": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
