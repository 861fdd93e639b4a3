"""The dense model: parameter counts without building, SDPA core attention, end-of-document masking."""

from __future__ import annotations

import math
import os

import pytest
import torch

from wider import presets
from wider.config import RunConfig


def _cfg(**model) -> RunConfig:
    return presets.replace(presets.get("gpt_smoke"), model=dict(num_layers=2, hidden_size=64, num_attention_heads=4,
                                                                seq_length=32, **model))


@pytest.mark.parametrize("model", [
    {},
    {"tie_embeddings": False},
    {"normalization": "RMSNorm", "add_bias_linear": False},
    {"activation": "swiglu", "ffn_hidden_size": 96},
    {"position_embedding": "learned_absolute", "vocab_size": 1000, "make_vocab_size_divisible_by": 128},
])
def test_info_parameter_count_equals_built_model(single_rank, model):
    from wider import parallel
    from wider.info import describe
    from wider.models import ARCHITECTURES

    cfg = _cfg(**model)
    vocab = cfg.model.vocab_size or 8000
    cfg.model.vocab_size = vocab
    parallel.set_seed(1)
    built = ARCHITECTURES["gpt"].build(cfg, vocab)
    n_built = sum(p.numel() for p in built.parameters())
    info = describe(cfg)
    assert info["params_total"] == n_built
    emb = built.embedding.word_embeddings.weight.numel()
    if cfg.model.position_embedding == "learned_absolute":
        emb += built.embedding.position_embeddings.weight.numel()
    if not cfg.model.tie_embeddings:
        emb += built.output_layer.weight.numel()
    assert info["params_non_embedding"] == n_built - emb


def _reference_attention(q, k, v, keep):
    """float64 loops over heads: softmax(q k^T / sqrt(d) masked) v."""
    s, b, h, d = q.shape
    out = torch.zeros(s, b, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            scores = q[:, bi, hi].double() @ k[:, bi, hi].double().T / math.sqrt(d)
            scores = scores.masked_fill(~keep[bi], float("-inf"))
            out[:, bi, hi] = torch.softmax(scores, dim=-1) @ v[:, bi, hi].double()
    return out.reshape(s, b, h * d)


def test_sdpa_core_attention_matches_reference(single_rank):
    from wider.models.core_attention import SDPAttention
    from wider.models.gpt import transformer_config

    cfg = _cfg()
    attn = SDPAttention(transformer_config(cfg.model), layer_number=1)
    s, b, h, d = 10, 2, 4, 16
    q, k, v = (torch.randn(s, b, h, d) for _ in range(3))
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, s, s)
    torch.testing.assert_close(attn(q, k, v, None).double(), _reference_attention(q, k, v, causal),
                               rtol=1e-5, atol=1e-5)
    # megatron's explicit mask: True = hidden. Two documents in batch 0: 0..3 and 4..9.
    hide = ~causal.clone()
    hide[0, 4:, :4] = True
    got = attn(q, k, v, hide[:, None])
    torch.testing.assert_close(got.double(), _reference_attention(q, k, v, ~hide), rtol=1e-5, atol=1e-5)


def test_eod_mask_isolates_documents_end_to_end(single_rank):
    """With data.eod_mask the dataset's mask reaches the attention: a change in document 1 never changes the
    model's outputs in document 2 of the same sequence; without the mask it does."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from wider import parallel
    from wider.models import ARCHITECTURES

    cfg = _cfg(vocab_size=128)
    parallel.set_seed(3)
    model = ARCHITECTURES["gpt"].build(cfg, 128).eval()
    eod, s = 2, 16
    tokens = torch.randint(5, 100, (1, s))
    tokens[0, 5] = eod  # document 1 = positions 0..5, document 2 = 6..15
    mask, _, pos = _get_ltor_masks_and_position_ids(tokens[0], eod, False, True, False, True)
    other = tokens.clone()
    other[0, 1] = 101
    with torch.no_grad():
        for m in (mask[None], None):
            a = model(tokens, pos[None], m)
            b = model(other, pos[None], m)
            diff = (a[0, 6:] - b[0, 6:]).abs().max().item()
            if m is not None:
                assert diff == 0.0
            else:
                assert diff > 1e-4


def test_blended_datasets_from_two_prefixes_with_cached_indices(single_rank, embedded, tmp_path):
    """megatron's BlendedMegatronDatasetBuilder over two weighted prefixes; indices cached on disk."""
    import shutil

    from wider.data import SentencePieceTokenizer, build_datasets

    second = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(embedded["prefix"] + ext, second + ext)
    cfg = _cfg()
    cfg.data.data_path = ["0.25", embedded["prefix"], "0.75", second]
    tok = SentencePieceTokenizer(embedded["tokenizer"])
    splits = build_datasets(cfg, tok, train_samples=400, valid_samples=16, cache_dir=str(tmp_path / "cache"))
    assert len(splits.train) >= 400 and splits.valid_epoch_samples > 100
    picked = [int(splits.train.dataset_index[i]) for i in range(400)]
    share = picked.count(1) / len(picked)
    assert 0.65 < share < 0.85, share  # the 0.75-weighted prefix
    sample = splits.train[0]
    assert sample["tokens"].shape == (cfg.model.seq_length,) and sample["labels"].shape == sample["tokens"].shape
    assert any(f.endswith(".npy") for _, _, fs in os.walk(tmp_path / "cache") for f in fs)
