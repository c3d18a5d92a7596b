"""Pre-norm transformer encoder (nanoGPT-style, readable top to bottom).

Attention is plain Linear + F.scaled_dot_product_attention, not nn.MultiheadAttention (whose fused
in-projection breaks under ZeRO-3 partitioning). Tokens attend only within their own document
(``doc_ids``), so packed sequences do not leak context across documents; the causal objective adds
the usual lower-triangular mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask (True = may attend): same document, and not the future if causal.

    Padding carries doc id -1, so pad queries attend to pad keys only: no row is ever empty (an
    empty row would make softmax NaN), and real tokens never see padding.
    """
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    if causal:
        length = doc_ids.shape[1]
        same_doc = same_doc & torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return same_doc[:, None]


def doc_ids_from_padding(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """One document per row, padding marked -1: for inputs that come without doc_ids."""
    return torch.where(input_ids == pad_id, -1, 0)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # [B, L, H*d] -> [B, H, L, d]
        q, k, v = (t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), mask)
        return x + self.mlp(self.ln_mlp(x))


class Embeddings(nn.Module):
    """Token + learned absolute position embeddings.

    The token vectors come from a learned V x d_model table (``tok_emb``), or, given ``input_table``
    (model.input_embedding=targets), from the frozen target table (V x D unit rows, a non-persistent
    buffer: not in the checkpoint, no gradient, no optimizer state) through ``adapter``, a learned
    D -> d_model linear map. The adapter has no bias (the position embeddings already add a learned
    vector at every position) and no LayerNorm (the first block normalises its input; a plain linear
    map also lets export fold it into an ordinary table, ``token_table``). Its GPT-2 init N(0, 0.02)
    on unit rows gives token vectors of the learned table's scale (std 0.02 per component).

    sparse_tokens: the learned table's gradient is row-sparse (only the batch's ids), so the optimizer
    can update those rows alone (pretrain.engine.optim.RowSparseAdamW) instead of all V of them.
    """

    def __init__(self, vocab_size: int, d_model: int, max_seq_len: int, dropout: float,
                 sparse_tokens: bool = False, input_table: torch.Tensor | None = None) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.register_buffer("input_table", input_table, persistent=False)
        if input_table is None:
            self.tok_emb = nn.Embedding(vocab_size, d_model, sparse=sparse_tokens)
        else:
            self.adapter = nn.Linear(input_table.shape[1], d_model, bias=False)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)

    def token_vectors(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.input_table is None:
            return self.tok_emb(input_ids)
        # ZeRO-3 casts parameters to bf16 but leaves buffers as they are: the rows follow the adapter.
        return self.adapter(F.embedding(input_ids, self.input_table).to(self.adapter.weight.dtype))

    @torch.no_grad()
    def token_table(self) -> torch.Tensor:
        """Every token's vector [V, d_model]: what an ordinary ``tok_emb`` would hold (used by export)."""
        if self.input_table is None:
            return self.tok_emb.weight.detach()
        return self.adapter(self.input_table.to(self.adapter.weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"input has {length} positions but model.max_seq_len is {self.max_seq_len}")
        positions = torch.arange(length, device=input_ids.device)
        return self.drop(self.token_vectors(input_ids) + self.pos_emb(positions))


class Encoder(nn.Module):
    """Embeddings -> n pre-norm blocks -> final LayerNorm."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 max_seq_len: int, dropout: float, causal: bool, sparse_embedding: bool = False,
                 input_table: torch.Tensor | None = None) -> None:
        super().__init__()
        self.causal = causal
        self.embed = Embeddings(vocab_size, d_model, max_seq_len, dropout, sparse_tokens=sparse_embedding,
                                input_table=input_table)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 init: N(0, 0.02), residual output projections scaled down by depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(self.blocks)))
            elif p.ndim == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        mask = attention_mask(doc_ids, self.causal)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)
