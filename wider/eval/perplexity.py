"""Perplexity of a model on raw text / JSONL, on an indexed dataset, or on the run's own validation split.

Token streams (wider/eval/scoring.py has the window convention):
- raw text / JSONL (`.txt`, `.jsonl`, `.jsonl.gz`, `.jsonl.xz`, parquet; read by data_prep/documents.py, the
  reader data_prep/preprocess_data.py uses): each document is tokenized with the run's tokenizer and followed
  by EOD, exactly as preprocess_data.py writes it (documents that tokenize to nothing are skipped, as there);
  the stream is EOD + the documents in file order. Bits per byte = the summed loss of the scored tokens (the
  EODs included: where a document ends is part of the text) / ln 2 / the UTF-8 bytes of those documents.
- an indexed dataset (PREFIX.bin / .idx from preprocess_data.py): its documents in index order, EOD-terminated
  as stored, after one leading EOD.
- the run's validation split: the very samples wider/training/loop.py's final evaluation scores (megatron-core
  GPTDataset samples built by wider.data.build_datasets with the run's sizes and seed), grouped into the same
  micro-batches per data-parallel rank, so that the run's final validation loss is reproduced (exactly for a
  dense model; for MoE with capacity, the same micro-batches see the same drops).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from wider.data import (DataError, SentencePieceTokenizer, build_datasets, check_indexed_dataset, eval_micro_batches,
                         final_eval_samples, stack_samples, unpack)
from wider.eval.scoring import EvalError, Scorer, perplexity


@dataclass
class PerplexityResult:
    loss: float  # mean per-token loss (nats)
    tokens: int  # scored tokens
    documents: Optional[int] = None
    bytes: Optional[int] = None  # UTF-8 bytes of the scored documents (raw text only)

    @property
    def ppl(self) -> float:
        return perplexity(self.loss * self.tokens, self.tokens)

    @property
    def bits_per_byte(self) -> Optional[float]:
        if not self.bytes:
            return None
        return self.loss * self.tokens / np.log(2.0) / self.bytes

    def to_dict(self) -> dict:
        out = {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens}
        if self.documents is not None:
            out["documents"] = self.documents
        if self.bytes is not None:
            out["bytes"] = self.bytes
            out["bits_per_byte"] = self.bits_per_byte
        return out


class _LeadingEOD:
    """A token stream: one EOD, then `body` (an integer array, e.g. an indexed dataset's memory map)."""

    def __init__(self, eod: int, body):
        self.eod, self.body = eod, body

    def __len__(self) -> int:
        return len(self.body) + 1

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = sl.start, sl.stop
        if a > 0:
            return np.asarray(self.body[a - 1:b - 1], dtype=np.int64)
        return np.concatenate([[self.eod], np.asarray(self.body[:b - 1], dtype=np.int64)])


def text_stream(paths: list[str], tokenizer: SentencePieceTokenizer, json_key: str = "text",
                text_mode: str = "file", limit: Optional[int] = None) -> tuple[_LeadingEOD, int, int]:
    """(stream, documents, UTF-8 bytes) of text / JSONL / parquet files, tokenized as preprocess_data.py does."""
    from array import array

    from data_prep import documents
    ids = array("q")  # 8 bytes a token (a list of Python ints would take about 36)
    n_docs = n_bytes = 0
    try:
        for doc in documents.iter_documents(paths, json_key, text_mode):
            if limit is not None and n_docs >= limit:
                break
            toks = tokenizer.tokenize(doc)
            if not toks:
                continue
            ids.extend(toks)
            ids.append(tokenizer.eod)
            n_docs += 1
            n_bytes += len(doc.encode("utf-8"))
    except documents.DataPrepError as e:
        raise EvalError(str(e)) from None
    if not n_docs:
        raise EvalError(f"no non-empty document in {paths}; check the files and --json-key / --text-mode")
    return _LeadingEOD(tokenizer.eod, np.frombuffer(ids, dtype=np.int64)), n_docs, n_bytes


def indexed_stream(prefix: str, tokenizer: SentencePieceTokenizer,
                   limit: Optional[int] = None) -> tuple[_LeadingEOD, int]:
    """(stream, documents) of an indexed dataset (checked against the tokenizer first)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_indexed_dataset(prefix, tokenizer)
    ds = IndexedDataset(prefix, mmap=True)
    lengths = ds.index.sequence_lengths
    n_docs = len(lengths) if limit is None else min(limit, len(lengths))
    n_tokens = int(np.asarray(lengths[:n_docs], dtype=np.int64).sum())
    body = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r", shape=(n_tokens,))
    return _LeadingEOD(tokenizer.eod, body), n_docs


def score_text(scorer: Scorer, paths: list[str], json_key: str = "text", text_mode: str = "file",
               limit: Optional[int] = None, stride: Optional[int] = None) -> PerplexityResult:
    stream, n_docs, n_bytes = text_stream(paths, scorer.tokenizer, json_key, text_mode, limit)
    (nll, tokens), = scorer.stream_nll([stream], stride, desc="perplexity " + os.path.basename(paths[0]))
    return PerplexityResult(loss=nll / max(tokens, 1), tokens=tokens, documents=n_docs, bytes=n_bytes)


def score_indexed(scorer: Scorer, prefix: str, limit: Optional[int] = None,
                  stride: Optional[int] = None) -> PerplexityResult:
    stream, n_docs = indexed_stream(prefix, scorer.tokenizer, limit)
    (nll, tokens), = scorer.stream_nll([stream], stride, desc="perplexity " + os.path.basename(prefix))
    return PerplexityResult(loss=nll / max(tokens, 1), tokens=tokens, documents=n_docs)


def run_data_parallel(source: str) -> Optional[int]:
    """The data-parallel size the weights were trained with (a checkpoint's layout, or the trained_layout a
    release records), None when unknown."""
    from wider.checkpoint import inspect
    from wider.checkpoint.paths import is_checkpoint_dir, is_release_dir
    from wider.checkpoint.release import read_release

    if is_release_dir(source):
        dp = read_release(source)["meta"].get("trained_layout", {}).get("dp")
        return int(dp) if dp else None
    if is_checkpoint_dir(source):
        return inspect(source).dp
    return None


def score_validation(scorer: Scorer, index_cache: str, data_parallel: int = 1,
                     limit: Optional[int] = None) -> PerplexityResult:
    """The run's final validation loss, recomputed: the same GPTDataset samples (wider.data.build_datasets with
    the sizes wider/training/loop.py asks for), split over `data_parallel` ranks and micro-batches of
    scorer.batch_size exactly as loop.evaluate() splits them, losses summed in float64."""
    cfg = scorer.cfg
    t = cfg.train
    if data_parallel < 1:
        raise EvalError(f"--data-parallel {data_parallel} must be a positive integer")
    prefixes = cfg.data.data_path
    try:
        splits = build_datasets(cfg, scorer.tokenizer, t.train_iters * t.global_batch_size,
                                t.eval_iters * t.global_batch_size, index_cache)
    except DataError as e:
        raise DataError(f"{e} (the run's validation split comes from data.data_path {prefixes} in its config, resolved "
                        f"from here and from where the run was launched, {cfg.data.base_dir}: put the dataset back, or "
                        "evaluate another dataset with --data-path / --text)") from None
    n = final_eval_samples(cfg, splits)
    ids = range(n if limit is None else min(n, limit))
    groups = [g for r in range(data_parallel) for g in eval_micro_batches(ids, data_parallel, r, scorer.batch_size)]
    total = np.zeros(2, dtype=np.float64)
    with scorer.progress_bar(len(groups), "validation split") as bar:
        for group in groups:
            tokens, pos, mask, labels, loss_mask = unpack(stack_samples(splits.valid, group, scorer.device))
            per_tok = _forward_sample(scorer, tokens, pos, mask, labels)
            lm = loss_mask.float()
            total[0] += float((per_tok.float() * lm).sum().double())
            total[1] += float(lm.sum().double())
            bar.update()
    return PerplexityResult(loss=float(total[0] / max(total[1], 1.0)), tokens=int(total[1]))


def _forward_sample(scorer: Scorer, tokens, pos, mask, labels) -> torch.Tensor:
    """Per-token loss of GPTDataset samples with their own position ids and mask (as the training loop)."""
    from wider.moe import stats as moe_stats

    moe_stats.clear(scorer.model)
    with torch.no_grad():
        out = scorer.model(tokens, pos, mask, labels=labels)
    moe_stats.clear(scorer.model)
    return out
