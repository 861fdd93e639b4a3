"""Derived quantities of a preset, without a process group and without allocating the model.

    python -m wider.info --preset gpt_350m
    python -m wider.info --preset gpt_smoke --num-layers 8 --json

Parameters come from each architecture's closed-form counter (a test checks it against the built model);
the vocabulary is the tokenizer's when the file exists, else --vocab-size, else 8000 (as stated).
"""

from __future__ import annotations

import json
import os
import sys

DEFAULT_VOCAB = 8000


def describe(cfg, world_size: int = 1) -> dict:
    from wider.models import ARCHITECTURES, training_flops_per_token

    m, t = cfg.model, cfg.train
    vocab_source = "model.vocab_size"
    vocab = m.vocab_size
    if vocab is None and os.path.isfile(cfg.data.tokenizer):
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=cfg.data.tokenizer).GetPieceSize()
        vocab_source = cfg.data.tokenizer
    if vocab is None:
        vocab, vocab_source = DEFAULT_VOCAB, f"default {DEFAULT_VOCAB} (tokenizer not found)"
    pc = ARCHITECTURES[m.arch].count(cfg, vocab)
    fpt = training_flops_per_token(cfg, pc)
    tokens_per_step = t.global_batch_size * m.seq_length
    return {
        "preset": cfg.preset, "arch": m.arch, "vocab_size": vocab, "vocab_source": vocab_source,
        "padded_vocab_size": pc.extra.get("padded_vocab", vocab),
        "params_total": pc.total, "params_non_embedding": pc.non_embedding, "params_embedding": pc.embedding,
        "params_active": pc.active, "train_flops_per_token": fpt, "fwd_flops_per_token": fpt / 3.0,
        "tokens_per_step": tokens_per_step, "train_flops_per_step": fpt * tokens_per_step,
        "total_tokens": tokens_per_step * t.train_iters, "total_train_flops": fpt * tokens_per_step * t.train_iters,
        **{f"extra_{k}": v for k, v in pc.extra.items() if k != "padded_vocab"},
    }


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    from wider import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    cfg = cli.parse(argv, description=__doc__ + "\n--json prints one JSON object.")
    info = describe(cfg)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    from wider.training.metrics import fmt_count

    for k, v in info.items():
        shown = fmt_count(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) >= 1e4 else v
        print(f"{k:<24} {shown}" + (f"   ({v:,})" if isinstance(v, int) and v >= 1e4 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
