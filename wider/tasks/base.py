"""The contract between the training loop and a task (DESIGN 5.8), and what the supervised tasks share.

A task owns
- its inputs: `check_inputs` (the pre-flight: every file it will read, checked without writing anything) and
  `build_data` (a wider.data.Splits whose samples are dicts of tensors; sample i of the train split is a pure
  function of i, so the batch order stays a function of the step and a resumed run sees the same samples);
- its loss: `loss(engine, batch)` -> (the micro-batch's loss to back-propagate, its detached training metrics);
- its metrics: `eval_sums(engine, batch)` -> a float64 vector summed over batches and data-parallel ranks, and
  `eval_result(sums)` -> the loss, the count and the metrics of an evaluation; `summary` for summary.json.

The loop calls these and nothing task-specific. Shape suffixes: B samples, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    loss: float  # the task's validation loss (what `final_valid_loss` reports)
    count: int  # what the loss averages over (tokens for language models, samples otherwise)
    metrics: dict = field(default_factory=dict)  # name -> value (accuracy, F1, ...), in the order to show them


class Task:
    """One task for one run config (`self.cfg`); subclasses fill in the methods. `uses_tokenizer`: the run has a
    SentencePiece tokenizer (kept in the run directory, recorded in checkpoints). `count_name`: what
    EvalResult.count counts. `reports_ppl`: the console and TensorBoard show exp(loss) (language models)."""

    name = ""
    uses_tokenizer = True
    count_name = "samples"
    reports_ppl = False

    def __init__(self, cfg):
        self.cfg = cfg

    def check_inputs(self, tokenizer) -> None:
        raise NotImplementedError

    def build_data(self, tokenizer, train_samples: int, valid_samples: int, cache_dir: str):
        raise NotImplementedError

    def final_eval_samples(self, splits) -> int:
        """Validation samples the final evaluation scores: train.final_eval_iters global batches, or the whole split."""
        t = self.cfg.train
        n = splits.valid_epoch_samples if t.final_eval_iters is None else t.final_eval_iters * t.global_batch_size
        return min(n, len(splits.valid))

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def eval_sums(self, engine, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    @property
    def eval_width(self) -> int:
        """The length of eval_sums' vector (a rank with no held-out batch contributes zeros of it)."""
        raise NotImplementedError

    def eval_result(self, sums: torch.Tensor) -> EvalResult:
        raise NotImplementedError

    def scalars(self, split: str, loss: float, metrics: dict) -> dict:
        """TensorBoard scalars of a loss and its metrics: `split`/loss, `split`/ppl (language models),
        `split`/NAME."""
        out = {f"{split}/loss": loss}
        if self.reports_ppl:
            out[f"{split}/ppl"] = math.exp(min(loss, 50))
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
        return out

    def summary(self, result: EvalResult) -> tuple[dict, list]:
        """(fields for summary.json, lines for the closing report) of the final evaluation."""
        return dict(result.metrics), [metrics_text(result.metrics)]


def metrics_text(metrics: dict) -> str:
    """' | name value' for the console lines (counts as integers)."""
    return "".join(f" | {k} {v:,}" if isinstance(v, int) else f" | {k} {v:.4f}" for k, v in metrics.items())


# --- what the supervised tasks (classification, image_classification) share -------------------------------------


class EpochCycle:
    """Sample i of a training stream over n examples: epoch i // n visits them in a permutation drawn from
    (seed, epoch), so the stream is a pure function of i (the loop's batch order is a function of the step), every
    example is seen once per epoch, and two runs with the same seed agree on any rank layout."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i % self.n])


def soft_cross_entropy(logits_BC: torch.Tensor, target_BC: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against target distributions (mixup, label smoothing), in fp32."""
    return -(target_BC * F.log_softmax(logits_BC.float(), dim=-1)).sum(-1).mean()


def smoothed(target_BC: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing (Szegedy et al. 2016): (1 - eps) target + eps / C."""
    return target_BC if smoothing == 0 else target_BC * (1.0 - smoothing) + smoothing / target_BC.shape[-1]


def confusion_sums(logits_BC: torch.Tensor, labels_B: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
    """[loss sum, samples, confusion matrix C x C (true row, predicted column) flattened], float64: what a
    classification evaluation sums over batches and ranks."""
    C = logits_BC.shape[-1]
    predicted = logits_BC.argmax(-1)
    confusion = torch.bincount(labels_B * C + predicted, minlength=C * C).double()
    return torch.cat([loss_sum.double().reshape(1), torch.tensor([float(len(labels_B))], dtype=torch.float64,
                                                                 device=confusion.device), confusion])


def confusion_metrics(confusion: np.ndarray, binary_f1: bool) -> dict:
    """Accuracy, F1 of the second class (binary tasks, GLUE's MRPC / QQP convention) and Matthews correlation, as GLUE
    computes them (scikit-learn's f1_score and matthews_corrcoef), from a confusion matrix of counts."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    C = confusion.shape[0]
    counts = np.rint(confusion).astype(np.int64).reshape(-1)
    true = np.repeat(np.arange(C * C) // C, counts)
    pred = np.repeat(np.arange(C * C) % C, counts)
    if len(true) == 0:
        return {"accuracy": 0.0}
    out = {"accuracy": float((true == pred).mean())}
    if binary_f1:
        out["f1"] = float(f1_score(true, pred, pos_label=1, average="binary", zero_division=0))
    out["mcc"] = float(matthews_corrcoef(true, pred))
    return out


def majority_share(labels: np.ndarray, num_classes: int) -> float:
    """The accuracy of always answering the most frequent label (the baseline a classifier must beat)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return float(counts.max() / max(counts.sum(), 1))


def sample_seed(seed: int, split: int, index: int) -> int:
    """A 63-bit seed for sample `index` of split `split` (0 train, 1 valid) of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))
