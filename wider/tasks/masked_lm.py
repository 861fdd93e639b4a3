"""ALBERT-style pretraining (DESIGN 5.8; Lan et al. 2020): masked-LM plus sentence-order prediction, on megatron-core's
BERT dataset over a sentence-level indexed dataset.

Data. megatron-core's BERTMaskedWordPieceDataset (megatron/core/datasets/bert_dataset.py) reads an indexed dataset
whose sequences are sentences grouped into documents (data_prep/preprocess_data.py --sentences lines; the embedded
corpus: the verses' clauses as sentences, one chapter per document). A sample is [CLS] A [SEP] B [SEP] from consecutive
sentences of one document, cut to seq_length (data.short_sequence_probability of them shorter); with probability 0.5
the two segments are swapped, which is ALBERT's sentence-order prediction (the label is 1 for a swapped pair).
data.masking_probability of the tokens are predicted, in whole-word n-grams (n <= data.masking_max_ngram,
P(n) ~ 1/n, ALBERT's n-gram masking), each replaced by [MASK] 80%, a random token 10%, itself 10% of the time.
Every draw comes from a NumPy generator seeded by (train.seed, sample index): the same sample on any rank layout.

The dataset was written for WordPiece, where a piece that continues a word starts with "##". SentencePiece marks the
other end, a piece that STARTS a word with "\u2581". `MaskingTokenizer` presents the SentencePiece vocabulary to
megatron-core in WordPiece's convention (a continuing piece as "##piece"), so its whole-word n-gram masking masks
whole SentencePiece words; it also gives the [CLS], [SEP], [MASK] and padding ids (the tokenizer must hold those
pieces: data_prep/train_tokenizer.py --user-defined-symbols "[CLS],[SEP],[MASK]").

Loss: the mean cross-entropy of the masked tokens plus the mean cross-entropy of the sentence order, per
micro-batch. Metrics: both losses and both accuracies; the summary sets the masked-token accuracy against the share
of the corpus's most frequent token (what always answering it scores) and the sentence order against 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wider.data import DataError, build_megatron_splits, check_indexed_dataset, read_index
from wider.tasks.base import EvalResult, Task

SPECIAL = ("[CLS]", "[SEP]", "[MASK]")
WORD_START = "\u2581"  # SentencePiece's word-boundary marker


class MaskingTokenizer:
    """What megatron-core's masked datasets read of a tokenizer (cls, sep, mask, pad, inv_vocab, unique_identifiers),
    over wider's SentencePieceTokenizer; see the module docstring for the "##" convention of inv_vocab."""

    def __init__(self, tokenizer):
        sp = tokenizer.sp
        ids = {}
        for piece in SPECIAL:
            i = sp.piece_to_id(piece)
            if i == sp.unk_id() or sp.id_to_piece(i) != piece:
                raise DataError(f"tokenizer {tokenizer.path!r} has no {piece} piece, which masked_lm needs; train one "
                                "with data_prep/train_tokenizer.py --user-defined-symbols \"[CLS],[SEP],[MASK]\" (the "
                                "embedded corpus: python data_prep/prepare_embedded.py --task masked_lm)")
            ids[piece] = i
        if tokenizer.pad is None:
            raise DataError(f"tokenizer {tokenizer.path!r} has no padding piece; retrain it with "
                            "data_prep/train_tokenizer.py (it reserves id 3 for <pad>)")
        self.cls, self.sep, self.mask = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]
        self.pad, self.eod, self.vocab_size = tokenizer.pad, tokenizer.eod, tokenizer.vocab_size
        self.inv_vocab = {}
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            ordinary = not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or piece in SPECIAL)
            self.inv_vocab[i] = "##" + piece if ordinary and not piece.startswith(WORD_START) else piece
        # megatron hashes the dataset description (tokenizer included) to name its cached indices.
        self.unique_identifiers = {"class": "MaskingTokenizer", "identity": tokenizer.identity}


