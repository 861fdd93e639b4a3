"""Zero-shot tasks from local files in their public formats, scored the way the papers (and
lm-evaluation-harness, whose prompts these are) score them. Nothing is downloaded: a missing file is an error
that names the path it was looked for at and where to get it.

Every task is a list of (context, continuation) log-likelihood requests for wider.eval.scoring.Scorer:
- multiple choice (PIQA, HellaSwag, ARC-Easy): the candidate with the highest log P(" " + choice | context)
  is the answer: `acc`. `acc_norm` divides each log-likelihood by the candidate's length in characters (the
  choice string without the leading space: lm-evaluation-harness 0.4's acc_norm, lm_eval/api/task.py), which
  removes the bias towards short answers; GPT-3 and lm-evaluation-harness report it for these tasks.
  Prompts are lm-evaluation-harness's: PIQA "Question: {goal}\\nAnswer:", ARC "Question: {stem}\\nAnswer:",
  HellaSwag "{activity_label}: {ctx_a} {ctx_b capitalised}" with its WikiHow bracket clean-up.
- LAMBADA (OpenAI's lambada_test.jsonl): the target is the final whitespace-separated word, the context all
  before it; `acc` = greedy decoding reproduces every token of " " + word; `ppl` = exp(-mean over examples of
  log P(word | context)) (lm-evaluation-harness's per-example perplexity aggregation).
- BLiMP: for each minimal pair, `acc` = log P(sentence_good) > log P(sentence_bad), whole sentences scored
  from the document start (empty context, as lm-evaluation-harness does); reported per paradigm (one JSONL
  per paradigm) and over all pairs.
- CBT (Children's Book Test, CN and NE): each candidate is substituted for XXXXX and the candidate plus the
  rest of the query sentence is scored given the 20 story sentences and the query's start (the GPT-2 paper's
  method); `acc` only (the scored continuations share their tail, no length normalisation).

Accuracies come with their standard error (sample standard deviation / sqrt(n), as lm-evaluation-harness).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from wider.eval.scoring import EvalError, Scorer


@dataclass
class Example:
    """One multiple-choice item: candidates are scored as context + delimiter + choice."""

    context: str
    choices: list
    gold: int
    delimiter: str = " "


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str  # where the file (or, for BLiMP, the directory of paradigm files) lies under --task-dir
    source: str  # the public source to get it from
    kind: str  # "multiple_choice" | "lambada" | "blimp"
    acc_norm: bool
    read: Callable  # (path, limit) -> list[Example] (lambada: list[(context, target)])


# --- readers (one per public format) -----------------------------------------------------------------------

def _jsonl(path: str, limit: Optional[int]):
    """(line number, object) of a JSONL file, up to `limit` objects."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: invalid JSON ({e.msg}); the file is damaged or not JSONL") from None
            if not isinstance(obj, dict):
                raise EvalError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            n += 1
            yield lineno, obj


def _field(obj: dict, key: str, path: str, lineno: int, fmt: str):
    if key not in obj:
        raise EvalError(f"{path}:{lineno}: no key {key!r} (the line has {sorted(obj)}); expected {fmt}")
    return obj[key]


def read_lambada(path: str, limit: Optional[int]) -> list:
    out = []
    for lineno, obj in _jsonl(path, limit):
        text = _field(obj, "text", path, lineno, 'OpenAI\'s lambada_test.jsonl lines {"text": ...}')
        m = re.match(r"^(.*\S)\s+(\S+)\s*$", str(text), re.S)
        if not m:
            raise EvalError(f"{path}:{lineno}: the passage has fewer than two words; nothing to predict")
        out.append((m.group(1), " " + m.group(2)))
    return out


def read_blimp_file(path: str, limit: Optional[int]) -> list:
    fmt = 'BLiMP lines {"sentence_good": ..., "sentence_bad": ...}'
    return [Example("", [str(_field(o, "sentence_good", path, n, fmt)), str(_field(o, "sentence_bad", path, n, fmt))], 0)
            for n, o in _jsonl(path, limit)]


