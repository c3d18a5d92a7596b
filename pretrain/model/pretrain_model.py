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
from pretrain.model.windows import (default_stride, document_ids, mean_over_tokens, mean_over_windows, window_batch,
                                    window_starts)
from pretrain_kernels import WHOLE_TABLE_LOSSES, continuous_loss, fused_linear_continuous_loss, loss_params


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
        self.kappa_warmup_steps = loss_cfg.kappa_warmup_steps if self.continuous and self.loss_kind.startswith("vmf") else 0
        self.kappa_scale_start = loss_cfg.kappa_scale_start
        self.optimizer_steps = 0  # for the κ schedule (not checkpointed)
        self.learned_targets = learned_targets
        # Frozen targets are a non-persistent buffer: they follow the module to its device, but the
        # checkpoint does not carry a second copy of the table (its sha256 is in meta.json). When the
        # encoder reads the same table as its input embedding (model.input_embedding=targets), the
        # loss uses the encoder's buffer: one copy in memory, moved once.
        frozen = target_table if self.continuous and learned_targets is None else None
        self.shares_input_table = frozen is not None and encoder.embed.input_table is frozen
        self.register_buffer("_frozen_table", None if self.shares_input_table else frozen, persistent=False)

    @property
    def frozen_table(self) -> torch.Tensor | None:
        return self.encoder.embed.input_table if self.shares_input_table else self._frozen_table

    @frozen_table.setter
    def frozen_table(self, table: torch.Tensor) -> None:  # the pipeline's last stage moves it to its device
        if self.shares_input_table:
            self.encoder.embed.input_table = table
        else:
            self._frozen_table = table

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

    @property
    def max_positions(self) -> int:
        return self.encoder.embed.max_seq_len

    def encode(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, *,
               attention_mask: torch.Tensor | None = None, stride: int | None = None) -> torch.Tensor:
        """Hidden states [B, L, H]. Each row is one document unless doc_ids say otherwise; padding is
        where attention_mask is 0 (or, without a mask, where input_ids == pad_id).

        Rows longer than the model's positions are read in sliding windows (`stride` apart, default
        half a window); a token's state is the mean of its states in the windows that contain it.
        """
        if doc_ids is None:
            doc_ids = doc_ids_from_padding(input_ids, self.pad_id) if attention_mask is None else torch.where(attention_mask.bool(), 0, -1)
        window, length = self.max_positions, input_ids.shape[1]
        if length <= window:
            return self.encoder(input_ids, doc_ids)
        total, covered = None, torch.zeros(length, device=input_ids.device)
        for start in window_starts(length, window, stride or default_stride(window)):
            part = self.encoder(input_ids[:, start : start + window], doc_ids[:, start : start + window])
            total = part.new_zeros(*input_ids.shape, part.shape[-1]) if total is None else total
            total[:, start : start + window] += part
            covered[start : start + window] += 1
        return total / covered.to(total.dtype)[None, :, None]

    @torch.no_grad()
    def embed(self, texts: list[str] | str, *, tokenizer=None, batch_size: int = 32, stride: int | None = None,
              max_windows: int = 0) -> torch.Tensor:
        """One vector per text [N, H]: tokenised as in pretraining (pieces + eos), mean over real tokens;
        a text longer than the model's positions is cut into windows `stride` apart (default half a
        window; at most max_windows of them, evenly spread, if > 0) and its vector is the mean of theirs.
        """
        sp = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        if sp is None:
            raise ValueError("embed needs the SentencePiece tokenizer: load the model with pretrain.load_encoder(EXPORT_DIR) "
                             "(it attaches one), or pass tokenizer=sentencepiece.SentencePieceProcessor(model_file=...)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.empty(0, self.encoder.norm.normalized_shape[0])
        window = self.max_positions
        sequences = document_ids(sp, texts)
        windows = window_batch(sequences, window, stride or default_stride(window), self.pad_id, max_windows)
        device = next(self.parameters()).device
        vectors = []
        for start in range(0, len(windows.owner), batch_size):
            ids = windows.input_ids[start : start + batch_size].to(device)
            mask = windows.attention_mask[start : start + batch_size].to(device)
            vectors.append(mean_over_tokens(self.encode(ids, attention_mask=mask), mask))
        return mean_over_windows(torch.cat(vectors), windows.owner, windows.num_texts)

    def predict(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted target embeddings [B, L, D] (continuous) or logits [B, L, V] (softmax)."""
        return self.head(self.encode(input_ids, doc_ids))

    # Training ------------------------------------------------------------------------------------
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if "labels" not in batch:
            batch = self.objective(batch, generator)
        # the encoder itself, not encode(): a training batch longer than the positions is an error, never windowed
        hidden = self.encoder(batch["input_ids"], batch["doc_ids"])
        labels = batch["labels"].reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.continuous:
            # The continuous losses skip ignored rows themselves: no gather, so no .nonzero() host sync.
            if self.fused_head:
                return self._fused_continuous_loss(hidden, labels)
            return self.loss_from_outputs(self.head(hidden), labels)
        # Softmax: V logits only at target positions (the gather's .nonzero() syncs with the host).
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        hidden = hidden[rows]
        if isinstance(self.head, AdaptiveSoftmaxHead):  # its own loss: never the full V logits in training
            return self.head.loss(hidden, labels[rows])
        return self.loss_from_outputs(self.head(hidden), labels[rows])

    def loss_table(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, ids) the loss reads: the target table and labels; with learned targets, only the
        labelled rows and labels renumbered into them (LearnedTargets.rows_for_loss), except for the
        margin loss, which also reads its negatives and gets the whole table."""
        if self.learned_targets is not None:
            if self.loss_kind in WHOLE_TABLE_LOSSES:
                return self.learned_targets.table_for_loss(), labels
            return self.learned_targets.rows_for_loss(labels)
        if self.frozen_table is None:
            raise ValueError("the continuous head needs a target table: build_model(cfg, vocab_size, target_table=...)")
        return self.frozen_table, labels

    def loss_from_outputs(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
        """Loss and metrics of head outputs [N, D or V] at target positions with ids labels [N]."""
        if not self.continuous:
            loss = F.cross_entropy(outputs.float(), labels) if labels.numel() else outputs.sum() * 0.0
            with torch.no_grad():
                accuracy = (outputs.argmax(-1) == labels).float().mean() if labels.numel() else outputs.new_zeros(())
            return {"loss": loss, "accuracy": accuracy, "n_targets": labels.new_tensor(labels.numel())}
        table, ids = self.loss_table(labels)
        scale = self.kappa_scale()
        scaled = outputs if scale == 1.0 else outputs * scale
        loss = continuous_loss(scaled, ids, table, self.loss_kind, impl=self.loss_impl, **self.loss_params)
        if self.learned_targets is not None:
            loss = loss + self.learned_targets.extra_loss(outputs, labels)
        return {"loss": loss, **self._continuous_metrics(outputs, ids, table)}

    def _fused_continuous_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
        table, ids = self.loss_table(labels)
        proj = self.head.proj
        loss = fused_linear_continuous_loss(hidden, proj.weight, proj.bias, ids, table, self.loss_kind,
                                            self.chunk_size, impl=self.loss_impl, **self.loss_params)
        if self.learned_targets is not None:
            # The remedy needs the predictions with their gradient: computed once outside the fused op,
            # they also give the metrics.
            pred = proj(hidden)
            loss = loss + self.learned_targets.extra_loss(pred, labels)
        else:
            with torch.no_grad():
                pred = proj(hidden)
        return {"loss": loss, **self._continuous_metrics(pred, ids, table)}

    @torch.no_grad()
    def _continuous_metrics(self, pred: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> dict:
        # Means over the non-ignored rows, computed on the device (no host sync).
        valid = labels != IGNORE_INDEX
        n_targets = valid.sum()
        pred = pred.float()
        cos = F.cosine_similarity(pred, table[labels.clamp_min(0)].float(), dim=-1)
        mean = lambda x: (x * valid).sum() / n_targets.clamp_min(1)  # noqa: E731
        return {"mean_cos": mean(cos), "mean_pred_norm": mean(pred.norm(dim=-1)), "n_targets": n_targets}

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

    def kappa_scale(self) -> float:
        """The κ schedule's factor on the prediction the vMF loss sees (1.0 when off or past the ramp)."""
        if not self.kappa_warmup_steps or self.optimizer_steps >= self.kappa_warmup_steps:
            return 1.0
        return self.kappa_scale_start + (1.0 - self.kappa_scale_start) * self.optimizer_steps / self.kappa_warmup_steps

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.learned_targets is not None:
            self.learned_targets.after_step()