class MaskedSamples:
    """megatron-core's BERT samples as tensors: tokens, types, padding_mask (1 = token), labels and loss_mask (the
    predicted positions), sop_label (1 = the segments were swapped)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset[i]
        # megatron-core 0.16.1 marks padding in "padding_mask" and "types" with the tokenizer's pad id (it assumes
        # pad id 0); with SentencePiece's pad id 3 those would be a fourth token type. Padding is where the mask is
        # not 1; its type is 0 and its keys are hidden.
        real = s["padding_mask"] == 1
        types = np.where(real, s["types"], 0)
        return {"tokens": torch.from_numpy(s["text"].astype(np.int64)), "types": torch.from_numpy(types),
                "padding_mask": torch.from_numpy(real.astype(np.int64)),
                "labels": torch.from_numpy(s["labels"].astype(np.int64)),
                "loss_mask": torch.from_numpy(s["loss_mask"].astype(np.int64)),
                "sop_label": torch.tensor(int(s["is_random"]), dtype=torch.int64)}


class MaskedLM(Task):
    name = "masked_lm"

    def check_inputs(self, tokenizer) -> None:
        MaskingTokenizer(tokenizer)
        prefixes, _ = self.cfg.data.prefixes()
        for prefix in prefixes:
            check_indexed_dataset(prefix, tokenizer)
            index = read_index(prefix)
            if index.documents >= len(index.lengths):
                raise DataError(f"dataset {prefix!r} holds one sequence per document ({index.documents} documents); "
                                "masked_lm's sentence-order task needs documents of several sentences: build it with "
                                "`python data_prep/preprocess_data.py --sentences lines --no-append-eod ...` (one "
                                "sentence per line of each document)")

    def build_data(self, tokenizer, train_samples: int, valid_samples: int, cache_dir: str):
        from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig

        cfg = self.cfg
        d, m = cfg.data, cfg.model
        masking = MaskingTokenizer(tokenizer)

        def config(blend, split):
            return BERTMaskedWordPieceDatasetConfig(
                random_seed=cfg.train.seed, sequence_length=m.seq_length, blend=blend, split=split,
                path_to_cache=cache_dir, tokenizer=masking, mmap_bin_files=True,
                masking_probability=d.masking_probability, short_sequence_probability=d.short_sequence_probability,
                masking_max_ngram=d.masking_max_ngram, masking_do_full_word=True, masking_do_permutation=False,
                masking_use_longer_ngrams=False, masking_use_geometric_distribution=False, classification_head=True)

        # megatron's masked datasets build whole epochs (helpers.build_mapping stops only between epochs): a split
        # asked for 1 sample holds one epoch, and the validation split holds max(valid_samples, one epoch) samples.
        splits = build_megatron_splits(cfg, tokenizer, BERTMaskedWordPieceDataset, config, train_samples,
                                       valid_samples, cache_dir, "document of two sentences", one_epoch=1)
        splits.train, splits.valid = MaskedSamples(splits.train), MaskedSamples(splits.valid)
        return splits

    def _forward(self, engine, batch: dict):
        predict = batch["loss_mask"].bool()
        logits_MV, sop_B2 = engine(batch["tokens"], batch["types"], batch["padding_mask"], predict)
        return logits_MV.float(), batch["labels"][predict], sop_B2.float(), batch["sop_label"]

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        logits_MV, target_M, sop_B2, order_B = self._forward(engine, batch)
        mlm, sop = F.cross_entropy(logits_MV, target_M), F.cross_entropy(sop_B2, order_B)
        with torch.no_grad():
            stats = {"mlm_loss": mlm.detach(), "sop_loss": sop.detach(),
                     "mlm_accuracy": (logits_MV.argmax(-1) == target_M).float().mean(),
                     "sop_accuracy": (sop_B2.argmax(-1) == order_B).float().mean()}
        return mlm + sop, stats

    def eval_sums(self, engine, batch: dict) -> torch.Tensor:
        """[MLM loss sum, MLM correct, masked tokens, SOP loss sum, SOP correct, samples], float64."""
        logits_MV, target_M, sop_B2, order_B = self._forward(engine, batch)
        return torch.stack([F.cross_entropy(logits_MV, target_M, reduction="sum").double(),
                            (logits_MV.argmax(-1) == target_M).sum().double(),
                            torch.tensor(float(len(target_M)), dtype=torch.float64, device=logits_MV.device),
                            F.cross_entropy(sop_B2, order_B, reduction="sum").double(),
                            (sop_B2.argmax(-1) == order_B).sum().double(),
                            torch.tensor(float(len(order_B)), dtype=torch.float64, device=logits_MV.device)])

    @property
    def eval_width(self) -> int:
        return 6

    def eval_result(self, sums: torch.Tensor) -> EvalResult:
        s = sums.tolist()
        masked, samples = max(s[2], 1.0), max(s[5], 1.0)
        mlm, sop = s[0] / masked, s[3] / samples
        return EvalResult(loss=mlm + sop, count=int(s[5]), metrics={
            "mlm_accuracy": s[1] / masked, "sop_accuracy": s[4] / samples, "mlm_loss": mlm, "sop_loss": sop,
            "masked_tokens": int(s[2])})

    def summary(self, result: EvalResult) -> tuple[dict, list]:
        prefixes, _ = self.cfg.data.prefixes()
        top, share = most_frequent_token(prefixes)
        r = result.metrics
        fields = {**r, "most_frequent_token_share": share, "most_frequent_token_id": top, "sop_chance": 0.5}
        return fields, [f"masked-token accuracy {r['mlm_accuracy']:.4f} on {r['masked_tokens']:,} masked tokens "
                        f"(always answering the most frequent token, id {top}: {share:.4f})",
                        f"sentence-order accuracy {r['sop_accuracy']:.4f} on {result.count:,} pairs (chance 0.5)"]


def most_frequent_token(prefixes: list) -> tuple[int, float]:
    """(id, share) of the most frequent token of the datasets: the accuracy of a masked-LM that always answers it."""
    counts = np.zeros(0, dtype=np.int64)
    for prefix in prefixes:
        c = np.bincount(np.memmap(prefix + ".bin", dtype=read_index(prefix).dtype, mode="r"))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
    if not counts.sum():
        return 0, 0.0
    return int(counts.argmax()), float(counts.max() / counts.sum())