def blimp_files(path: str) -> list[str]:
    """BLiMP paradigm files: a directory of *.jsonl (the repository's data/ folder) or one paradigm file."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
        if not files:
            raise EvalError(f"BLiMP directory {path!r} holds no .jsonl paradigm file; put the files of BLiMP's "
                            f"data/ folder there ({TASKS['blimp'].source})")
        return files
    return [path]


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
        out.append(Example(f"Question: {_field(o, 'goal', path, n, fmt)}\nAnswer:",
                           [str(_field(o, "sol1", path, n, fmt)), str(_field(o, "sol2", path, n, fmt))], int(labels[i])))
    return out


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing (lm_eval/tasks/hellaswag/utils.py): the brackets are
    artifacts of the WikiHow part of the data."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: str, limit: Optional[int]) -> list:
    fmt = "hellaswag_val.jsonl lines with ctx_a, ctx_b, activity_label, endings, label"
    out = []
    for n, o in _jsonl(path, limit):
        ctx = f"{_field(o, 'ctx_a', path, n, fmt)} {str(_field(o, 'ctx_b', path, n, fmt)).capitalize()}"
        endings = _field(o, "endings", path, n, fmt)
        label = _field(o, "label", path, n, fmt + " (the test split has no labels: use hellaswag_val.jsonl)")
        if not isinstance(endings, list) or not endings or not str(label).lstrip("-").isdigit() \
                or not 0 <= int(label) < len(endings):
            raise EvalError(f"{path}:{n}: 'endings' must be a list and 'label' an index into it, got "
                            f"{len(endings) if isinstance(endings, list) else endings!r} and {label!r}")
        out.append(Example(_hellaswag_clean(f"{_field(o, 'activity_label', path, n, fmt)}: {ctx}"),
                           [_hellaswag_clean(str(e)) for e in endings], int(label)))
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
        out.append(Example(f"Question: {_field(q, 'stem', path, n, fmt)}\nAnswer:", texts, labels.index(key)))
    return out


def read_cbt(path: str, limit: Optional[int]) -> list:
    """The Children's Book Test text format: lines "1 sentence" .. "20 sentence", then
    "21 query with XXXXX<TAB>answer<TAB><TAB>cand1|cand2|...", then a blank line."""
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
            if "XXXXX" not in query or answer not in cands:
                raise EvalError(f"{path}:{lineno}: the query must contain XXXXX and the answer {answer!r} must be "
                                f"among the candidates {cands}")
            before, after = query.split("XXXXX", 1)
            context = " ".join(story + ([before.rstrip()] if before.strip() else []))
            delimiter = "" if before and not before[-1].isspace() else " "  # "``XXXXX": no space to add
            out.append(Example(context, [c + after for c in cands], cands.index(answer), delimiter))
            story = []
    return out


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("lambada", "lambada/lambada_test.jsonl",
             "OpenAI's LAMBADA test set lambada_test.jsonl (the GPT-2 release, "
             "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl; also the Hugging Face "
             "dataset EleutherAI/lambada_openai)", "lambada", False, read_lambada),
    TaskSpec("blimp", "blimp", "the data/ folder of https://github.com/alexwarstadt/blimp (one JSONL per "
             "paradigm; also the Hugging Face dataset nyu-mll/blimp)", "blimp", False, read_blimp_file),
    TaskSpec("piqa", "piqa/valid.jsonl",
             "PIQA's valid.jsonl and valid-labels.lst (aligned lines) from https://yonatanbisk.com/piqa/data/",
             "multiple_choice", True, read_piqa),
    TaskSpec("hellaswag", "hellaswag/hellaswag_val.jsonl",
             "data/hellaswag_val.jsonl of https://github.com/rowanz/hellaswag", "multiple_choice", True,
             read_hellaswag),
    TaskSpec("arc_easy", "arc_easy/ARC-Easy-Test.jsonl",
             "ARC-Easy/ARC-Easy-Test.jsonl of AI2's ARC-V1-Feb2018.zip (https://allenai.org/data/arc)",
             "multiple_choice", True, read_arc),
    TaskSpec("cbt_cn", "cbt/cbtest_CN_test_2500ex.txt",
             "CBTest/data/cbtest_CN_test_2500ex.txt of CBTest.tgz from the bAbI project "
             "(https://research.facebook.com/downloads/babi/)", "multiple_choice", False, read_cbt),
    TaskSpec("cbt_ne", "cbt/cbtest_NE_test_2500ex.txt",
             "CBTest/data/cbtest_NE_test_2500ex.txt of CBTest.tgz from the bAbI project "
             "(https://research.facebook.com/downloads/babi/)", "multiple_choice", False, read_cbt),
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


# --- scoring -------------------------------------------------------------------------------------------------

def _mean_stderr(xs: list) -> tuple[float, float]:
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, float("nan")
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return mu, math.sqrt(var / n)


def _acc(name: str, hits: list, out: dict) -> None:
    out[name], out[name + "_stderr"] = _mean_stderr(hits)


def choice_hits(scorer: Scorer, examples: list, desc: str) -> tuple[list, list]:
    """Per example: 1.0 when the highest log-likelihood is the gold choice (acc), and the same with each
    log-likelihood divided by its choice's length in characters (acc_norm), else 0.0."""
    pairs = [(ex.context, ex.delimiter + ch) for ex in examples for ch in ex.choices]
    results = scorer.loglikelihood_text(pairs, desc)
    hits, hits_norm, k = [], [], 0
    for ex in examples:
        lls = [results[k + j][0] for j in range(len(ex.choices))]
        k += len(ex.choices)
        norm = [ll / max(len(ch), 1) for ll, ch in zip(lls, ex.choices)]
        hits.append(float(_argmax(lls) == ex.gold))
        hits_norm.append(float(_argmax(norm) == ex.gold))
    return hits, hits_norm


