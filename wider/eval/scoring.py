"""Scoring text with a wider model: per-token losses over windows, and log-likelihoods of continuations.

Shape suffixes: B rows of a batch, S positions, V vocabulary (padded as the model was built), C scored positions.

One engine serves every evaluation (recipes/evaluate.py's perplexity and zero-shot tasks, and the
lm-evaluation-harness adapter), so that they agree to the last bit on the same request. Its conventions:

- Every row the model sees starts at a document boundary: the end-of-document token (EOD) comes first, as
  every document but the first one follows an EOD in the training stream (data_prep appends EOD to each
  document). A zero-shot request (context, continuation) is the row EOD + context + continuation; the EOD is
  also the "beginning of text" that lm-evaluation-harness conditions an empty context on.
- A row longer than the model's seq_length + 1 loses tokens from the left (the context's start), as
  lm-evaluation-harness's HF model does; a continuation longer than seq_length is an error.
- Contexts and continuations are tokenized the way lm-evaluation-harness's HF model does it: trailing spaces
  of the context move to the continuation, the pair is encoded as one string, and the continuation is what
  follows the context's own tokens.
- The attention mask and position ids follow the run's data settings (data.eod_mask, data.reset_position_ids):
  they are built by megatron-core's own `_get_ltor_masks_and_position_ids`, the function its GPTDataset uses,
  so a model trained with end-of-document masking is evaluated with it. Without those settings the rows are
  plain causal (the SDPA flash path).
- Windows (perplexity): a token stream (EOD, then documents each ending in EOD) is scored in windows of
  seq_length inputs. The first window scores its seq_length targets; every later window scores the next
  `stride` targets with the seq_length - stride tokens before them as extra context (stride = seq_length:
  disjoint windows, which is also lm-evaluation-harness's loglikelihood_rolling); the last window is shifted
  left so that it has a full seq_length of context. Each target token is scored exactly once.
- Per-token losses come from the model's own loss path (forward with labels), the code the training loop's
  evaluation runs, so that the run's validation loss is reproduced exactly; log-likelihoods of continuations
  are log_softmax over the full (padded) vocabulary in fp32, the normaliser that loss uses.
- MoE: the model is in eval mode, so each MoE layer applies moe.eval_capacity_factor over the tokens of one
  forward call (the batch, padding included): like the training run's evaluation, results then depend on the
  batch composition. --dropless (wider.moe.layer.configure with MoEConfig.dropless) lifts the capacity (every
  assignment is computed), which makes scores independent of batching.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from wider.moe import stats as moe_stats


class EvalError(ValueError):
    """Bad evaluation input (a task file, a flag, a request); the message names it and says how to fix it."""


def window_plan(n_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of n_tokens tokens whose targets are positions 1 .. n_tokens - 1 (position 0, the
    leading EOD, is context only): a list of (input start, input length, scored count), the scored targets
    being the last `scored count` of the window. See the module docstring for the convention."""
    if not 1 <= stride <= seq_length:
        raise EvalError(f"stride {stride} must be in [1, seq_length={seq_length}]; the default is seq_length "
                        "(disjoint windows); a smaller stride gives every scored token more context")
    out, a = [], 1
    while a < n_tokens:
        b = min(a + (seq_length if a == 1 else stride), n_tokens)
        n = min(seq_length, b - 1)
        out.append((b - 1 - n, n, b - a))
        a = b
    return out


