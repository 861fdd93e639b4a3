"""Export a training checkpoint as a portable release directory (no DeepSpeed or process group to load it).

The release holds model.safetensors, config.json (run config + "moe" block), tokenizer.model (+ tokenizer.json),
metadata.json and README.md; load it with `wider.from_pretrained(DIR, device="cpu" | "cuda")`. It is written to
a temporary directory and moved into place at the end (a crash or Ctrl-C leaves no partial release).
Exit status: 0 written, 2 bad input (a missing, incomplete or damaged checkpoint, an existing --output).
Launch lines: recipes/export.py (also the console command wider-export).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None, description: str = __doc__) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="A run directory (its latest complete checkpoint is exported) or one checkpoint directory "
                        "RUN_DIR/checkpoints/step_XXXXXXXX.")
    p.add_argument("--output", required=True, help="The release directory to write (must not exist unless --force).")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="Precision of model.safetensors, cast from the fp32 master weights (default fp32; bf16 "
                        "halves the file).")
    p.add_argument("--force", action="store_true", help="Replace an existing --output directory.")
    p.add_argument("--with-optimizer", action="store_true",
                   help="Also write optimizer.safetensors (Adam exp_avg / exp_avg_sq by parameter name, fp32) and "
                        "trainer_state.json (Adam step, LR-scheduler state).")
    p.add_argument("--no-progress", action="store_true", help="No progress bars (they go to stderr).")
    return p.parse_args(argv)


def main(argv=None, description: str = __doc__) -> int:
    """description: the --help text (recipes/export.py passes its docstring, with the launch lines)."""
    args = parse_args(argv, description)
    from wider.recipe import quiet_libraries

    quiet_libraries()
    from wider.checkpoint import CheckpointError, export

    try:
        export(args.source, args.output, dtype=args.dtype, force=args.force, with_optimizer=args.with_optimizer,
               progress=not args.no_progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.output}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
