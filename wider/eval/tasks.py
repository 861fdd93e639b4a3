"""Zero-shot tasks from local files in their public formats, run as lm-evaluation-harness tasks: the prompts,
choices, metrics, aggregations and standard errors are the harness's own. Nothing is downloaded: a missing file is
an error that names the path it was looked for at and where to get it.

This module holds the task list, the file layout under --task-dir, and one reader per public format. A reader
checks the file (errors name FILE:LINE, the problem and the expected format) and returns documents laid out as
the Hugging Face dataset that lm-eval's definition of the task reads; wider/eval/task_defs.py makes lm-eval tasks
of them (`build`), and `evaluate` runs one through lm-eval's evaluator (lm_eval.evaluator.evaluate) with an
lm-eval model; recipes/evaluate.py uses the project's `wider` model (wider.eval.harness.WiderLM).

task            public file                      lm-eval definition                 fields
lambada         OpenAI's lambada_test.jsonl      lambada_openai.yaml                text
piqa            valid.jsonl + valid-labels.lst   piqa.yaml                          goal, sol1, sol2; label (.lst)
hellaswag       hellaswag_val.jsonl              hellaswag.yaml + its process_docs  activity_label, ctx_a, ctx_b,
                                                                                    endings, label (a string)
arc_easy        AI2's ARC-Easy-Test.jsonl        arc_easy.yaml                      question.stem -> question,
                                                                                    question.choices -> choices
                                                                                    {text: [...], label: [...]},
                                                                                    answerKey
blimp           one JSONL per paradigm           blimp/_template_yaml per paradigm  sentence_good, sentence_bad
                                                 (blimp_<paradigm>), grouped
cbt_cn, cbt_ne  CBTest's text format             ours (task_defs.cbt_config)        lines 1-20 -> sentences;
                                                                                    line 21 -> question, answer,
                                                                                    options

Metrics are lm-eval's definitions; where one differs from what this module computed before it ran the harness,
the note says so, and the harness's definition is the one used.
- Multiple choice (PIQA, HellaSwag, ARC-Easy, CBT, BLiMP's pairs): `acc` = the choice with the highest
  log-likelihood is the gold one; `acc_norm` (PIQA, HellaSwag, ARC-Easy) = the same with each log-likelihood
  divided by its choice's length in characters (the choice string without the target delimiter). Unchanged.
- LAMBADA: the context is the passage up to its last space, the target " " + the word after it. lm-eval splits at
  single spaces; the earlier reader split at any whitespace and dropped trailing whitespace, which differs only on
  passages that are not in OpenAI's format. `acc` = greedy decoding reproduces every token of the target; `ppl` =
  exp(-mean over passages of log P(target | context)), lm-eval's `perplexity` aggregation (the same as before,
  reported under the name ppl).
- BLiMP: `acc` per paradigm (a task each) and over all pairs (the group `blimp`, paradigms weighted by their
  size), as before; `acc_macro` = the unweighted mean of the paradigms' acc, which is what lm-eval's own `blimp`
  group reports (equal to acc on the full BLiMP, 1000 pairs per paradigm).
- Standard errors are lm-eval's: sample standard deviation / sqrt(n) for accuracies, as before, but "N/A"
  (written as null) instead of NaN for a single example; a bootstrap (lm-eval's default 100000 resamples) for
  LAMBADA's ppl, which was not reported before; for BLiMP's overall acc, the pooled within-paradigm standard
  error lm-eval computes for a size-weighted group, which leaves out the variance between paradigms (before: the
  standard error over all pairs); for acc_macro, the standard error of an unweighted mean of the paradigms.
- The log-likelihood requests are the ones the earlier code made, in the same order (documents, then choices),
  so acc, acc_norm and ppl are unchanged (but for the LAMBADA split above); the standard errors differ as said.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from wider.eval.scoring import EvalError
from wider.files import read_jsonl


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str  # where the file (or, for BLiMP, the directory of paradigm files) lies under --task-dir
    source: str  # the public source to get it from
    read: Callable  # (path, limit) -> documents (lm-eval's field layout for the task)


# --- readers (one per public format) -----------------------------------------------------------------------

def _jsonl(path: str, limit: Optional[int]):
    """(line number, object) of a JSONL file, up to `limit` objects."""
    with open(path, encoding="utf-8") as f:
        for n, (lineno, obj) in enumerate(read_jsonl(f, path, EvalError)):
            if limit is not None and n >= limit:
                return
            yield lineno, obj


def _field(obj: dict, key: str, path: str, lineno: int, fmt: str):
    if key not in obj:
        raise EvalError(f"{path}:{lineno}: no key {key!r} (the line has {sorted(obj)}); expected {fmt}")
    return obj[key]


def _text(obj: dict, key: str, path: str, lineno: int, fmt: str) -> str:
    value = _field(obj, key, path, lineno, fmt)
    if not isinstance(value, str):
        raise EvalError(f"{path}:{lineno}: {key!r} must be a string, got {type(value).__name__}; expected {fmt}")
    return value


def read_lambada(path: str, limit: Optional[int]) -> list:
    fmt = 'OpenAI\'s lambada_test.jsonl lines {"text": ...}'
    out = []
    for lineno, obj in _jsonl(path, limit):
        text = _text(obj, "text", path, lineno, fmt)
        words = text.split(" ")
        if len(words) < 2 or not words[-1] or not " ".join(words[:-1]).strip():
            raise EvalError(f"{path}:{lineno}: the passage must be words separated by single spaces, the last one "
                            f"the target (lm-eval's lambada_openai splits at the last space); got {text[-60:]!r}")
        out.append({"text": text})
    return out


def read_blimp_file(path: str, limit: Optional[int]) -> list:
    fmt = 'BLiMP lines {"sentence_good": ..., "sentence_bad": ...}'
    return [{"sentence_good": _text(o, "sentence_good", path, n, fmt),
             "sentence_bad": _text(o, "sentence_bad", path, n, fmt)} for n, o in _jsonl(path, limit)]


def blimp_files(path: str) -> list[str]:
    """BLiMP paradigm files: a directory of *.jsonl (the repository's data/ folder) or one paradigm file."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
        if not files:
            raise EvalError(f"BLiMP directory {path!r} holds no .jsonl paradigm file; put the files of BLiMP's "
                            f"data/ folder there ({TASKS['blimp'].source})")
        return files
    return [path]


def blimp_paradigm(path: str) -> str:
    """The paradigm a BLiMP file holds: its name without .jsonl (anaphor_number_agreement.jsonl, ...)."""
    return os.path.splitext(os.path.basename(path))[0]


def piqa_labels_path(path: str) -> str:
    """PIQA ships labels beside the questions: valid.jsonl -> valid-labels.lst."""
    base = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
    return base + "-labels.lst"


def read_piqa(path: str, limit: Optional[int]) -> list:
    labels_path = piqa_labels_path(path)
    if not os.path.isfile(labels_path):
        raise EvalError(f"PIQA labels file {labels_path!r} does not exist: PIQA's answers come in a separate file "
                        f"beside {os.path.basename(path)} ({TASKS['piqa'].source})")
    with open(labels_path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    fmt = 'PIQA lines {"goal": ..., "sol1": ..., "sol2": ...}'
    out = []
    for i, (n, o) in enumerate(_jsonl(path, limit)):
        if i >= len(labels):
            raise EvalError(f"{labels_path} has {len(labels)} labels but {path} has more questions; use the "
                            "labels file that belongs to it")
        if labels[i] not in ("0", "1"):
            raise EvalError(f"{labels_path}:{i + 1}: label {labels[i]!r} is not 0 or 1")
        out.append({"goal": _text(o, "goal", path, n, fmt), "sol1": _text(o, "sol1", path, n, fmt),
                    "sol2": _text(o, "sol2", path, n, fmt), "label": int(labels[i])})
    return out


def read_hellaswag(path: str, limit: Optional[int]) -> list:
    fmt = "hellaswag_val.jsonl lines with ctx_a, ctx_b, activity_label, endings, label"
    out = []
    for n, o in _jsonl(path, limit):
        endings = _field(o, "endings", path, n, fmt)
        label = _field(o, "label", path, n, fmt + " (the test split has no labels: use hellaswag_val.jsonl)")
        if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings) \
                or not str(label).isdigit() or not int(label) < len(endings):
            raise EvalError(f"{path}:{n}: 'endings' must be a list of strings and 'label' an index into it, got "
                            f"{len(endings) if isinstance(endings, list) else endings!r} endings and {label!r}")
        # The Hugging Face dataset's label is a string; lm-eval's process_docs takes int() of it.
        out.append({"activity_label": _text(o, "activity_label", path, n, fmt),
                    "ctx_a": _text(o, "ctx_a", path, n, fmt), "ctx_b": _text(o, "ctx_b", path, n, fmt),
                    "endings": endings, "label": str(label)})
    return out


def read_arc(path: str, limit: Optional[int]) -> list:
    fmt = 'AI2 ARC lines {"question": {"stem": ..., "choices": [{"text", "label"}, ...]}, "answerKey": ...}'
    out = []
    for n, o in _jsonl(path, limit):
        q = _field(o, "question", path, n, fmt)
        if not isinstance(q, dict):
            raise EvalError(f"{path}:{n}: 'question' must be an object with stem and choices ({fmt})")
        choices = _field(q, "choices", path, n, fmt)
        try:
            texts = [str(c["text"]) for c in choices]
            labels = [str(c["label"]) for c in choices]
        except (TypeError, KeyError):
            raise EvalError(f"{path}:{n}: question.choices must be a list of {{text, label}} ({fmt})") from None
        key = str(_field(o, "answerKey", path, n, fmt))
        if key not in labels:
            raise EvalError(f"{path}:{n}: answerKey {key!r} is none of the choice labels {labels}")
        # The Hugging Face allenai/ai2_arc layout: the stem as `question`, the choices as lists of texts and labels.
        out.append({"id": str(o.get("id", "")), "question": _text(q, "stem", path, n, fmt),
                    "choices": {"text": texts, "label": labels}, "answerKey": key})
    return out


def read_cbt(path: str, limit: Optional[int]) -> list:
    """The Children's Book Test text format: lines "1 sentence" .. "20 sentence", then
    "21 query with XXXXX<TAB>answer<TAB><TAB>cand1|cand2|...", then a blank line; as the Hugging Face `cbt`
    dataset's fields (sentences, question, answer, options)."""
    from wider.eval.task_defs import QUERY_BLANK

    out: list = []
    story: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            num, _, rest = line.rstrip("\n").partition(" ")
            if not num.isdigit():
                raise EvalError(f"{path}:{lineno}: a CBT line starts with its number (1-21), got {line[:40]!r}")
            if int(num) != len(story) + 1:
                raise EvalError(f"{path}:{lineno}: line number {num} out of order (expected {len(story) + 1}); "
                                "the file is not in the Children's Book Test format")
            if int(num) < 21:
                story.append(rest.strip())
                continue
            parts = rest.split("\t")
            if len(parts) < 3:
                raise EvalError(f"{path}:{lineno}: the query line needs 'query<TAB>answer<TAB><TAB>candidates'")
            query, answer, cands = parts[0].strip(), parts[1].strip(), [c for c in parts[-1].strip().split("|") if c]
            if QUERY_BLANK not in query or answer not in cands:
                raise EvalError(f"{path}:{lineno}: the query must contain {QUERY_BLANK} and the answer {answer!r} "
                                f"must be among the candidates {cands}")
            out.append({"sentences": story, "question": query, "answer": answer, "options": cands})
            story = []
    return out


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("lambada", "lambada/lambada_test.jsonl",
             "OpenAI's LAMBADA test set lambada_test.jsonl (the GPT-2 release, "
             "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl; also the Hugging Face "
             "dataset EleutherAI/lambada_openai)", read_lambada),
    TaskSpec("blimp", "blimp", "the data/ folder of https://github.com/alexwarstadt/blimp (one JSONL per "
             "paradigm; also the Hugging Face dataset nyu-mll/blimp)", read_blimp_file),
    TaskSpec("piqa", "piqa/valid.jsonl",
             "PIQA's valid.jsonl and valid-labels.lst (aligned lines) from https://yonatanbisk.com/piqa/data/",
             read_piqa),
    TaskSpec("hellaswag", "hellaswag/hellaswag_val.jsonl",
             "data/hellaswag_val.jsonl of https://github.com/rowanz/hellaswag", read_hellaswag),
    TaskSpec("arc_easy", "arc_easy/ARC-Easy-Test.jsonl",
             "ARC-Easy/ARC-Easy-Test.jsonl of AI2's ARC-V1-Feb2018.zip (https://allenai.org/data/arc)", read_arc),
    TaskSpec("cbt_cn", "cbt/cbtest_CN_test_2500ex.txt",
             "CBTest/data/cbtest_CN_test_2500ex.txt of CBTest.tgz from the bAbI project "
             "(https://research.facebook.com/downloads/babi/)", read_cbt),
    TaskSpec("cbt_ne", "cbt/cbtest_NE_test_2500ex.txt",
             "CBTest/data/cbtest_NE_test_2500ex.txt of CBTest.tgz from the bAbI project "
             "(https://research.facebook.com/downloads/babi/)", read_cbt),
]}
ALIASES = {"cbt": ["cbt_cn", "cbt_ne"], "lambada_openai": ["lambada"], "arc-easy": ["arc_easy"], "all": list(TASKS)}


