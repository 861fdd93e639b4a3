"""Training data: SentencePiece tokenizer, megatron-core GPT datasets, and a resumable batch order.

Datasets are megatron-core's own: BlendedMegatronDatasetBuilder + GPTDataset over indexed datasets made by
data_prep/preprocess_data.py (several weighted prefixes, train/valid/test split, sample indices cached on
disk). The batch order is a pure function of the step: global batch `step` is samples
[step * G, (step + 1) * G) of the train split, and data-parallel rank r reads micro-batch m as samples
step * G + m * (B * dp) + r * B + [0, B). A checkpoint only needs the step to resume exactly, and a run on
one rank that accumulates gradients sees the same samples per step as a run on several ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from wider.config import ConfigError, ModelConfig, RunConfig, parse_blend, parse_split
from wider.files import sha256_file

# What `python -m wider.info` assumes when neither model.vocab_size nor the tokenizer file is there (it says so).
PLANNING_VOCAB = 8000


class DataError(RuntimeError):
    """Missing, damaged or mismatched data files. The message names the file and the fix."""


def model_vocab_size(m: ModelConfig, tokenizer_vocab: Optional[int]) -> int:
    """The vocabulary a run's model is built with (before megatron pads it): model.vocab_size when set, which must
    hold every piece of the tokenizer, else the tokenizer's. tokenizer_vocab None: not known (only allowed with
    model.vocab_size set)."""
    if m.vocab_size is not None:
        if tokenizer_vocab is not None and m.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size {m.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} "
                              "pieces; drop --vocab-size or use the matching tokenizer")
        return m.vocab_size
    if tokenizer_vocab is None:
        raise ConfigError("model.vocab_size is not set and the tokenizer is unknown; give --tokenizer or --vocab-size")
    return tokenizer_vocab


def planning_vocab_size(cfg: RunConfig) -> tuple[int, str]:
    """(vocabulary, where it came from) for counts and plans made without data: model_vocab_size with the
    tokenizer file's size when the file exists, else PLANNING_VOCAB (stated as an assumption)."""
    if cfg.model.vocab_size is not None:
        return model_vocab_size(cfg.model, None), "model.vocab_size"
    if os.path.isfile(cfg.data.tokenizer):
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=cfg.data.tokenizer).GetPieceSize()
        return model_vocab_size(cfg.model, pieces), cfg.data.tokenizer
    return PLANNING_VOCAB, f"default {PLANNING_VOCAB} (tokenizer not found)"


class SentencePieceTokenizer:
    """The attributes megatron's GPTDataset reads (eod, pad, vocab_size) around a SentencePiece model."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise DataError(f"tokenizer {path!r} does not exist; train one with "
                            "`python data_prep/train_tokenizer.py --input ... --output-prefix PREFIX` "
                            "(or run ./run.sh once for the embedded corpus)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:  # sentencepiece raises OSError / RuntimeError with little context
            raise DataError(f"tokenizer {path!r} is not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.eod = self.sp.eos_id()
        if self.eod < 0:
            raise DataError(f"tokenizer {path!r} has no end-of-sequence piece, which marks document ends; "
                            "retrain it with data_prep/train_tokenizer.py")
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.sha256 = sha256_file(path)
        # megatron hashes the dataset description (tokenizer included) to name its cached indices.
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "sha256": self.sha256}

    def tokenize(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def detokenize(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def check_indexed_dataset(prefix: str, tokenizer: SentencePieceTokenizer) -> int:
    """Fail early and clearly on a missing, truncated or foreign dataset. Returns its token count."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fix = ("build it with `python data_prep/preprocess_data.py --input ... --tokenizer "
           f"{tokenizer.path} --output-prefix {prefix}`")
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset file {prefix + ext!r} does not exist; {fix}")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:
        raise DataError(f"dataset index {prefix + '.idx'!r} is damaged or not a megatron-core index ({e}); "
                        f"{fix}") from None
    lengths = ds.index.sequence_lengths
    pointers = ds.index.sequence_pointers
    itemsize = np.dtype(ds.index.dtype).itemsize
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"dataset {prefix + '.bin'!r} has {actual} bytes but its index describes {expected}: "
                        f"the file is truncated or belongs to another index; {fix}")
    meta_path = prefix + ".json"
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        sha = meta.get("tokenizer_sha256")
        if sha and sha != tokenizer.sha256:
            raise DataError(f"dataset {prefix!r} was tokenized with {meta.get('tokenizer', 'another tokenizer')} "
                            f"(sha256 {sha[:12]}...), not with {tokenizer.path} ({tokenizer.sha256[:12]}...); "
                            f"use the matching --tokenizer or re-tokenize: {fix}")
    # A cheap guard that also covers datasets without metadata: the largest id among the first 4M tokens.
    n = int(lengths.sum())
    if n:
        top = int(np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r", shape=(min(n, 1 << 22),)).max())
        if top >= tokenizer.vocab_size:
            raise DataError(f"dataset {prefix!r} holds token id {top}, but tokenizer {tokenizer.path} has only "
                            f"{tokenizer.vocab_size} pieces: it was made with another tokenizer; {fix}")
    return n


def unigram_entropy(prefixes: list[str]) -> tuple[float, int]:
    """Entropy (nats) of the token unigram distribution over the given datasets, and their token count.
    The reference a language model must beat: a model that ignores context scores exactly this."""
    counts = np.zeros(0, dtype=np.int64)
    total = 0
    for prefix in prefixes:
        c = np.bincount(np.memmap(prefix + ".bin", dtype=_dtype_of(prefix), mode="r"))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
        total += int(c.sum())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()), total


