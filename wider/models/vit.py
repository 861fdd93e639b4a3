"""The Vision Transformer of the image-classification task (DESIGN 5.8; Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"), around any architecture's blocks: ViT (gpt), ViT-MoE (gpt_moe), WideNet (widenet: one attention and
one MoE shared by every block, a LayerNorm pair per block, Xue et al. 2022).

    images [B, C, H, W] -> patch embedding (a P x P convolution with stride P: C P^2 x D weights, as the official
                           WideNet code's Conv2D) -> [class token; N patches] + learned positions (N + 1) x D
                        -> dropout -> the architecture's blocks, bidirectional (wider.models.blocks) -> final LayerNorm
                        -> the class token -> representation (megatron-core's Pooler: dense D x D + tanh, the
                           official code's --use_representation, which its ImageNet runs pass) -> head D x C

Shape suffixes: B images, C channels, N patches, S = N + 1 positions, D hidden size, K classes.

Differences from the official WideNet code (XueFuzhao/WideNet_Code, widenet/modeling.py): a learned class token
initialised at zero (the official PatchEncoder prepends a constant zero vector, and its MoE configs pool the patches
by their mean, `classifier: gap`); the head reads the class token as ViT-B/16's configuration does. Position
embeddings N(0, 0.02) as the official PatchEncoder.
"""

from __future__ import annotations

import torch

from wider.config import RunConfig
from wider.models.gpt import ParamCount, transformer_config


class VisionTransformer(torch.nn.Module):
    """forward(images [B, C, H, W]) -> logits [B, K]."""

    def __init__(self, cfg: RunConfig, encoder: torch.nn.Module, bf16: bool = False):
        from megatron.core.models.bert.pooler import Pooler
        from megatron.core.transformer.utils import get_linear_layer

        m = cfg.model
        config = transformer_config(m, cfg.train.tensor_parallel, bf16)
        super().__init__()
        self.config = config
        D, P = m.hidden_size, m.patch_size
        self.patches = (m.image_size // P) ** 2
        self.patch_embedding = torch.nn.Conv2d(m.num_channels, D, kernel_size=P, stride=P)
        with torch.no_grad():  # megatron's normal init on the C P^2 x D matrix; zero bias
            config.init_method(self.patch_embedding.weight)
            self.patch_embedding.bias.zero_()
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, D))
        self.position_embeddings = torch.nn.Parameter(torch.empty(self.patches + 1, D).normal_(0.0, 0.02))
        self.embedding_dropout = torch.nn.Dropout(m.hidden_dropout)
        self.encoder = encoder
        self.pooler = Pooler(D, config.init_method, config)
        self.head = get_linear_layer(D, m.num_labels, config.init_method, config.perform_initialization)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        x_BND = self.patch_embedding(images).flatten(2).transpose(1, 2)
        if x_BND.shape[1] != self.patches:
            raise ValueError(f"images of {tuple(images.shape[-2:])} pixels give {x_BND.shape[1]} patches; the model "
                             f"was built for {self.patches} (model.image_size / patch_size)")
        x_BSD = torch.cat([self.class_token.expand(B, 1, -1).to(x_BND.dtype), x_BND], dim=1)
        x_BSD = self.embedding_dropout(x_BSD + self.position_embeddings.to(x_BND.dtype))
        h_SBD = self.encoder(hidden_states=x_BSD.transpose(0, 1).contiguous(), attention_mask=None)
        return self.head(self.pooler(h_SBD, 0))


def build_vit(cfg: RunConfig, vocab_size: int, bf16: bool, encoder: torch.nn.Module) -> VisionTransformer:
    return VisionTransformer(cfg, encoder, bf16)


def count_vit(cfg: RunConfig, vocab_size: int, blocks: ParamCount) -> ParamCount:
    """Patch embedding, class token and positions (the 'embedding'), the architecture's blocks (the non-embedding
    part of its language-model count), the representation layer and the head."""
    m = cfg.model
    D, P, K = m.hidden_size, m.patch_size, m.num_labels
    N = (m.image_size // P) ** 2
    embedding = m.num_channels * P * P * D + D + D + (N + 1) * D
    heads = D * D + D + D * K + K
    total = embedding + blocks.non_embedding + heads
    active = embedding + (blocks.active - blocks.embedding) + heads
    return ParamCount(total=total, embedding=embedding, active=active,
                      extra={**{k: v for k, v in blocks.extra.items() if k != "padded_vocab"}, "patches": N})
