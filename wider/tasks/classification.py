"""Sequence and sentence-pair classification (DESIGN 5.8): fine-tuning a text encoder on GLUE's own files or JSONL.

Files. data.train_data and data.valid_data (GLUE: train.tsv and dev.tsv / dev_matched.tsv):
- .tsv (or .txt): tab-separated, read as GLUE's own processors read them (no quoting: a `"` is text); the columns are
  header names (data.tsv_header true) or 0-based numbers (CoLA's files have no header);
- .jsonl (or .json, one object per line): the columns are keys.
data.text_columns names one text column (single sentences: SST-2, CoLA) or two (pairs: MRPC, QQP, MNLI, QNLI, RTE,
WNLI); data.label_column the label, which must be one of data.labels (as written in the file; its position is the
class index). A missing column or an unknown label is an error naming the file, the line and the fix.

Samples: [CLS] A [SEP] (B [SEP]), token type 0 up to the first [SEP] and 1 after it, cut longest-first to seq_length,
padded with the tokenizer's pad id (hidden from attention). The training stream visits the examples once per epoch in
an order drawn from (train.seed, epoch) (wider.tasks.base.EpochCycle).

Metrics as GLUE reports them (scikit-learn's, from the confusion matrix summed over ranks): accuracy, F1 of the second
label (binary tasks: MRPC, QQP) and Matthews correlation (CoLA); data.metric picks the one shown first. The summary
sets them against the majority class of the held-out set.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from wider.data import DataError, Splits
from wider.files import read_jsonl
from wider.tasks.base import EpochCycle, EvalResult, Task, confusion_metrics, confusion_sums, majority_share

TSV = (".tsv", ".txt")
JSONL = (".jsonl", ".json")


@dataclass
class Examples:
    texts: list  # (text_a, text_b or None) per example
    labels: np.ndarray  # class index per example
    path: str


def read_examples(path: str, data) -> Examples:
    """The examples of one file (data: the run's DataConfig). Raises DataError naming the file, line and fix."""
    if not os.path.isfile(path):
        raise DataError(f"classification file {path!r} does not exist; give --train-data / --valid-data (GLUE: "
                        "train.tsv, dev.tsv; the embedded task: python data_prep/prepare_embedded.py --task "
                        "classification)")
    labels = {str(v): i for i, v in enumerate(data.labels)}
    if path.endswith(JSONL):
        rows, names = _jsonl_rows(path), None
    elif path.endswith(TSV):
        rows, names = _tsv_rows(path, data.tsv_header)
    else:
        raise DataError(f"classification file {path!r}: the name must end in .tsv (GLUE's layout) or .jsonl")
    columns = [*data.text_columns, data.label_column]
    where = _column_positions(path, columns, names) if names is not None or not path.endswith(JSONL) else None
    texts, out = [], []
    for line, row in rows:
        if where is None:  # JSONL: keys
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"{path} line {line}: no {', '.join(repr(c) for c in missing)} key (it has "
                                f"{sorted(row)}); set --text-columns / --label-column to keys of the file")
            values = [row[c] for c in columns]
        else:
            if len(row) <= max(where):
                raise DataError(f"{path} line {line}: {len(row)} tab-separated columns, but column "
                                f"{max(where)} is needed for {columns}; the line is malformed or the columns are wrong")
            values = [row[i] for i in where]
        label = str(values[-1]).strip()
        if label not in labels:
            raise DataError(f"{path} line {line}: label {label!r} is not in data.labels {list(labels)}; add it to "
                            "--labels (in class-index order) or fix the file")
        texts.append((str(values[0]), str(values[1]) if len(values) == 3 else None))
        out.append(labels[label])
    if not texts:
        raise DataError(f"classification file {path!r} holds no example")
    return Examples(texts=texts, labels=np.asarray(out, dtype=np.int64), path=path)


def _tsv_rows(path: str, header: bool):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if r]
    if header:
        if not numbered:
            raise DataError(f"classification file {path!r} is empty")
        return numbered[1:], numbered[0][1]
    return numbered, None


def _jsonl_rows(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return list(read_jsonl(f, path, DataError))


def _column_positions(path: str, columns: list, names: Optional[list]) -> list:
    if names is None:
        try:
            return [int(c) for c in columns]
        except ValueError:
            raise DataError(f"{path}: without a header (data.tsv_header false) the columns {columns} must be 0-based "
                            "numbers, e.g. --text-columns 3 --label-column 1 for CoLA") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} in its header {names}; set "
                        "--text-columns / --label-column to its names (or --no-tsv-header and 0-based numbers)")
    return [names.index(c) for c in columns]