def _dtype_of(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, mmap=True).index.dtype


@dataclass
class Splits:
    train: object
    valid: object
    valid_epoch_samples: int  # samples in one pass over the validation split


def build_datasets(cfg: RunConfig, tokenizer: SentencePieceTokenizer, train_samples: int,
                   valid_samples: int, cache_dir: str) -> Splits:
    """Train and validation GPTDatasets from megatron-core's builder (indices cached in cache_dir)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, m = cfg.data, cfg.model
    prefixes, weights = parse_blend(d.data_path)
    for p in prefixes:
        check_indexed_dataset(p, tokenizer)
    split = ",".join(str(x) for x in parse_split(d.split))
    os.makedirs(cache_dir, exist_ok=True)

    def make(sizes, blend=(prefixes, weights)):
        conf = GPTDatasetConfig(
            random_seed=cfg.train.seed,
            sequence_length=m.seq_length,
            blend=blend,
            split=split,
            path_to_cache=cache_dir,
            tokenizer=tokenizer,
            reset_position_ids=d.reset_position_ids,
            reset_attention_mask=d.eod_mask,
            eod_mask_loss=d.eod_mask_loss,
            create_attention_mask=d.eod_mask,
            mmap_bin_files=True,
        )
        try:
            return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, conf).build()
        except (AssertionError, ValueError, IndexError) as e:
            raise DataError(f"megatron-core could not build datasets from {d.data_path} with split "
                            f"{d.split!r} and seq_length {m.seq_length}: {e}. A split may be too small "
                            "for one sequence: use more data, a shorter --seq-length or another --split") from e

    # One epoch of the validation split tells how many distinct held-out samples there are. megatron
    # only builds a size-less (one epoch) split without weights, so a weighted blend counts per prefix.
    epoch = 0
    for blend in ([(prefixes, None)] if weights is None else [([p], None) for p in prefixes]):
        _, valid_epoch, _ = make([1, None, None], blend)
        if valid_epoch is None or len(valid_epoch) == 0:
            raise DataError(f"the validation split of {blend[0][0] if weights else d.data_path} (split "
                            f"{d.split!r}) holds no complete sequence of {m.seq_length + 1} tokens; "
                            "give it more documents")
        epoch += len(valid_epoch)
    # A weighted blend is exactly as long as asked: ask for a full epoch so the final eval can cover it.
    valid_size = max(valid_samples, 1) if weights is None else max(valid_samples, epoch)
    train, valid, _ = make([train_samples, valid_size, 0])  # 0, not None: weighted blends need a size
    return Splits(train=train, valid=valid, valid_epoch_samples=epoch)


def micro_batch(dataset, step: int, micro: int, global_batch: int, micro_batch_size: int, dp: int,
                dp_rank: int, device: torch.device) -> dict:
    """The samples of micro-batch `micro` of global batch `step` for data-parallel rank dp_rank."""
    start = step * global_batch + micro * micro_batch_size * dp + dp_rank * micro_batch_size
    samples = [dataset[start + i] for i in range(micro_batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def final_eval_samples(cfg: RunConfig, splits: Splits) -> int:
    """Validation samples the final evaluation scores: train.final_eval_iters global batches, or the whole split."""
    t = cfg.train
    n = splits.valid_epoch_samples if t.final_eval_iters is None else t.final_eval_iters * t.global_batch_size
    return min(n, len(splits.valid))


def eval_micro_batches(sample_ids, dp: int, dp_rank: int, micro_batch_size: int) -> list:
    """The sample ids data-parallel rank dp_rank scores in an evaluation, cut into its micro-batches (every dp-th
    sample from dp_rank on): the split the training loop's evaluation uses and wider.eval reproduces."""
    mine = sample_ids[dp_rank::dp]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def stack_samples(dataset, ids, device: torch.device) -> dict:
    """GPTDataset samples stacked into one batch on `device`."""
    samples = [dataset[j] for j in ids]
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}


def unpack(batch: dict) -> tuple:
    """(tokens, position_ids, attention_mask or None, labels, loss_mask) in the order the model takes."""
    return (batch["tokens"], batch["position_ids"], batch.get("attention_mask"), batch["labels"],
            batch["loss_mask"])

