"""Pretrain the Switch / GLaM baselines: megatron-core GPT with MoE FFNs in every or every other block.

CPU smoke (2 ranks on gloo, one thread each):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_gpt_moe.py --preset switch_smoke
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_gpt_moe.py --preset glam_smoke
One GPU:
    deepspeed --num_gpus 1 recipes/pretrain_gpt_moe.py --preset switch_125m --data-path data/my_text_document \
        --tokenizer data/tok.model
One node, 8 GPUs, 16 experts split over 8 ranks:
    deepspeed --num_gpus 8 recipes/pretrain_gpt_moe.py --preset glam_125m --ds-set moe.ep_size=8
Multi-node, resuming after preemption:
    deepspeed --hostfile hostfile recipes/pretrain_gpt_moe.py --preset switch_125m --ds-set moe.ep_size=8 \
        --resume auto
Every flag: python recipes/pretrain_gpt_moe.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main("gpt_moe", __doc__))
