"""Hugging Face `transformers` classes for a softmax-free export (copied into every export).

`pretrain export` writes this file next to the weights as modeling_softmaxfree.py, and config.json's
`auto_map` points at it, so that

    AutoModel.from_pretrained(EXPORT_DIR, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(EXPORT_DIR, trust_remote_code=True, num_labels=5)

build the encoder of pretrain.model.encoder and load model.safetensors into it. It must stay
self-contained (torch and transformers only): the people loading an export need not install
`pretrain`. tests/downstream/test_downstream_hf.py checks that its hidden states equal load_encoder's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput


class SoftmaxFreeConfig(PretrainedConfig):
    model_type = "softmaxfree-encoder"

    def __init__(self, vocab_size: int = 1000, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 2, intermediate_size: int = 256, max_position_embeddings: int = 64,
                 is_causal: bool = False, pad_token_id: int = 0, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.is_causal = is_causal
        super().__init__(pad_token_id=pad_token_id, **kwargs)


# The encoder, as pretrain.model.encoder builds it (same parameter names, same arithmetic) -------

class _SelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class _MLP(nn.Module):
    def __init__(self, width: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, d_ff)
        self.proj = nn.Linear(d_ff, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class _Block(nn.Module):
    def __init__(self, width: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, n_heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = _MLP(width, d_ff)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), mask)
        return x + self.mlp(self.ln_mlp(x))


class _Embeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_positions: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(max_positions, width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(f"input has {input_ids.shape[1]} positions but the model has {self.pos_emb.num_embeddings}: "
                             "truncate (tokenizer(..., truncation=True)) or encode windows with pretrain's model.embed")
        return self.tok_emb(input_ids) + self.pos_emb(torch.arange(input_ids.shape[1], device=input_ids.device))


class _Encoder(nn.Module):
    def __init__(self, config: SoftmaxFreeConfig) -> None:
        super().__init__()
        self.causal = config.is_causal
        self.embed = _Embeddings(config.vocab_size, config.hidden_size, config.max_position_embeddings)
        self.blocks = nn.ModuleList(_Block(config.hidden_size, config.num_attention_heads, config.intermediate_size)
                                    for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Padding is its own "document" (-1), as in pretraining: pad queries attend to pad keys only,
        # so no attention row is empty, and real tokens never see padding.
        doc_ids = torch.where(attention_mask.bool(), 0, -1)
        mask = doc_ids[:, :, None] == doc_ids[:, None, :]
        if self.causal:
            mask = mask & torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool, device=mask.device).tril()
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.norm(x)


# transformers classes ---------------------------------------------------------------------------

class SoftmaxFreePreTrainedModel(PreTrainedModel):
    config_class = SoftmaxFreeConfig
    base_model_prefix = "model"
    # model.safetensors also holds the pretraining head (and maybe a learned target table)
    _keys_to_ignore_on_load_unexpected = [r"^head\.", r"^learned_targets\.", r"^objective\."]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SoftmaxFreeModel(SoftmaxFreePreTrainedModel):
    """The encoder: last_hidden_state [B, L, H] equals pretrain's model.encode on the same ids."""

    def __init__(self, config: SoftmaxFreeConfig) -> None:
        super().__init__(config)
        self.encoder = _Encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.embed.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.embed.tok_emb = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        return BaseModelOutput(last_hidden_state=self.encoder(input_ids, attention_mask))


class SoftmaxFreeForSequenceClassification(SoftmaxFreePreTrainedModel):
    """Mean over real tokens -> dropout -> linear: the classifier `pretrain finetune` trains."""

    def __init__(self, config: SoftmaxFreeConfig) -> None:
        super().__init__(config)
        self.model = SoftmaxFreeModel(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.1)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class SoftmaxFreeTokenizer(PreTrainedTokenizer):
    """SentencePiece itself behind the transformers tokenizer API: the fallback an export uses when
    its SentencePiece model does not convert exactly to a fast tokenizer (e.g. a bpe model). Every
    text ends with eos, as pretraining documents do."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs) -> None:
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        eos = [self.eos_token_id]
        return token_ids_0 + eos if token_ids_1 is None else token_ids_0 + eos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [int(t in self.all_special_ids) for t in token_ids_0]
        mask = [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2 if pair else 1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        import os
        import shutil

        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
