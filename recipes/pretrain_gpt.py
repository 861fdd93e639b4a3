"""Pretrain the dense GPT baseline (megatron-core layers, DeepSpeed engine).

CPU smoke (2 ranks on gloo, one thread each), the default run of ./run.sh:
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_gpt.py --preset gpt_smoke
One GPU node (8 GPUs, bf16 ZeRO-1):
    deepspeed --num_gpus 8 recipes/pretrain_gpt.py --preset gpt_350m --data-path data/my_text_document \
        --tokenizer data/tok.model --run-dir runs/gpt350m
Multi-node with tensor parallelism 2, resuming after preemption:
    deepspeed --hostfile hostfile recipes/pretrain_gpt.py --preset gpt_1b3 --tensor-parallel 2 --resume auto
Every flag: python recipes/pretrain_gpt.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main("gpt", __doc__))