def resolve_names(spec: str) -> list[str]:
    """'lambada,blimp,cbt' -> task names (aliases expanded, order kept, duplicates dropped)."""
    names: list[str] = []
    for raw in [s.strip() for s in spec.split(",") if s.strip()]:
        for name in ALIASES.get(raw, [raw]):
            if name not in TASKS:
                raise EvalError(f"unknown task {raw!r}; available: {', '.join(sorted(TASKS) + sorted(ALIASES))}")
            if name not in names:
                names.append(name)
    if not names:
        raise EvalError("no task given; pass --tasks with a comma-separated list, e.g. --tasks lambada,piqa")
    return names


def task_path(name: str, task_dir: Optional[str], overrides: dict) -> str:
    """The file (BLiMP: directory) a task reads: --task-file NAME=PATH, else TASK_DIR/<its usual place>."""
    spec = TASKS[name]
    if name in overrides:
        path = overrides[name]
        how = f"--task-file {name}={path}"
    elif task_dir is not None:
        path = os.path.join(task_dir, spec.path)
        how = f"--task-dir {task_dir} (which expects it at TASK_DIR/{spec.path})"
    else:
        raise EvalError(f"task {name}: no file given; pass --task-dir DIR (with {spec.path} inside) or "
                        f"--task-file {name}=PATH. Get it from {spec.source}")
    if not os.path.exists(path):
        raise EvalError(f"task {name}: {path} does not exist (from {how}). Put it there, or point at it with "
                        f"--task-file {name}=PATH. Get it from {spec.source}; nothing is downloaded at run time")
    return path


