"""The text encoder of the masked-LM and classification tasks (DESIGN 5.8): ALBERT (Lan et al. 2020, "ALBERT: A Lite
BERT") and BERT (Devlin et al. 2019) on megatron-core pieces, around any architecture's blocks.

    tokens, types -> LanguageModelEmbedding (word V x E, learned positions S x E, 2 token types x E; megatron-core)
                  -> LayerNorm(E) -> projection E -> D (ALBERT's factorized embedding; none when E = D, as BERT)
                  -> the architecture's blocks, bidirectional (wider.models.blocks; WideNet's shared attention + MoE)
                  -> final LayerNorm (the block's)
    masked_lm:      Pooler (megatron-core: [CLS] -> dense D x D -> tanh) -> sentence-order head D x 2;
                    the masked positions -> dense D -> E -> GELU -> LayerNorm(E) -> tied word embedding + bias V
    classification: Pooler -> dropout -> classifier D x num_labels

Shape suffixes: B sequences, S positions, D hidden size, E embedding size, V padded vocabulary, M masked positions,
C classes. megatron's layers run in [S, B, ...].

What comes from megatron-core and what does not: the embedding is megatron-core's LanguageModelEmbedding (with a
config copy whose hidden_size is E, so its tables are E wide), the pooler is its Pooler, the norms are its norm class,
the blocks its TransformerBlock. Its BertModel is not used because its embedding is hidden_size wide and its
BertLMHead is hidden_size -> hidden_size (megatron-core 0.16.1 models/bert): ALBERT's factorized embedding needs a
projection after the embedding and an MLM head that maps D back to E before the tied output layer, and WideNet's
shared blocks need the block built by the architecture. The masked-LM logits are computed only at the masked
positions (M of B x S), not over the whole sequence.

Differences from the papers: pre-LN blocks with a final LayerNorm (megatron-core's BERT; ALBERT and BERT are post-LN);
the embedding LayerNorm after megatron's embedding dropout (the same with dropout 0, ALBERT's setting).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

from wider.config import RunConfig
from wider.models.gpt import ParamCount, gpt_layer_spec, norm_params, padded_vocab_size, transformer_config

TOKEN_TYPES = 2  # segment A and segment B ([CLS] A [SEP] B [SEP])


class TextEncoder(torch.nn.Module):
    """forward(tokens [B, S], types [B, S], padding_mask [B, S] (1 = token, 0 = padding), predict [B, S] bool or None)
    -> masked_lm: (logits at the predicted positions [M, V], sentence-order logits [B, 2]); classification: logits
    [B, C]. `encoder` is the architecture's bidirectional TransformerBlock (wider.models.blocks)."""

    def __init__(self, cfg: RunConfig, vocab_size: int, encoder: torch.nn.Module, bf16: bool = False):
        from megatron.core.models.bert.pooler import Pooler
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
        from megatron.core.transformer.utils import get_linear_layer

        m = cfg.model
        config = transformer_config(m, cfg.train.tensor_parallel, bf16)
        super().__init__()
        self.config = config
        self.task = m.task
        D, E = m.hidden_size, m.embedding_size or m.hidden_size
        # A shallow copy, as wider.models.gpt_moe.dense_ffn does: the embedding reads hidden_size for its width.
        narrow = copy.copy(config)
        narrow.hidden_size = E
        self.embedding = LanguageModelEmbedding(config=narrow, vocab_size=padded_vocab_size(vocab_size, m, 1),
                                                max_sequence_length=m.seq_length,
                                                position_embedding_type="learned_absolute", num_tokentypes=TOKEN_TYPES)
        norm = gpt_layer_spec(m).submodules.input_layernorm  # megatron's norm class: apex when installed, else torch
        self.embedding_norm = norm(config=narrow, hidden_size=E, eps=config.layernorm_epsilon)
        init, perform = config.init_method, config.perform_initialization
        self.embedding_projection = get_linear_layer(E, D, init, perform) if E != D else None
        self.encoder = encoder
        self.pooler = Pooler(D, init, config)
        if m.task == "masked_lm":
            self.mlm_dense = get_linear_layer(D, E, init, perform)
            self.mlm_norm = norm(config=narrow, hidden_size=E, eps=config.layernorm_epsilon)
            self.mlm_bias = torch.nn.Parameter(torch.zeros(self.embedding.word_embeddings.weight.shape[0]))
            self.sop_head = get_linear_layer(D, 2, init, perform)
        else:
            self.classifier_dropout = torch.nn.Dropout(m.hidden_dropout)
            self.classifier = get_linear_layer(D, m.num_labels, init, perform)

    def encode(self, tokens_BS: torch.Tensor, types_BS: torch.Tensor, padding_BS: torch.Tensor) -> torch.Tensor:
        """The final hidden states [S, B, D]."""
        B, S = tokens_BS.shape
        positions_BS = torch.arange(S, device=tokens_BS.device).expand(B, S)
        x_SBE = self.embedding(input_ids=tokens_BS, position_ids=positions_BS, tokentype_ids=types_BS)
        x_SBE = self.embedding_norm(x_SBE)
        x_SBD = self.embedding_projection(x_SBE) if self.embedding_projection is not None else x_SBE
        hide_B11S = (padding_BS == 0)[:, None, None, :]  # megatron's convention: True = this key is hidden
        return self.encoder(hidden_states=x_SBD, attention_mask=hide_B11S)

    def forward(self, tokens: torch.Tensor, types: torch.Tensor, padding_mask: torch.Tensor,
                predict: Optional[torch.Tensor] = None):
        h_SBD = self.encode(tokens, types, padding_mask)
        pooled_BD = self.pooler(h_SBD, 0)  # the [CLS] position
        if self.task == "masked_lm":
            h_MD = h_SBD.transpose(0, 1)[predict]
            z_ME = self.mlm_norm(F.gelu(self.mlm_dense(h_MD)))
            logits_MV = F.linear(z_ME, self.embedding.word_embeddings.weight, self.mlm_bias)
            return logits_MV, self.sop_head(pooled_BD)
        return self.classifier(self.classifier_dropout(pooled_BD))


def build_text_encoder(cfg: RunConfig, vocab_size: int, bf16: bool, encoder: torch.nn.Module) -> TextEncoder:
    return TextEncoder(cfg, vocab_size, encoder, bf16)


def count_text_encoder(cfg: RunConfig, vocab_size: int, blocks: ParamCount) -> ParamCount:
    """The embeddings and heads around the architecture's blocks (`blocks`: the architecture's language-model count,
    whose non-embedding part is its blocks and final norm). The MLM output layer is tied to the word embedding."""
    m = cfg.model
    V = padded_vocab_size(vocab_size, m, 1)
    D, E = m.hidden_size, m.embedding_size or m.hidden_size
    narrow = copy.copy(m)
    narrow.hidden_size = E
    tables = (V + m.seq_length + TOKEN_TYPES) * E
    around = norm_params(narrow) + (E * D + D if E != D else 0) + D * D + D  # embedding norm, projection, pooler
    if m.task == "masked_lm":
        around += D * E + E + norm_params(narrow) + V + 2 * D + 2  # MLM dense, norm, output bias; sentence order
    else:
        around += D * m.num_labels + m.num_labels
    total = tables + around + blocks.non_embedding
    active = tables + around + (blocks.active - blocks.embedding)
    return ParamCount(total=total, embedding=tables, active=active,
                      extra={**{k: v for k, v in blocks.extra.items() if k != "padded_vocab"}, "padded_vocab": V,
                             "embedding_size": E})

