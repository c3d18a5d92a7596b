"""The model: a pre-norm transformer encoder with a continuous or a softmax head.

``build_model(cfg, vocab_size, target_table=None)`` is the one constructor; evaluation, export and
fine-tuning build the same module and load a consolidated state dict into it.
"""
from __future__ import annotations

import torch

from pretrain.model.encoder import Encoder
from pretrain.model.heads import ContinuousHead, SoftmaxHead
from pretrain.model.objectives import IGNORE_INDEX, Objective, batch_generator
from pretrain.model.pretrain_model import PretrainModel

__all__ = ["IGNORE_INDEX", "Objective", "PretrainModel", "batch_generator", "build_model"]


def build_model(cfg, vocab_size: int, target_table: torch.Tensor | None = None, *,
                special_ids: dict | None = None) -> PretrainModel:
    """A PretrainModel from the `model`, `loss` and `targets` sections of a Config.

    target_table [V, D] (unit rows) is required for the continuous head's loss, for
    model.input_embedding=targets and for model.init_embeddings_from_targets; special_ids default to
    those of docs/INTERFACES.md.
    """
    mcfg = cfg.model
    if target_table is not None and target_table.shape[0] != vocab_size:
        raise ValueError(f"target table has {target_table.shape[0]} rows but the vocabulary has {vocab_size} pieces; "
                         "rebuild the targets for this tokenizer (pretrain targets)")
    if mcfg.input_embedding == "targets" and target_table is None:
        raise ValueError("model.input_embedding=targets needs the target table (build it with `pretrain targets`)")
    # With learned targets, target_table is the initial (source) table: the input stays on it.
    encoder = Encoder(vocab_size, mcfg.d_model, mcfg.n_layers, mcfg.n_heads, mcfg.d_ff, mcfg.max_seq_len,
                      mcfg.dropout, causal=mcfg.objective == "causal", sparse_embedding=cfg.train.sparse_embedding,
                      input_table=target_table if mcfg.input_embedding == "targets" else None)
    if mcfg.init_embeddings_from_targets and mcfg.input_embedding == "learned":
        if target_table is None:
            raise ValueError("model.init_embeddings_from_targets needs the target table (build it with `pretrain targets`)")
        init_embeddings_from_table(encoder.embed.tok_emb.weight, target_table, seed=cfg.train.seed)
    learned = None
    if mcfg.head == "continuous":
        dim = target_table.shape[1] if target_table is not None else cfg.targets.dim
        head = ContinuousHead(mcfg.d_model, dim)
        if cfg.targets.learned:
            if target_table is None:
                raise ValueError("targets.learned needs an initial target table")
            from pretrain.targets.learned import LearnedTargets

            learned = LearnedTargets.from_config(cfg.targets, target_table, sparse_grad=cfg.train.sparse_embedding)
    else:
        head = SoftmaxHead(mcfg.d_model, vocab_size, tied_embedding=encoder.embed.tok_emb if mcfg.tie_softmax else None)
    objective = Objective(mcfg.objective, vocab_size, mcfg.mask_prob, special_ids)
    return PretrainModel(encoder, head, objective, cfg.loss, target_table=target_table, learned_targets=learned)


@torch.no_grad()
def init_embeddings_from_table(weight: torch.Tensor, table: torch.Tensor, seed: int) -> None:
    """Input embeddings from the (unit-row) target table, scaled to the random init's row norm.

    If the widths differ, a fixed random Gaussian projection D -> d_model maps the rows (it keeps
    their angles approximately, Johnson-Lindenstrauss).
    """
    vectors = table.float()
    if vectors.shape[1] != weight.shape[1]:
        gen = torch.Generator().manual_seed(seed)
        vectors = vectors @ torch.randn(vectors.shape[1], weight.shape[1], generator=gen)
    vectors = torch.nn.functional.normalize(vectors, dim=1)
    weight.copy_(vectors * 0.02 * weight.shape[1] ** 0.5)
