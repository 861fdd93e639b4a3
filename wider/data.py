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

from data_prep.train_tokenizer import tokenizer_identity
from wider.config import ConfigError, ModelConfig, RunConfig, parse_split, tokenized
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
    tokenizer file's size when the file exists, else PLANNING_VOCAB (stated as an assumption); none for a task that
    reads no text (the image task)."""
    if not tokenized(cfg.model):
        return 0, "none (the task reads no text)"
    if cfg.model.vocab_size is not None:
        return model_vocab_size(cfg.model, None), "model.vocab_size"
    if os.path.isfile(cfg.data.tokenizer_path):
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=cfg.data.tokenizer_path).GetPieceSize()
        return model_vocab_size(cfg.model, pieces), cfg.data.tokenizer_path
    return PLANNING_VOCAB, f"default {PLANNING_VOCAB} (tokenizer not found)"


class SentencePieceTokenizer:
    """The attributes megatron's GPTDataset reads (eod, pad, vocab_size) around a SentencePiece model."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise DataError(f"tokenizer {path!r} does not exist; train one with "
                            "`python data_prep/train_tokenizer.py --input ... --output-prefix PREFIX` "
                            "(for the embedded corpus: ./run.sh prepare)")
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
        self.sha256 = sha256_file(path)  # the file's bytes: what checkpoints of earlier versions recorded
        try:
            self.identity = tokenizer_identity(path)  # its content (data_prep.train_tokenizer.tokenizer_identity)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError for a damaged file
            raise DataError(f"tokenizer {path!r} cannot be parsed as a SentencePiece model ({e})") from None
        # megatron hashes the dataset description (tokenizer included) to name its cached indices.
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "identity": self.identity}

    def record(self) -> dict:
        """What a checkpoint, release or dataset records of the tokenizer it was made with."""
        return {"tokenizer_id": self.identity, "tokenizer_sha256": self.sha256}

    def matches(self, recorded: dict) -> bool:
        """Whether this is the tokenizer `recorded` (a record()) names: by content where the record has it, else
        by the file's bytes (records of earlier versions); a record with neither matches anything."""
        if recorded.get("tokenizer_id"):
            return recorded["tokenizer_id"] == self.identity
        if recorded.get("tokenizer_sha256"):
            return recorded["tokenizer_sha256"] == self.sha256
        return True

    def tokenize(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def detokenize(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


# megatron-core's .idx layout (megatron/core/datasets/indexed_dataset.py, _IndexWriter / _IndexReader): a 9-byte
# header, version 1 (uint64), the dtype code (uint8, DType), sequence and document counts (uint64 each), then the
# sequence lengths (int32), the sequence pointers (int64, byte offsets into .bin) and the document indices.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                 8: np.uint16}


@dataclass
class IndexSummary:
    dtype: type
    lengths: np.ndarray  # tokens per sequence
    pointers: np.ndarray  # byte offset of each sequence in .bin
    documents: int = 0  # documents (a sentence-level dataset holds several sequences per document)


def read_index(prefix: str) -> IndexSummary:
    """The header, lengths and pointers of PREFIX.idx, read without megatron-core: the pre-flight check must not
    pay seconds of megatron's import before a rank starts. megatron's own reader opens the same files in the run
    (and tests/test_data_prep.py reads our datasets back with it). Raises ValueError for a file in another format."""
    import struct

    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        raise ValueError("no megatron-core index header")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in _INDEX_DTYPES:
        raise ValueError(f"index version {version} / dtype code {code} unknown")
    raw = np.memmap(path, mode="r", dtype=np.uint8)
    if len(raw) < 34 + sequences * 12:
        raise ValueError(f"{len(raw)} bytes cannot hold {sequences} sequences")
    lengths = np.frombuffer(raw, dtype=np.int32, count=sequences, offset=34)
    pointers = np.frombuffer(raw, dtype=np.int64, count=sequences, offset=34 + lengths.nbytes)
    # megatron's document index holds the first sequence of each document and a final end entry: documents + 1 values.
    return IndexSummary(dtype=_INDEX_DTYPES[code], lengths=lengths, pointers=pointers, documents=max(documents - 1, 0))


def check_indexed_dataset(prefix: str, tokenizer: SentencePieceTokenizer) -> int:
    """Fail early and clearly on a missing, truncated or foreign dataset. Returns its token count."""
    fix = ("build it with `python data_prep/preprocess_data.py --input ... --tokenizer "
           f"{tokenizer.path} --output-prefix {prefix}`")
    if os.path.basename(prefix) == "kjv_text_document":  # the embedded corpus of the default presets
        fix = "prepare the embedded corpus with ./run.sh prepare (about 10 s)"
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset file {prefix + ext!r} does not exist; {fix}")
    try:
        index = read_index(prefix)
    except (OSError, ValueError) as e:
        raise DataError(f"dataset index {prefix + '.idx'!r} is damaged or not a megatron-core index ({e}); "
                        f"{fix}") from None
    lengths, pointers = index.lengths, index.pointers
    itemsize = np.dtype(index.dtype).itemsize
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"dataset {prefix + '.bin'!r} has {actual} bytes but its index describes {expected}: "
                        f"the file is truncated or belongs to another index; {fix}")
    meta_path = prefix + ".json"
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if not tokenizer.matches(meta):
            raise DataError(f"dataset {prefix!r} was tokenized with {meta.get('tokenizer', 'another tokenizer')}, "
                            f"whose pieces differ from {tokenizer.path}'s; use the matching --tokenizer or re-tokenize: "
                            f"{fix}")
    # A cheap guard that also covers datasets without metadata: the largest id among the first 4M tokens.
    n = int(lengths.sum())
    if n:
        top = int(np.memmap(prefix + ".bin", dtype=index.dtype, mode="r", shape=(min(n, 1 << 22),)).max())
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
        c = np.bincount(np.memmap(prefix + ".bin", dtype=read_index(prefix).dtype, mode="r"))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
        total += int(c.sum())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()), total


