"""Activation memory a model's forward keeps for its backward, counted on the built model (CPU, no GPU needed).

    python benchmarks/saved_activations.py                                  # MoEUT-244M beside its dense baseline
    python benchmarks/saved_activations.py --models umoe_small umoe_small_dense --vocab 32000 --tokens 512

One training forward (dropless MoE layers, fp32, one sequence of --tokens tokens) under torch's saved-tensor
hooks: the distinct storages autograd keeps, parameters excluded (they exist anyway). This is the activation
term of the memory plan (`python -m wider.info --plan`); in bf16 it halves. It is where MoEUT-244M's H100 peak
(39.8 GiB against the dense baseline's 10.1 on 2026-11-23) came from: the experts' gathered rows and outputs,
16 copies of every token at top-16, which the fused expert path (wider.moe.dispatch.gather_mm / mm_combine) no
longer keeps. Figures are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse


def saved_bytes(name: str, vocab: int, tokens: int) -> tuple[int, int]:
    """(activation bytes kept for the backward, parameters) of preset `name` on one sequence of `tokens`."""
    import torch

    from wider import memory_plan as plan, presets
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings

    cfg = presets.get(name)
    torch.manual_seed(0)
    model = ARCHITECTURES[cfg.model.arch].build(cfg, vocab, False,
                                                MoERuntime(MoESettings(capacity_factor=None, eval_capacity_factor=None)))
    model.train()
    tok = torch.randint(0, vocab, (1, tokens))
    pos = torch.arange(tokens).unsqueeze(0)
    with plan.kept_for_backward(model.parameters()) as kept:
        model(tok, pos, None, labels=tok)
    return sum(kept.values()), sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["moeut_dense_244m", "moeut_244m"],
                    help="Presets to count (wider.presets names); the first is the reference of the ratio column.")
    ap.add_argument("--vocab", type=int, default=8000, help="Vocabulary size (MoEUT: 8000; UMoE: 32000).")
    ap.add_argument("--tokens", type=int, default=1024, help="Tokens in the one sequence of the forward.")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.vocab < 2:
        ap.error(f"--tokens {args.tokens} and --vocab {args.vocab} must be positive (vocab >= 2)")

    import patches
    from wider import parallel

    patches.apply_defaults()
    parallel.init_distributed(1)
    rows = [(name, *saved_bytes(name, args.vocab, args.tokens)) for name in args.models]
    print(f"activations kept for the backward, fp32, 1 x {args.tokens} tokens, vocabulary {args.vocab}")
    print(f"{'model':<22} {'params':>10} {'MiB kept':>10} {'vs ' + rows[0][0]:>24}")
    for name, kept, n in rows:
        print(f"{name:<22} {n / 1e6:>9.2f}M {kept / 2**20:>10.1f} {kept / rows[0][1]:>23.2f}x")
    parallel.destroy()


if __name__ == "__main__":
    main()
