"""Derived quantities of a preset, without a process group and without allocating the model.

    python -m wider.info --preset gpt_350m
    python -m wider.info --preset gpt_smoke --num-layers 8 --json
    python -m wider.info --preset widenet_b --plan --world-size 8 --ds-set moe.ep_size=4

Parameters come from each architecture's closed-form counter (a test checks it against the built model);
the vocabulary is the tokenizer's when the file exists, else --vocab-size, else 8000 (as stated).

--plan adds a per-rank memory estimate (wider/memory_plan.py) for a launch of --world-size ranks (default 1): the
ZeRO stage and precision come from the config's ds_config (--ds-config, --ds-set zero_optimization.stage=2),
ep_size from its "moe" block (--ds-set moe.ep_size=4), tp from --tensor-parallel, micro-batch, sequence length
and recompute from the config. It prints the layout and assumptions, then a table of parameters, gradients,
fp32 master weights and Adam states for ZeRO-0 / 1 / 2 (the run's stage marked *), activations with and
without recompute, logits, all-to-all buffers, gradient memory in the backward, the optimizer step's
temporaries, the two candidate peaks and the total, in human units and in bytes, then the formulas.
An impossible layout (tp not dividing the world, ep not dividing the experts or dp, a batch that does not
split) ends with the run's own error message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def describe(cfg) -> dict:
    """Parameters (unique, non-embedding, active), FLOPs and tokens of a config, from the architecture's counter."""
    from wider.data import planning_vocab_size
    from wider.models import ARCHITECTURES, training_flops_per_token

    m, t = cfg.model, cfg.train
    vocab, vocab_source = planning_vocab_size(cfg)
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
    from wider.recipe import quiet_libraries

    quiet_libraries()  # nothing but the answer on stdout (--json | jq)
    from wider import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        as_json, want_plan, world_size, argv = _own_flags(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = cli.parse(argv, description=__doc__ + "\n--json prints one JSON object; --plan [--world-size N] adds "
                                                "the per-rank memory plan.")
    info = describe(cfg)
    plan = None
    if want_plan:
        from wider import memory_plan
        from wider.config import ConfigError

        try:
            plan = memory_plan.build(cfg, world_size, info["vocab_size"])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if as_json:
        print(json.dumps({**info, "plan": plan} if plan is not None else info, indent=2))
        return 0
    from wider.training.metrics import fmt_count

    for k, v in info.items():
        shown = fmt_count(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) >= 1e4 else v
        print(f"{k:<24} {shown}" + (f"   ({v:,})" if isinstance(v, int) and v >= 1e4 else ""))
    if plan is not None:
        print()
        print(memory_plan.format_plan(plan, cfg))
    return 0


def _own_flags(argv: list) -> tuple[bool, bool, int, list]:
    """Take --json, --plan and --world-size N out of argv; the rest is the config's (wider.cli)."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    own.add_argument("--json", action="store_true")
    own.add_argument("--plan", action="store_true")
    own.add_argument("--world-size", type=int, default=None)
    try:
        args, rest = own.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"--world-size needs a positive integer (ranks in the launch): {e}") from None
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size needs a positive integer (ranks in the launch), got {args.world_size}")
    if args.world_size is not None and not args.plan:
        raise ValueError("--world-size is used by the memory plan; add --plan")
    return args.json, args.plan, args.world_size or 1, rest


if __name__ == "__main__":
    sys.exit(main())