class Scorer:
    """Forward passes of an eval-mode model in batches, on its device, with progress bars.

    model: a registry model (forward(tokens, position_ids, attention_mask, labels=None), wider/models);
    tokenizer: wider.data.SentencePieceTokenizer; cfg: the run's RunConfig (seq_length, data settings)."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg, device: Optional[torch.device] = None,
                 batch_size: int = 8, progress: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EvalError(f"batch size {batch_size!r} must be a positive integer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size
        self.progress = progress
        self.seq_length = int(cfg.model.seq_length)
        self.eod = int(tokenizer.eod)
        d = cfg.data
        self.reset_attention_mask, self.reset_position_ids = bool(d.eod_mask), bool(d.reset_position_ids)
        self.eod_mask_loss = bool(d.eod_mask_loss)
        self.truncated = 0  # requests whose context lost tokens on the left (longer than seq_length + 1)

    # --- model calls -------------------------------------------------------------------------------------

    def progress_bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="batch", disable=not self.progress, leave=False,
                    dynamic_ncols=True)

    def _layout(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(position ids [B, S], attention mask [B, 1, S, S] (True = hidden) or None, loss mask [B, S]) for rows
        of tokens, by the run's data settings (megatron-core's GPTDataset function when any is on)."""
        B, S = tokens_BS.shape
        if not (self.reset_attention_mask or self.reset_position_ids or self.eod_mask_loss):
            pos_BS = torch.arange(S, device=tokens_BS.device).expand(B, S)
            return pos_BS, None, torch.ones(B, S, device=tokens_BS.device)
        from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

        masks, losses, positions = [], [], []
        for row in tokens_BS.cpu():
            mask, loss_mask, pos = _get_ltor_masks_and_position_ids(
                row, self.eod, self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss,
                self.reset_attention_mask)
            masks.append(mask)
            losses.append(loss_mask)
            positions.append(pos)
        mask_B1SS = torch.stack(masks).to(self.device) if self.reset_attention_mask else None
        return torch.stack(positions).to(self.device), mask_B1SS, torch.stack(losses).to(self.device)

    def forward(self, tokens_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None):
        """Logits [B, S, V] (labels None) or the per-token loss [B, S], and the loss mask [B, S]."""
        tokens_BS = tokens_BS.to(self.device)
        pos_BS, mask, loss_mask_BS = self._layout(tokens_BS)
        moe_stats.clear(self.model)  # MoE layers append a record per call: clear before each forward
        with torch.no_grad():
            out = self.model(tokens_BS, pos_BS, mask, labels=None if labels_BS is None else labels_BS.to(self.device))
        moe_stats.clear(self.model)
        return out, loss_mask_BS

    # --- perplexity over token streams ---------------------------------------------------------------------

    def stream_nll(self, streams: Sequence, stride: Optional[int] = None, desc: str = "perplexity",
                   apply_loss_mask: bool = True) -> list[tuple[float, int]]:
        """(sum of the per-token losses in nats, scored tokens) of each token stream (anything with len() and
        [a:b] slicing to integer arrays, starting with the EOD that precedes its first document), windowed as
        the module docstring says. apply_loss_mask: leave out the targets the run's data.eod_mask_loss leaves
        out of its loss (the training evaluation's convention)."""
        L = self.seq_length
        stride = L if stride is None else stride
        jobs = [(i, s, n, c) for i, st in enumerate(streams) for s, n, c in window_plan(len(st), L, stride)]
        jobs.sort(key=lambda j: -j[2])  # equal input lengths batch together (all L but short streams)
        totals = np.zeros(len(streams), dtype=np.float64)
        counts = np.zeros(len(streams), dtype=np.int64)
        batches = _batches_by(jobs, self.batch_size, key=lambda j: j[2])
        with self.progress_bar(len(batches), desc) as bar:
            for batch in batches:
                n = batch[0][2]
                rows = [np.asarray(streams[i][s:s + n + 1], dtype=np.int64) for i, s, _, _ in batch]
                full_BS = torch.from_numpy(np.stack(rows))
                loss_BS, loss_mask_BS = self.forward(full_BS[:, :-1], full_BS[:, 1:])
                weight_BS = torch.zeros_like(loss_BS, dtype=torch.float64)
                for r, (_, _, _, c) in enumerate(batch):
                    weight_BS[r, n - c:] = 1.0
                if apply_loss_mask:
                    weight_BS = weight_BS * loss_mask_BS.double()
                sums = (loss_BS.double() * weight_BS).sum(1).cpu().numpy()
                cnts = weight_BS.sum(1).cpu().numpy()
                for r, (i, _, _, _) in enumerate(batch):
                    totals[i] += sums[r]
                    counts[i] += int(round(cnts[r]))
                bar.update()
        return [(float(t), int(c)) for t, c in zip(totals, counts)]

    # --- log-likelihoods of continuations --------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), tokenized as lm-evaluation-harness's HF model does (see the
        module docstring)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [], self.tokenizer.tokenize(continuation)
        whole = self.tokenizer.tokenize(context + continuation)
        n_ctx = len(self.tokenizer.tokenize(context))
        if n_ctx >= len(whole):  # the continuation merged into the context's last token: encode it alone
            return self.tokenizer.tokenize(context), self.tokenizer.tokenize(continuation)
        return whole[:n_ctx], whole[n_ctx:]

    def loglikelihood_text(self, pairs: Sequence[tuple[str, str]], desc: str = "loglikelihood"
                           ) -> list[tuple[float, bool, int]]:
        return self.loglikelihood([self.encode_pair(c, x) for c, x in pairs], desc)

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "loglikelihood"
                      ) -> list[tuple[float, bool, int]]:
        """(log P(continuation | EOD + context) in nats, whether greedy decoding reproduces every continuation
        token, continuation tokens) per request of token ids (context, continuation).

        Requests whose model input is the same row (duplicates, and one-token continuations of one context, as
        in multiple-choice tasks with one-token answers) share one forward pass; rows are sorted by length and
        batched, padded on the right with EOD (which, with causal attention, leaves earlier positions alone)."""
        L = self.seq_length
        rows: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            cont = [int(t) for t in cont]
            if not cont:
                raise EvalError(f"request {i} has an empty continuation: there is nothing to score")
            if len(cont) > L:
                raise EvalError(f"request {i}: its continuation has {len(cont)} tokens, more than the model's "
                                f"seq_length {L}; it cannot be scored in one window")
            full = [self.eod, *(int(t) for t in ctx), *cont]
            if len(full) > L + 1:
                self.truncated += 1
                full = full[-(L + 1):]
            rows.setdefault(tuple(full[:-1]), []).append((i, cont))
        order = sorted(rows, key=len, reverse=True)
        out: list = [None] * len(requests)
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        with self.progress_bar(len(batches), desc) as bar:
            for batch in batches:
                S = len(batch[0])
                tokens_BS = torch.full((len(batch), S), self.eod, dtype=torch.long)
                for r, inp in enumerate(batch):
                    tokens_BS[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits_BSV, _ = self.forward(tokens_BS)
                # Every scored position of every request in the batch at once: one log_softmax, one gather and
                # one copy to the host per batch (no synchronisation per request).
                row_C, pos_C, target_C, owner_C, owners = [], [], [], [], []
                for r, inp in enumerate(batch):
                    n = len(inp)
                    for i, cont in rows[inp]:
                        c = len(cont)
                        row_C += [r] * c
                        pos_C += range(n - c, n)
                        target_C += cont
                        owner_C += [len(owners)] * c
                        owners.append((i, c))
                dev = logits_BSV.device
                logp_CV = torch.log_softmax(logits_BSV[torch.tensor(row_C, device=dev),
                                                       torch.tensor(pos_C, device=dev)].float(), dim=-1)
                target = torch.tensor(target_C, device=dev)
                owner = torch.tensor(owner_C, device=dev)
                ll_R = torch.zeros(len(owners), dtype=torch.float64, device=dev).index_add_(
                    0, owner, logp_CV.gather(1, target[:, None])[:, 0].double())
                miss_R = torch.zeros(len(owners), dtype=torch.long, device=dev).index_add_(
                    0, owner, (logp_CV.argmax(-1) != target).long())
                for (i, c), ll, miss in zip(owners, ll_R.tolist(), miss_R.tolist()):
                    out[i] = (ll, miss == 0, c)
                bar.update()
        return out


def _batches_by(items: list, size: int, key: Callable) -> list[list]:
    """Consecutive batches of at most `size` items sharing key(item) (items sorted by that key)."""
    out: list[list] = []
    for it in items:
        if out and len(out[-1]) < size and key(out[-1][0]) == key(it):
            out[-1].append(it)
        else:
            out.append([it])
    return out


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(min(nll / max(tokens, 1), 700.0))