@dataclass
class Splits:
    train: object
    valid: object
    valid_epoch_samples: int  # samples in one pass over the validation split


def build_datasets(cfg: RunConfig, tokenizer: SentencePieceTokenizer, train_samples: int,
                   valid_samples: int, cache_dir: str) -> Splits:
    """Train and validation GPTDatasets from megatron-core's builder (indices cached in cache_dir)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, m = cfg.data, cfg.model

    def config(blend, split):
        return GPTDatasetConfig(
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

    return build_megatron_splits(cfg, tokenizer, GPTDataset, config, train_samples, valid_samples, cache_dir,
                                 f"complete sequence of {m.seq_length + 1} tokens")


def build_megatron_splits(cfg: RunConfig, tokenizer: SentencePieceTokenizer, dataset_class, config, train_samples: int,
                          valid_samples: int, cache_dir: str, sample: str, one_epoch=None) -> Splits:
    """Train and validation splits of a megatron-core dataset class (GPTDataset; the BERT dataset of the masked-LM
    task) from its BlendedMegatronDatasetBuilder. config(blend, split) -> the class's dataset config; `sample` says
    what one sample needs, for the error when the validation split holds none. one_epoch: the split size that builds
    exactly one epoch (GPTDataset: None; megatron-core 0.16.1's masked datasets cannot take None, helpers.build_mapping
    wants a number, and always build whole epochs: 1)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    d, m = cfg.data, cfg.model
    prefixes, weights = d.prefixes()
    for p in prefixes:
        check_indexed_dataset(p, tokenizer)
    split = ",".join(str(x) for x in parse_split(d.split))
    os.makedirs(cache_dir, exist_ok=True)

    def make(sizes, blend=(prefixes, weights)):
        conf = config(blend, split)
        try:
            return BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, conf).build()
        except (AssertionError, ValueError, IndexError) as e:
            raise DataError(f"megatron-core could not build datasets from {d.data_path} with split "
                            f"{d.split!r} and seq_length {m.seq_length}: {e}. A split may be too small "
                            "for one sequence: use more data, a shorter --seq-length or another --split") from e

    # One epoch of the validation split tells how many distinct held-out samples there are. megatron
    # only builds a size-less (one epoch) split without weights, so a weighted blend counts per prefix.
    epoch = 0
    for blend in ([(prefixes, None)] if weights is None else [([p], None) for p in prefixes]):
        _, valid_epoch, _ = make([1, one_epoch, None if one_epoch is None else 0], blend)
        if valid_epoch is None or len(valid_epoch) == 0:
            raise DataError(f"the validation split of {blend[0][0] if weights else d.data_path} (split "
                            f"{d.split!r}) holds no {sample}; give it more documents")
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

