"""The causal language model (DESIGN 3): next-token prediction on megatron-core GPT datasets, the loss averaged over
the loss mask, validation loss and perplexity, and the final loss against the corpus's unigram entropy."""

from __future__ import annotations

import torch

from wider.data import build_datasets, check_indexed_dataset, unigram_entropy, unpack
from wider.tasks.base import EvalResult, Task


def lm_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


class CausalLM(Task):
    name = "causal_lm"
    count_name = "tokens"
    reports_ppl = True

    def check_inputs(self, tokenizer) -> None:
        prefixes, _ = self.cfg.data.prefixes()
        for prefix in prefixes:
            check_indexed_dataset(prefix, tokenizer)

    def build_data(self, tokenizer, train_samples: int, valid_samples: int, cache_dir: str):
        return build_datasets(self.cfg, tokenizer, train_samples, valid_samples, cache_dir)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens, pos, mask, labels, loss_mask = unpack(batch)
        return lm_loss(engine(tokens, pos, mask, labels=labels), loss_mask), {}

    def eval_sums(self, engine, batch: dict) -> torch.Tensor:
        """[sum of the per-token losses under the loss mask, tokens], float64."""
        tokens, pos, mask, labels, loss_mask = unpack(batch)
        per_tok = engine(tokens, pos, mask, labels=labels)
        lm = loss_mask.float()
        return torch.stack([(per_tok.float() * lm).sum().double(), lm.sum().double()])

    @property
    def eval_width(self) -> int:
        return 2

    def eval_result(self, sums: torch.Tensor) -> EvalResult:
        return EvalResult(loss=float(sums[0] / sums[1].clamp(min=1)), count=int(sums[1]))

    def summary(self, result: EvalResult) -> tuple[dict, list]:
        """The final loss against the unigram entropy of the corpus: a model that ignores context scores exactly it."""
        prefixes, _ = self.cfg.data.prefixes()
        h1, corpus_tokens = unigram_entropy(prefixes)
        fields = {"unigram_entropy": h1, "nats_below_unigram": h1 - result.loss, "corpus_tokens": corpus_tokens}
        return fields, [f"unigram entropy of the corpus {h1:.4f} nats ({corpus_tokens:,} tokens): the model is "
                        f"{h1 - result.loss:.3f} nats below it"]
