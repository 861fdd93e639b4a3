"""Pretrain UMoE: pre-mixing attention whose experts are the FFN's, one expert bank per layer (DESIGN 5.7).

CPU smoke (2 ranks on gloo, one thread each):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_umoe.py --preset umoe_smoke
One node, the paper's small model and its baselines (the same recipe; --umoe-mode moves between the ablations):
    deepspeed --num_gpus 8 recipes/pretrain_umoe.py --preset umoe_small --data-path data/my_text_document \
        --tokenizer data/tok32k.model --run-dir runs/umoe_small
    deepspeed --num_gpus 8 recipes/pretrain_umoe.py --preset umoe_small_ffn ...      # FFN-MoE baseline
    deepspeed --num_gpus 8 recipes/pretrain_gpt.py --preset umoe_small_dense ...     # dense baseline
Expert parallelism: add --ds-set moe.ep_size=8. Every flag: python recipes/pretrain_umoe.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main("umoe", __doc__))
