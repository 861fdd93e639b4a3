"""Image classification with a Vision Transformer (DESIGN 5.8): ViT, ViT-MoE or WideNet on an image folder (one
subfolder of JPEG / PNG images per class), the official WideNet ImageNet recipe's augmentations, top-1 / top-5.

CPU smoke (2 ranks; scikit-learn's digits: python data_prep/prepare_embedded.py --task image_classification):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/train_vit.py --preset widenet_vit_smoke
ImageNet-1K on 8 GPUs (train/ and val/ in ImageNet's class-folder layout), experts over 4 ranks:
    deepspeed --num_gpus 8 recipes/train_vit.py --preset widenet_vit_b16 --train-data data/imagenet/train \
        --valid-data data/imagenet/val --ds-set moe.ep_size=4 --resume auto
Every flag: python recipes/train_vit.py --help
"""

import sys

from wider.recipe import main

if __name__ == "__main__":
    sys.exit(main(None, __doc__, task="image_classification"))