def _argmax(xs: list) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # the first of equal maxima, as numpy.argmax


def score_multiple_choice(scorer: Scorer, examples: list, acc_norm: bool, desc: str) -> dict:
    hits, hits_norm = choice_hits(scorer, examples, desc)
    out: dict = {"n": len(examples)}
    _acc("acc", hits, out)
    if acc_norm:
        _acc("acc_norm", hits_norm, out)
    return out


def score_lambada(scorer: Scorer, items: list, desc: str = "lambada") -> dict:
    results = scorer.loglikelihood_text(items, desc)
    out: dict = {"n": len(items)}
    _acc("acc", [float(g) for _, g, _ in results], out)
    mean_ll = sum(ll for ll, _, _ in results) / len(results)
    out["ppl"] = math.exp(min(-mean_ll, 700.0))
    return out


def evaluate_task(scorer: Scorer, name: str, path: str, limit: Optional[int] = None) -> dict:
    """Metrics of one task on the file at `path` (see task_path)."""
    spec = TASKS[name]
    if spec.kind == "blimp":
        per, hits_all = {}, []
        for f in blimp_files(path):
            examples = read_blimp_file(f, limit)
            if not examples:
                raise EvalError(f"BLiMP file {f} holds no pair")
            paradigm = os.path.splitext(os.path.basename(f))[0]
            hits, _ = choice_hits(scorer, examples, f"blimp {paradigm}")
            per[paradigm] = {"n": len(hits)}
            _acc("acc", hits, per[paradigm])
            hits_all.extend(hits)
        out: dict = {"n": len(hits_all)}
        _acc("acc", hits_all, out)
        out["acc_macro"] = sum(r["acc"] for r in per.values()) / len(per)  # mean over paradigms
        out["paradigms"] = per
        return out
    items = spec.read(path, limit)
    if not items:
        raise EvalError(f"task {name}: {path} holds no example")
    if spec.kind == "lambada":
        return score_lambada(scorer, items)
    return score_multiple_choice(scorer, items, spec.acc_norm, name)
