"""ALBERT-style pretraining: masked-LM + sentence-order prediction on a bidirectional encoder (DESIGN 5.8). Any
architecture with encoder blocks: ALBERT (albert_base), BERT (bert_base), WideNet (widenet_mlm_4e / _8e / _16e).

CPU smoke (2 ranks on gloo, one thread each; the embedded verses: python data_prep/prepare_embedded.py --task masked_lm):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/pretrain_mlm.py --preset widenet_mlm_smoke
One node, 8 GPUs, a sentence-level corpus (data_prep/preprocess_data.py --sentences lines) and its tokenizer:
    deepspeed --num_gpus 8 recipes/pretrain_mlm.py --preset widenet_mlm_8e --data-path data/wiki_sentence_document \
        --tokenizer data/wiki.model --run-dir runs/widenet_mlm_8e
Experts over 4 ranks, resuming after preemption:
    deepspeed --num_gpus 8 recipes/pretrain_mlm.py --preset widenet_mlm_16e --ds-set moe.ep_size=4 --resume auto
Every flag: python recipes/pretrain_mlm.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main(None, __doc__, task="masked_lm"))
