"""Pretrain WideNet: one attention and one MoE shared by every block, per-block LayerNorms (DESIGN 5.4).

CPU smoke (2 ranks on gloo, one thread each), the default run of ./run.sh:
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_widenet.py --preset widenet_smoke
One GPU:
    deepspeed --num_gpus 1 recipes/pretrain_widenet.py --preset widenet_b --data-path data/my_text_document \
        --tokenizer data/tok.model --run-dir runs/widenet_b
One node, 8 GPUs, experts split over 4 ranks (expert parallelism; ZeRO-1 over the rest):
    deepspeed --num_gpus 8 recipes/pretrain_widenet.py --preset widenet_l --ds-set moe.ep_size=4
Multi-node with expert parallelism, resuming after preemption:
    deepspeed --hostfile hostfile recipes/pretrain_widenet.py --preset widenet_h --ds-set moe.ep_size=4 \
        --resume auto
Every flag: python recipes/pretrain_widenet.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main("widenet", __doc__))
