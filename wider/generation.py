"""Text generation with a key/value cache: one sampling loop for every architecture (recipes/generate.py).

Shape suffixes: B sequences in the batch (the samples of one prompt), N new positions in one step, L
positions so far, V vocabulary (the model's padded one).

The contract (what an architecture provides)
--------------------------------------------
`wider.models.Architecture.incremental(model, batch_size, max_length)` returns a fresh IncrementalForward
for one generation (one batch of sequences of at most max_length positions):

    step.length                  positions already cached (0 at the start)
    step(tokens_BN) -> logits_BV runs the N new tokens at positions length .. length + N - 1, with every
                                 earlier position taken from the cache (not recomputed), and returns the
                                 logits of the LAST new position; afterwards step.length grew by N

The loop calls it once with the whole prompt (prefill, N = prompt length) and then once per new token (N = 1).
The model must be in eval mode. What exists:
- megatron-core GPTModels (gpt, gpt_moe, widenet): megatron's own static inference path
  (wider.models.gpt.MegatronIncremental: StaticInferenceContext and megatron's KV buffers; CPU needs the
  patch patches/kv_cache_cpu.py, applied by patches.apply_defaults()). WideNet's shared attention keeps one
  cache slot per block (wider.models.widenet.SharedAttentionRef).
- models whose forward takes `cache=` (moeut): wider.models.attention.KVCacheForward with a KVCache, one slot
  per attention APPLICATION (depth), so a layer applied several times keeps separate keys per depth.
A new architecture (e.g. umoe) implements it in one of three ways:
  1. a megatron-core GPTModel whose self-attention slot is not megatron's Attention (UMoE's pre-mixing
     attention): that module's forward(..., inference_context=None, rotary_pos_emb=...) keeps its own keys /
     values under megatron's StaticInferenceContext - `k_all, v_all = static_context_extend(inference_context,
     self.layer_number, k_new_SB.., v_new_SB..)` (wider.models.attention) stores the new positions at
     inference_context.sequence_len_offset and returns every position so far; the new queries and keys take
     rows offset .. offset + S - 1 of the RoPE table GPTModel passes (it covers max_sequence_length positions
     under a context); attend with wider.models.attention.attend (the causal mask aligned to the last query)
     - and its class sets `handles_inference_context = True`. MegatronIncremental refuses attention slots
     without that flag (a slot that ignored the context would silently recompute from the new token only).
  2. a model of its own whose forward(tokens, position_ids, attention_mask, labels=None, cache=None) accepts a
     wider.models.attention.KVCache: the attention application at depth i calls `slot = cache.slot(i)`, uses
     positions slot.offset .. slot.offset + S - 1 for its new queries and keys (RoPE), calls
     `k, v = slot.extend(k_new_BHSC, v_new_BHSC)` and attends with `attend`; the forward returns logits
     [B, N, V] and does not advance the cache (KVCacheForward does). The default factory finds it by the
     `cache` argument.
  3. or its ARCHITECTURES entry sets `incremental=` to a factory of its own with the protocol above.
Anything else makes the default factory raise NotImplementedError (generate with use_cache=False), and
tests/test_generate.py marks the architecture xfail with that message until it implements one of these.

The loop
--------
One prompt at a time: the batch is `num_samples` copies of one prompt, so every row has the same length and
neither padding nor padding masks are needed (prompts of different lengths run one after another). Per step:
wider.moe.stats.clear(model) (MoE layers append a CallRecord per call), forward, then the next token from the
last position's logits:
- logits of ids >= vocab_size (megatron's padded vocabulary rows, never trained) are removed;
- temperature 0 = greedy (argmax; top-k and top-p do not matter then); otherwise logits / temperature, then
  top-k (keep the k largest; 0 = off), then top-p (nucleus, Holtzman et al. 2020: keep the smallest set of
  most probable tokens whose probability mass reaches p, always at least one; 1 = off), then a draw from
  the softmax with a torch.Generator seeded by `seed` (the same seed reproduces the same samples);
- a sample that produces the end-of-document id stops (the id is not part of its text); the batch stops when
  every sample stopped or after max_new_tokens.
The prompt plus max_new_tokens must fit the model's seq_length (the positions it was trained on; the cache is
allocated for exactly that many positions).

MoE layers run dropless during generation (`inference_mode`): with a capacity factor the dropped set depends
on how many tokens share a forward pass, so a cached step (B tokens) and a full recomputation (B x L tokens)
would route differently for reasons unrelated to the cache, and a token's output would depend on its batch
mates. The layers run on a derived configuration for the duration (generation_config: MoEConfig.dropless, eager routing) and get
their own back afterwards; training and evaluation keep their capacity. Router noise is training-only already.
use_cache=False recomputes the whole sequence every step through the registry's forward (the reference the
cached path is tested against, tests/test_generate.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch

from wider.moe import stats as moe_stats
from wider.moe.config import MoEConfig
from wider.moe.layer import reconfigured


class GenerationError(ValueError):
    """A bad generation request (prompt, lengths, sampling parameters); the message says how to fix it."""


class IncrementalForward(Protocol):
    """One generation's forward with a key/value cache (the contract in the module docstring)."""

    @property
    def length(self) -> int: ...

    def __call__(self, tokens_BN: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SamplingParams:
    """How the next token is chosen (the module docstring gives the order of the filters)."""

    max_new_tokens: int = 64  # at most this many new tokens per sample
    temperature: float = 1.0  # 0 = greedy; > 0 divides the logits
    top_k: int = 0  # keep the k most probable tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p, in (0, 1]; 1 = off
    seed: Optional[int] = None  # seeds the sampling generator; None = a fresh random seed

    def check(self) -> None:
        def bad(msg: str) -> None:
            raise GenerationError(msg)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            bad(f"max_new_tokens (--max-new-tokens) must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            bad(f"temperature (--temperature) must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k (--top-k) must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p (--top-p) must be in (0, 1] (1 = off; 0.9 keeps the tokens making up 90% of the probability), "
                f"got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed (--seed) must be an integer or None, got {self.seed!r}")


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The logits with every token outside top-k and outside the top-p nucleus set to -inf (float32).

    top-p keeps token i (in order of decreasing probability) while the mass of the tokens before it is still
    below p: the smallest prefix whose mass reaches p, never empty."""
    logits_BV = logits_BV.float()
    V = logits_BV.shape[-1]
    if top_k and top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        mass_before_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
        drop_sorted_BV = mass_before_BV >= top_p
        drop_sorted_BV[:, 0] = False
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def next_tokens(logits_BV: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token of each row [B] (int64) from the last position's logits [B, V]."""
    if params.temperature == 0:
        return logits_BV.float().argmax(dim=-1)
    logits_BV = filter_logits(logits_BV.float() / params.temperature, params.top_k, params.top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def generation_config(c: MoEConfig) -> MoEConfig:
    """The MoE configuration generation asks for: dropless (the module docstring says why) and eager routing (the
    compiled router is specialised per token count, dynamic=False: prefill lengths change with every prompt, so
    eager routing avoids a recompilation per prompt), and causal routing (expert-choice layers route each token by
    token choice of the same scores: one new token per step has no group to be chosen from)."""
    return c.dropless().eager().causal()


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and every MoE layer on generation_config for the duration; restores the MoE
    configurations and the training flag afterwards."""
    was_training = model.training
    try:
        model.eval()
        with reconfigured(model, generation_config), torch.no_grad():
            yield
    finally:
        model.train(was_training)


class FullRecompute:
    """IncrementalForward without a cache: keeps the tokens and runs the whole sequence through the registry's
    forward(tokens, position_ids, None) at every call (use_cache=False; the reference for the cached path)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int):
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.tokens_BL: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.tokens_BL is None else self.tokens_BL.shape[1]

    def __call__(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        self.tokens_BL = tokens_BN if self.tokens_BL is None else torch.cat([self.tokens_BL, tokens_BN], dim=1)
        L = self.tokens_BL.shape[1]
        positions_BL = torch.arange(L, device=tokens_BN.device).expand_as(self.tokens_BL)
        return self.model(self.tokens_BL, positions_BL, None)[:, -1]


@dataclass
class Generation:
    """The samples of one prompt."""

    prompt: list  # prompt token ids
    tokens: list  # per sample: the new token ids (without the end-of-document id)
    stop: list  # per sample: "eod" (it produced the end-of-document id) or "length" (max_new_tokens)
    prefill_s: float  # seconds of the prompt's forward pass
    decode_s: float  # seconds of the one-token steps
    steps: int  # forward passes made (prefill included)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all samples) per second of generation, prefill included."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_prompt(prompt: Sequence[int], max_new_tokens: int, max_length: int, vocab_size: Optional[int],
                 where: str = "prompt") -> None:
    """Clear errors for an empty prompt, one too long for the model, or ids outside the vocabulary."""
    if len(prompt) == 0:
        raise GenerationError(f"{where} is empty (no tokens); give at least one character of text")
    if len(prompt) + max_new_tokens > max_length:
        room = max_length - max_new_tokens
        hint = (f"shorten the prompt to at most {room} tokens or lower --max-new-tokens to at most "
                f"{max_length - len(prompt)}" if room > 0 and max_length > len(prompt) else
                f"shorten the prompt and lower --max-new-tokens so that both fit {max_length} positions")
        raise GenerationError(f"{where} has {len(prompt)} tokens; with max_new_tokens {max_new_tokens} that is "
                              f"{len(prompt) + max_new_tokens} positions, more than the model's seq_length "
                              f"{max_length}: {hint}")
    if vocab_size is not None:
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise GenerationError(f"{where} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}; "
                                  "tokenize it with the model's own tokenizer")


def generate(model: torch.nn.Module, prompt: Sequence[int], params: SamplingParams, *, max_length: int,
             num_samples: int = 1, incremental: Optional[Callable] = None, use_cache: bool = True,
             eod: Optional[int] = None, vocab_size: Optional[int] = None, where: str = "prompt") -> Generation:
    """Sample `num_samples` continuations of one tokenized prompt.

    max_length: the model's seq_length (prompt + max_new_tokens must fit). incremental: the architecture's
    factory (wider.models.ARCHITECTURES[arch].incremental; None = the registry's default). use_cache=False
    recomputes the whole sequence every step. eod: the end-of-document id that stops a sample (None = never
    stop early). vocab_size: the tokenizer's vocabulary; logits of the padded ids above it are never chosen."""
    params.check()
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise GenerationError(f"num_samples (--num-samples) must be an integer >= 1, got {num_samples!r}")
    check_prompt(prompt, params.max_new_tokens, max_length, vocab_size, where)
    if incremental is None:
        from wider.models import Architecture

        incremental = Architecture.incremental
    device = next(model.parameters()).device
    B, P = num_samples, len(prompt)
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)

    with inference_mode(model):
        step = incremental(model, B, P + params.max_new_tokens) if use_cache else \
            FullRecompute(model, B, P + params.max_new_tokens)
        inputs_BN = torch.tensor([list(prompt)], dtype=torch.long, device=device).expand(B, P)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        out_BT = torch.empty(B, params.max_new_tokens, dtype=torch.long, device=device)
        stop_B = torch.full((B,), params.max_new_tokens, dtype=torch.long, device=device)  # new-token count
        t0 = time.perf_counter()
        prefill_s, steps = 0.0, 0
        for i in range(params.max_new_tokens):
            moe_stats.clear(model)
            logits_BV = step(inputs_BN)
            steps += 1
            if vocab_size is not None and vocab_size < logits_BV.shape[-1]:
                logits_BV = logits_BV.float()
                logits_BV[:, vocab_size:] = float("-inf")
            tok_B = next_tokens(logits_BV, params, generator)
            if eod is not None:
                hit_B = (tok_B == eod) & ~done_B
                stop_B = torch.where(hit_B, torch.full_like(stop_B, i), stop_B)
                done_B = done_B | hit_B
            out_BT[:, i] = tok_B
            if i == 0:
                _sync(device)
                prefill_s = time.perf_counter() - t0
            # One host read per step to stop early; only when a stop token exists.
            if eod is not None and bool(done_B.all()):
                break
            inputs_BN = tok_B[:, None]
        moe_stats.clear(model)
        _sync(device)
        total_s = time.perf_counter() - t0
    counts = stop_B.tolist()
    rows = out_BT.tolist()
    tokens = [row[:n] for row, n in zip(rows, counts)]
    stop = ["eod" if n < params.max_new_tokens else "length" for n in counts]
    return Generation(prompt=list(prompt), tokens=tokens, stop=stop, prefill_s=prefill_s,
                      decode_s=total_s - prefill_s, steps=steps)


__all__ = ["FullRecompute", "Generation", "GenerationError", "IncrementalForward", "SamplingParams", "check_prompt",
           "filter_logits", "generate", "inference_mode", "next_tokens"]
