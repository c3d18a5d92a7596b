"""Pipeline parallelism: the encoder as a DeepSpeed PipelineModule, the head on the last stage.

Layers: [embeddings] + [one per transformer block] + [final norm + head]. They wrap the very
submodules of a plain PretrainModel, so the weights start identical to the plain model's and a
pipeline checkpoint maps back to the plain model's keys (``load_pipeline_state``). Activations
travel between stages as (hidden, doc_ids); every block rebuilds its attention mask from doc_ids.
The loss runs on the last stage only (PipelineLoss); it records its metrics for the trainer.
Blocks are balanced across stages (partition_method "type:BlockLayer").

Limits (checked in Config._cross_checks): ZeRO 0/1 only, no tied softmax, no fused head, no learned
targets. Every rank builds the whole plain model first (fine at the sizes pipelining is tested at;
a very large model would build its layers with LayerSpec instead).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pretrain.engine.checkpoint import load_weights_file
from pretrain.model.encoder import attention_mask
from pretrain.model.objectives import IGNORE_INDEX


class EmbedLayer(nn.Module):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        input_ids, doc_ids = inputs
        return self.embed(input_ids), doc_ids


class BlockLayer(nn.Module):
    def __init__(self, block: nn.Module, causal: bool) -> None:
        super().__init__()
        self.block = block
        self.causal = causal

    def forward(self, inputs):
        hidden, doc_ids = inputs
        return self.block(hidden, attention_mask(doc_ids, self.causal)), doc_ids


class HeadLayer(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, inputs):
        hidden, _ = inputs
        return self.head(self.norm(hidden))


def layer_key_prefixes(n_layers: int) -> list[dict[str, str]]:
    """Per pipeline layer: its state-dict prefix -> the plain model's prefix."""
    return ([{"embed.": "encoder.embed."}]
            + [{"block.": f"encoder.blocks.{i}."} for i in range(n_layers)]
            + [{"norm.": "encoder.norm.", "head.": "head."}])


def to_model_key(layer_idx: int, key: str, n_layers: int) -> str:
    for old, new in layer_key_prefixes(n_layers)[layer_idx].items():
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"pipeline layer {layer_idx} has an unexpected parameter {key!r}")


class PipelineLoss:
    """loss_fn(outputs [B, L, D or V], labels [B, L]) on the last stage; keeps each micro-batch's metrics."""

    def __init__(self, model) -> None:
        self.model = model
        self.records: list[dict] = []
        self.poison = False  # test hook: make this step's losses NaN

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if self.model.continuous and self.model.frozen_table.device != outputs.device:
            self.model.frozen_table = self.model.frozen_table.to(outputs.device)
        result = self.model.loss_from_outputs(outputs.reshape(-1, outputs.shape[-1])[rows], labels[rows])
        loss = result["loss"] * float("nan") if self.poison else result["loss"]
        self.records.append({k: v.detach() for k, v in {**result, "loss": loss}.items()})
        return loss

    def drain(self) -> list[dict]:
        records, self.records = self.records, []
        return records


def pipeline_layers(model) -> list[nn.Module]:
    """The plain model as a sequence of layers (sharing its submodules)."""
    encoder = model.encoder
    return ([EmbedLayer(encoder.embed)]
            + [BlockLayer(block, encoder.causal) for block in encoder.blocks]
            + [HeadLayer(encoder.norm, model.head)])


def build_pipeline(model, num_stages: int):
    """(PipelineModule, PipelineLoss) over the submodules of a plain PretrainModel."""
    from deepspeed.pipe import PipelineModule

    loss_fn = PipelineLoss(model)
    module = PipelineModule(layers=pipeline_layers(model), num_stages=num_stages, loss_fn=loss_fn,
                            partition_method="type:BlockLayer", activation_checkpoint_interval=0)
    return module, loss_fn


def load_pipeline_state(tag_dir: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a pipeline checkpoint's per-layer files."""
    state = {}
    for idx in range(n_layers + 2):
        for key, value in load_weights_file(tag_dir / f"layer_{idx:02d}-model_states.pt").items():
            state[to_model_key(idx, key, n_layers)] = value
    return state
