"""Fine-tune a text encoder for sequence or sentence-pair classification (DESIGN 5.8): GLUE's TSV files or JSONL,
accuracy / F1 / Matthews correlation on the held-out file, results in summary.json, metrics.jsonl and TensorBoard.

CPU smoke: the embedded verse-source task from the masked-LM smoke run (python data_prep/prepare_embedded.py
--task classification; recipes/pretrain_mlm.py --preset widenet_mlm_smoke first):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/finetune.py --preset widenet_finetune_smoke \
        --init-from runs/widenet_mlm_smoke
GLUE RTE on one GPU from a pretrained WideNet (the GLUE directory as downloaded, sentence pairs):
    deepspeed --num_gpus 1 recipes/finetune.py --config runs/widenet_mlm_8e/config.json --task classification \
        --init-from runs/widenet_mlm_8e --train-data glue/RTE/train.tsv --valid-data glue/RTE/dev.tsv \
        --text-columns sentence1 sentence2 --labels entailment not_entailment --run-dir runs/rte
Every flag: python recipes/finetune.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main(None, __doc__, task="classification"))