# --- lm-eval tasks and their results -------------------------------------------------------------------------

@dataclass
class Built:
    """One of our tasks as lm-eval objects: `harness` is what lm-eval evaluates, a Task, or for BLiMP the Group of
    the per-paradigm Tasks that `paradigms` lists (paradigm -> Task)."""

    name: str
    harness: Any
    paradigms: dict = field(default_factory=dict)


@contextlib.contextmanager
def quiet_datasets():
    """datasets' progress bars off for a while: lm-eval maps HellaSwag's process_docs over the in-memory
    documents each time it reads them, a "Map" bar per pass and several passes per run, with nothing to wait for."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def build(name: str, path: str, limit: Optional[int] = None) -> Built:
    """Read the task's file(s), the first `limit` examples of each (BLiMP: of each paradigm), and make the lm-eval
    task (BLiMP: group) over them. File errors surface here, before any model is loaded."""
    with quiet_datasets():
        return _build(name, path, limit)


def _build(name: str, path: str, limit: Optional[int]) -> Built:
    from wider.eval import task_defs

    if name == "blimp":
        paradigms = {}
        for f in blimp_files(path):
            docs = read_blimp_file(f, limit)
            if not docs:
                raise EvalError(f"BLiMP file {f} holds no pair; it should be a paradigm file of BLiMP's data/ "
                                f"folder ({TASKS['blimp'].source})")
            p = blimp_paradigm(f)
            cfg = task_defs.shipped_config("blimp", f"blimp_{p}", os.path.abspath(f))  # lm-eval's task names
            paradigms[p] = task_defs.build_task(cfg, docs)
        return Built(name, task_defs.blimp_group(list(paradigms.values())), paradigms)
    docs = TASKS[name].read(path, limit)
    if not docs:
        raise EvalError(f"task {name}: {path} holds no example; it should be {TASKS[name].source}")
    source = os.path.abspath(path)
    cfg = task_defs.cbt_config(name, source) if name in ("cbt_cn", "cbt_ne") else \
        task_defs.shipped_config(name, name, source)
    return Built(name, task_defs.build_task(cfg, docs))


def _metrics(result: dict) -> dict:
    """Our metrics from one lm-eval result entry ({"acc,none": ..., "acc_stderr,none": ..., "sample_len": ...}):
    n, then each metric and its standard error (lm-eval's "N/A" as None), perplexity as ppl."""
    out: dict = {"n": int(result["sample_len"])}
    for key, value in result.items():
        metric, sep, filter_name = key.partition(",")
        if not sep or filter_name != "none":
            continue
        metric = "ppl" + metric[len("perplexity"):] if metric.startswith("perplexity") else metric
        out[metric] = None if value == "N/A" else float(value)
    return out


def evaluate(lm, built: Built, bootstrap_iters: int = 100000) -> dict:
    """Run the task through lm-eval's evaluator with the lm-eval model `lm`; our metrics layout (n, acc,
    acc_stderr, ...; BLiMP also acc_macro and paradigms). bootstrap_iters: lm-eval's (its default), for the
    standard errors that have no closed form (LAMBADA's ppl)."""
    from lm_eval.evaluator import evaluate as harness_evaluate
    from lm_eval.tasks import TaskManager

    from wider.eval import task_defs

    task_dict = TaskManager(include_defaults=False).load([built.harness])  # the flat tasks / groups dict evaluate reads
    with quiet_datasets():
        results = harness_evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=bootstrap_iters,
                                   log_samples=False)["results"]
    if not built.paradigms:
        return _metrics(results[built.name])
    out = _metrics(results["blimp"])
    macro = _metrics(task_defs.blimp_macro_group(list(built.paradigms.values())).aggregate(results))
    out["acc_macro"], out["acc_macro_stderr"] = macro["acc"], macro["acc_stderr"]
    out["paradigms"] = {p: _metrics(results[t.task_name]) for p, t in built.paradigms.items()}
    return out
