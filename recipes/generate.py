r"""Sample text from a checkpoint, with a key/value cache (wider/generation.py). One process, CPU or GPU; every
architecture of the registry (dense GPT, Switch / GLaM, WideNet, MoEUT, UMoE).

CPU (after ./run.sh, which trains runs/default):
    python recipes/generate.py --checkpoint runs/default --prompt "In the beginning" --max-new-tokens 60
    python recipes/generate.py --checkpoint runs/default --prompt "And God said" --num-samples 4 \
        --temperature 0.8 --top-p 0.9 --seed 7 --output samples.jsonl
Greedy, every prompt of a file (one per line, or JSONL with --json-key), on a GPU in bf16:
    python recipes/generate.py --checkpoint runs/gpt350m/checkpoints/step_00010000 --prompt-file prompts.txt \
        --temperature 0 --device cuda --dtype bf16
Compare with recomputing the whole sequence at every step:
    python recipes/generate.py --checkpoint runs/default --prompt "In the beginning" --no-cache
Every flag: python recipes/generate.py --help
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    from wider.cli import add_model_arguments

    add_model_arguments(g)
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence at every step instead of using the key/value cache (slower; "
                        "for comparison, and for an architecture without a cache)")
    s = p.add_argument_group("prompts")
    s.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt to continue; repeatable")
    s.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="more prompts: one per non-empty line of a text file (.txt, .txt.gz, .txt.xz), or one per "
                        "line of a JSONL file (.jsonl, .jsonl.gz, ...) under --json-key")
    s.add_argument("--json-key", default="text", help="JSONL prompt files: the field holding the prompt (default text)")
    s.add_argument("--no-eod-prefix", action="store_true",
                   help="do not start the prompt with the end-of-document id (by default it does: in training a "
                        "document starts right after the previous one's end-of-document token)")
    d = p.add_argument_group("sampling")
    d.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="at most N new tokens per sample (default 64); prompt + N must fit the model's seq_length")
    d.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits before sampling; 0 = greedy (argmax; top-k, top-p and seed then do "
                        "not matter); default 1")
    d.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most probable tokens only; 0 = off (default)")
    d.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: among the smallest set of most probable tokens whose probability "
                        "reaches P, in (0, 1]; 1 = off (default). Applied after --temperature and --top-k")
    d.add_argument("--seed", type=int, default=1234,
                   help="seed of the sampling generator; prompt i uses seed + i, so a prompt's samples reproduce "
                        "whatever else is in the file (default 1234)")
    d.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt, drawn as one batch (default 1)")
    d.add_argument("--ignore-eod", action="store_true",
                   help="keep sampling past the end-of-document token (by default a sample stops there)")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, metavar="FILE",
                   help="also write the samples as JSONL (one line per sample: prompt, completion, token ids, why "
                        "it stopped, seed, settings), written atomically")
    return p


def main(argv=None) -> int:
    from wider.recipe import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    import patches

    patches.apply_defaults()  # includes kv_cache_cpu: megatron's inference KV buffers on the model's device
    from wider import generation

    return generation.run(args)


if __name__ == "__main__":
    sys.exit(main())