def encode(tokenizer, ids: dict, examples: Examples, seq_length: int) -> list:
    """Token ids of [CLS] A [SEP] (B [SEP]) per example, cut longest-first to seq_length, and the length of the A
    part (its [CLS] and [SEP] included)."""
    out = []
    for a_text, b_text in examples.texts:
        a = tokenizer.tokenize(a_text)
        b = tokenizer.tokenize(b_text) if b_text is not None else None
        room = seq_length - (3 if b is not None else 2)
        while len(a) + (len(b) if b is not None else 0) > room:  # BERT's longest-first truncation
            if b is not None and len(b) > len(a):
                b.pop()
            else:
                a.pop()
        tokens = [ids["cls"], *a, ids["sep"]]
        first = len(tokens)
        if b is not None:
            tokens += [*b, ids["sep"]]
        out.append((np.asarray(tokens, dtype=np.int64), first))
    return out


class ClassificationSamples:
    """Sample i: the tensors of example cycle(i) (training) or i (held-out): tokens, types, padding_mask, label."""

    def __init__(self, encoded: list, labels: np.ndarray, length: int, seq_length: int, pad: int,
                 cycle: Optional[EpochCycle] = None):
        self.encoded, self.labels, self.length, self.seq, self.pad, self.cycle = (encoded, labels, length, seq_length,
                                                                                  pad, cycle)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        j = self.cycle(i) if self.cycle is not None else i
        tokens, first = self.encoded[j]
        n = len(tokens)
        out = np.full(self.seq, self.pad, dtype=np.int64)
        out[:n] = tokens
        types = np.zeros(self.seq, dtype=np.int64)
        types[first:n] = 1
        padding = np.zeros(self.seq, dtype=np.int64)
        padding[:n] = 1
        return {"tokens": torch.from_numpy(out), "types": torch.from_numpy(types),
                "padding_mask": torch.from_numpy(padding), "label": torch.tensor(int(self.labels[j]))}


def special_ids(tokenizer) -> dict:
    from wider.tasks.masked_lm import MaskingTokenizer

    t = MaskingTokenizer(tokenizer)  # the same [CLS] / [SEP] / padding the encoder was pretrained with
    return {"cls": t.cls, "sep": t.sep, "pad": t.pad}


class Classification(Task):
    name = "classification"

    def check_inputs(self, tokenizer) -> None:
        special_ids(tokenizer)
        d = self.cfg.data
        for path in (d.train_data, d.valid_data):
            read_examples(d.locate(path), d)

    def build_data(self, tokenizer, train_samples: int, valid_samples: int, cache_dir: str) -> Splits:
        cfg = self.cfg
        d, m = cfg.data, cfg.model
        ids = special_ids(tokenizer)
        train, valid = read_examples(d.locate(d.train_data), d), read_examples(d.locate(d.valid_data), d)
        self.valid_labels = valid.labels
        cycle = EpochCycle(len(train.texts), cfg.train.seed)
        return Splits(
            train=ClassificationSamples(encode(tokenizer, ids, train, m.seq_length), train.labels, train_samples,
                                        m.seq_length, ids["pad"], cycle),
            valid=ClassificationSamples(encode(tokenizer, ids, valid, m.seq_length), valid.labels, len(valid.texts),
                                        m.seq_length, ids["pad"]),
            valid_epoch_samples=len(valid.texts))

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        logits_BC = engine(batch["tokens"], batch["types"], batch["padding_mask"]).float()
        loss = F.cross_entropy(logits_BC, batch["label"], label_smoothing=self.cfg.data.label_smoothing)
        return loss, {"accuracy": (logits_BC.argmax(-1) == batch["label"]).float().mean().detach()}

    def eval_sums(self, engine, batch: dict) -> torch.Tensor:
        logits_BC = engine(batch["tokens"], batch["types"], batch["padding_mask"]).float()
        return confusion_sums(logits_BC, batch["label"], F.cross_entropy(logits_BC, batch["label"], reduction="sum"))

    @property
    def eval_width(self) -> int:
        return 2 + self.cfg.model.num_labels ** 2

    def eval_result(self, sums: torch.Tensor) -> EvalResult:
        C = self.cfg.model.num_labels
        s = sums.cpu().numpy()
        metrics = confusion_metrics(s[2:].reshape(C, C), binary_f1=C == 2)
        first = self.cfg.data.metric
        ordered = {first: metrics[first], **{k: v for k, v in metrics.items() if k != first}}
        return EvalResult(loss=float(s[0] / max(s[1], 1.0)), count=int(s[1]), metrics=ordered)

    def summary(self, result: EvalResult) -> tuple[dict, list]:
        C, metric = self.cfg.model.num_labels, self.cfg.data.metric
        majority = majority_share(self.valid_labels, C)
        fields = {**result.metrics, "majority_class_accuracy": majority, "metric": metric}
        return fields, [f"held-out {metric} {result.metrics[metric]:.4f}, accuracy {result.metrics['accuracy']:.4f} on "
                        f"{result.count:,} examples (the majority class scores accuracy {majority:.4f})"]
