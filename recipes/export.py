r"""Export a training checkpoint as a portable release directory (no DeepSpeed or process group to load it).

    # the latest complete checkpoint of a run (any ep_size, data-parallel size, ZeRO 0-2, fp32 or bf16), on CPU:
    python recipes/export.py --source runs/widenet_smoke --output releases/widenet_smoke
    # one checkpoint, bf16 weights (half the size), replacing an earlier export:
    python recipes/export.py --source runs/widenet_b/checkpoints/step_00020000 --output releases/widenet_b \
        --dtype bf16 --force
    # with the Adam states and LR-scheduler state too:
    python recipes/export.py --source runs/gpt_smoke --output releases/gpt_smoke --with-optimizer

The release holds model.safetensors, config.json (run config + "moe" block), tokenizer.model (+ tokenizer.json),
metadata.json and README.md; load it with `wider.from_pretrained(DIR, device="cpu" | "cuda")`. It is written to
a temporary directory and moved into place at the end (a crash or Ctrl-C leaves no partial release).
Exit status: 0 written, 2 bad input (a missing, incomplete or damaged checkpoint, an existing --output).
"""

import sys

from wider.commands.export import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
