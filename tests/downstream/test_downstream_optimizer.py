"""Fine-tuning's optimizer: finetune.encoder_lr_scale gives the encoder body its own (lower) lr."""
import pytest
import torch
from torch import nn

from pretrain.config import load_config
from pretrain.downstream.classify import SequenceClassifier
from pretrain.downstream.finetune import _optimizer


class _Encoder(nn.Module):
    max_positions = 8

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_encoder_body_gets_lr_times_scale_and_the_head_the_full_lr(scale):
    ft = load_config(None, ["finetune.lr=1e-3", f"finetune.encoder_lr_scale={scale}", "finetune.epochs=2"]).finetune
    model = SequenceClassifier(_Encoder(), 4, 3)
    optimizer, schedule = _optimizer(model, ft, steps_per_epoch=10)
    body, head = optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in body["params"]} == {id(p) for p in model.encoder.parameters()}
    for _ in range(2):  # warm-up is 2 steps: the peak lrs, in that ratio
        optimizer.step()
        schedule.step()
    assert head["lr"] == pytest.approx(1e-3) and body["lr"] == pytest.approx(1e-3 * scale)


def test_encoder_lr_scale_must_be_positive():
    with pytest.raises(Exception, match="encoder_lr_scale"):
        load_config(None, ["finetune.encoder_lr_scale=0"])
