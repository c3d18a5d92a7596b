"""The pretraining model: encoder + head + loss, behind one module that DeepSpeed wraps.

``model(batch)`` takes a loader batch ({"input_ids", "doc_ids"}, optionally "labels" already made by
the objective) and returns {"loss", ...metrics}. ``encode`` and ``predict`` are for evaluation and
fine-tuning on a plain module. The heads only see the positions that have a target (15% of them for
the masked objective), for both heads alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.encoder import Encoder, doc_ids_from_padding
from pretrain.model.heads import AdaptiveSoftmaxHead, ContinuousHead, SoftmaxHead
from pretrain.model.objectives import IGNORE_INDEX, Objective
from pretrain_kernels import continuous_loss, fused_linear_continuous_loss, loss_params


class PretrainModel(nn.Module):
    def __init__(self, encoder: Encoder, head: nn.Module, objective: Objective, loss_cfg,
                 target_table: torch.Tensor | None = None, learned_targets: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.objective = objective
        self.continuous = isinstance(head, ContinuousHead)
        self.loss_kind = loss_cfg.name
        self.loss_impl = loss_cfg.impl
        self.fused_head = loss_cfg.fused_head
        self.chunk_size = loss_cfg.chunk_size
        self.loss_params = loss_params(loss_cfg) if self.continuous else {}
        self.learned_targets = learned_targets
        # Frozen targets are a non-persistent buffer: they follow the module to its device, but the
        # checkpoint does not carry a second copy of the table (its sha256 is in meta.json).
        frozen = target_table if self.continuous and learned_targets is None else None
        self.register_buffer("frozen_table", frozen, persistent=False)

    # Inference -----------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.objective.special_ids["pad"]

    @property
    def target_table(self) -> torch.Tensor | None:
        """The table decoding searches (unit rows), or None for the softmax head."""
        if not self.continuous:
            return None
        if self.learned_targets is not None:
            return self.learned_targets.table_for_decoding()
        return self.frozen_table

    def encode(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, L, H]; without doc_ids each row is one document and pad_id is padding."""
        if doc_ids is None:
            doc_ids = doc_ids_from_padding(input_ids, self.pad_id)
        return self.encoder(input_ids, doc_ids)

    def predict(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted target embeddings [B, L, D] (continuous) or logits [B, L, V] (softmax)."""
        return self.head(self.encode(input_ids, doc_ids))

    # Training ------------------------------------------------------------------------------------
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if "labels" not in batch:
            batch = self.objective(batch, generator)
        hidden = self.encode(batch["input_ids"], batch["doc_ids"])
        labels = batch["labels"].reshape(-1)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        if self.continuous and self.fused_head:
            return self._fused_continuous_loss(hidden, labels[rows])
        if isinstance(self.head, AdaptiveSoftmaxHead):  # its own loss: never the full V logits in training
            return self.head.loss(hidden, labels[rows])
        return self.loss_from_outputs(self.head(hidden), labels[rows])

    def loss_table(self) -> torch.Tensor:
        if self.learned_targets is not None:
            return self.learned_targets.table_for_loss()
        if self.frozen_table is None:
            raise ValueError("the continuous head needs a target table: build_model(cfg, vocab_size, target_table=...)")
        return self.frozen_table

    def loss_from_outputs(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
        """Loss and metrics of head outputs [N, D or V] at target positions with ids labels [N]."""
        if not self.continuous:
            loss = F.cross_entropy(outputs.float(), labels) if labels.numel() else outputs.sum() * 0.0
            with torch.no_grad():
                accuracy = (outputs.argmax(-1) == labels).float().mean() if labels.numel() else outputs.new_zeros(())
            return {"loss": loss, "accuracy": accuracy, "n_targets": labels.new_tensor(labels.numel())}
        table = self.loss_table()
        loss = continuous_loss(outputs, labels, table, self.loss_kind, impl=self.loss_impl, **self.loss_params)
        if self.learned_targets is not None:
            loss = loss + self.learned_targets.extra_loss(outputs, labels)
        return {"loss": loss, **self._continuous_metrics(outputs, labels, table)}

    def _fused_continuous_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
        table = self.loss_table()
        proj = self.head.proj
        loss = fused_linear_continuous_loss(hidden, proj.weight, proj.bias, labels, table, self.loss_kind,
                                            self.chunk_size, impl=self.loss_impl, **self.loss_params)
        with torch.no_grad():
            pred = proj(hidden)
        if self.learned_targets is not None:
            # The remedy needs the predictions with their gradient: recompute them outside the fused op.
            loss = loss + self.learned_targets.extra_loss(proj(hidden), labels)
        return {"loss": loss, **self._continuous_metrics(pred, labels, table)}

    @torch.no_grad()
    def _continuous_metrics(self, pred: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> dict:
        if labels.numel() == 0:
            zero = pred.new_zeros((), dtype=torch.float32)
            return {"mean_cos": zero, "mean_pred_norm": zero, "n_targets": labels.new_tensor(0)}
        pred = pred.float()
        cos = F.cosine_similarity(pred, table[labels].float(), dim=-1)
        return {"mean_cos": cos.mean(), "mean_pred_norm": pred.norm(dim=-1).mean(), "n_targets": labels.new_tensor(labels.numel())}

    # Engine hooks --------------------------------------------------------------------------------
    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Parameters used outside their owning module's forward (ZeRO-3 must gather them for us)."""
        pairs = []
        if isinstance(self.head, SoftmaxHead) and self.head.tied:
            pairs.append((self.head, self.encoder.embed.tok_emb.weight))
        if self.learned_targets is not None:
            pairs.append((self, self.learned_targets.weight))
        return pairs

    def param_groups(self, weight_decay: float, lr: float) -> list[dict]:
        """AdamW groups: decay matrices, not biases/norms; the learned table has its own group."""
        table_params = set()
        groups = []
        if self.learned_targets is not None:
            for group in self.learned_targets.param_groups(lr):
                groups.append({**group, "lr_scale": group["lr"] / lr})
                table_params.update(id(p) for p in group["params"])
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad and id(p) not in table_params:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups.insert(0, {"params": no_decay, "weight_decay": 0.0, "lr": lr, "lr_scale": 1.0})
        groups.insert(0, {"params": decay, "weight_decay": weight_decay, "lr": lr, "lr_scale": 1.0})
        return groups

    def after_optimizer_step(self) -> None:
        if self.learned_targets is not None:
            self.learned_targets.after_step()
