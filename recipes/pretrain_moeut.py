"""Pretrain MoEUT: sigma-MoE FFN, SwitchHead attention, G distinct layers repeated, peri-LayerNorm (DESIGN 5.6).

CPU smoke (2 ranks on gloo, one thread each):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_moeut.py --preset moeut_smoke
One GPU, the paper's 244M model:
    deepspeed --num_gpus 1 recipes/pretrain_moeut.py --preset moeut_244m --data-path data/my_text_document \
        --tokenizer data/tok8k.model --run-dir runs/moeut_244m
Every flag: python recipes/pretrain_moeut.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main("moeut", __doc__))
