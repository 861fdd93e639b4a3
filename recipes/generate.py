r"""Sample text from a checkpoint, with a key/value cache (wider/generation.py). One process, CPU or GPU; every
architecture of the registry (dense GPT, Switch / GLaM, WideNet, MoEUT, UMoE).

CPU (after ./run.sh, which trains runs/widenet_smoke (the default preset)):
    python recipes/generate.py --checkpoint runs/widenet_smoke --prompt "In the beginning" --max-new-tokens 60
    python recipes/generate.py --checkpoint runs/widenet_smoke --prompt "And God said" --num-samples 4 \
        --temperature 0.8 --top-p 0.9 --seed 7 --output samples.jsonl
Greedy, every prompt of a file (one per line, or JSONL with --json-key), on a GPU in bf16:
    python recipes/generate.py --checkpoint runs/gpt350m/checkpoints/step_00010000 --prompt-file prompts.txt \
        --temperature 0 --device cuda --dtype bf16
Compare with recomputing the whole sequence at every step:
    python recipes/generate.py --checkpoint runs/widenet_smoke --prompt "In the beginning" --no-cache
Every flag: python recipes/generate.py --help
"""

import sys

from wider.commands.generate import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
