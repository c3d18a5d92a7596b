"""model.input_embedding=targets on its own (no DeepSpeed): the frozen target table through a learned adapter."""
import pytest
import torch
import torch.nn.functional as F
from test_model import DIM, LENGTH, VOCAB, make_batch, make_cfg

from pretrain.config import ConfigError, load_config
from pretrain.engine.checkpoint import _with_fp32_master_weights
from pretrain.engine.pipeline import PipelineLoss, pipeline_layers
from pretrain.model import batch_generator, build_model

TARGETS_INPUT = {"input_embedding": "targets"}


@pytest.fixture(scope="module")
def table():
    return F.normalize(torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(1)), dim=1)


@pytest.mark.parametrize("head", ["continuous", "softmax"])
def test_the_encoder_reads_the_frozen_table_through_a_linear_adapter(head, table):
    model = build_model(make_cfg(model={**TARGETS_INPUT, "head": head}), VOCAB, table)
    embed = model.encoder.embed
    assert not hasattr(embed, "tok_emb")
    assert embed.input_table is table and not embed.input_table.requires_grad
    assert isinstance(embed.adapter, torch.nn.Linear) and embed.adapter.bias is None
    assert tuple(embed.adapter.weight.shape) == (16, DIM)  # D -> d_model
    assert "encoder.embed.input_table" not in model.state_dict()  # verified by sha256, never checkpointed
    if head == "continuous":  # the loss reads the same tensor: one copy of the table
        assert model.shares_input_table and model.frozen_table is table and model.loss_table(torch.tensor([3]))[0] is table
    ids = make_batch()["input_ids"]
    expected = embed.adapter(table[ids]) + embed.pos_emb.weight[:LENGTH]
    torch.testing.assert_close(embed(ids), expected)


@pytest.mark.parametrize("head", ["continuous", "softmax"])
def test_no_vocabulary_sized_parameter_but_the_softmax_output_is_trained(head, table):
    model = build_model(make_cfg(model={**TARGETS_INPUT, "head": head}), VOCAB, table)
    batch = model.objective(make_batch(), batch_generator(0, 1, 0, 0))
    model(batch)["loss"].backward()
    vocab_sized = [n for n, p in model.named_parameters() if p.requires_grad and VOCAB in p.shape]
    assert vocab_sized == ([] if head == "continuous" else ["head.proj.weight", "head.proj.bias"])
    assert model.encoder.embed.adapter.weight.grad.abs().sum() > 0
    assert model.encoder.embed.input_table.grad is None
    trained = {id(p) for group in model.param_groups(0.01, 1e-3) for p in group["params"]}
    assert id(model.encoder.embed.adapter.weight) in trained


def test_learned_targets_keep_the_source_table_as_the_input(table):
    cfg = make_cfg(model=TARGETS_INPUT, targets={"learned": True, "contrastive_negatives": 8})
    model = build_model(cfg, VOCAB, table)
    with torch.no_grad():
        model.learned_targets.weight.add_(1.0)  # the learned table moves; the input must not follow it
    assert model.encoder.embed.input_table is table and not model.shares_input_table
    assert model.learned_targets.weight.data_ptr() != table.data_ptr()


def test_token_table_is_the_embedding_an_ordinary_model_would_hold(table):
    model = build_model(make_cfg(model=TARGETS_INPUT), VOCAB, table)
    ids = make_batch()["input_ids"]
    torch.testing.assert_close(model.encoder.embed.token_table()[ids], model.encoder.embed.token_vectors(ids))


@pytest.mark.parametrize("head", ["continuous", "softmax"])
def test_pipeline_layers_compute_the_plain_model_with_the_table_input(head, table):
    torch.manual_seed(0)
    model = build_model(make_cfg(model={**TARGETS_INPUT, "head": head}), VOCAB, table)
    batch = model.objective(make_batch(), batch_generator(0, 1, 0, 0))
    activations = (batch["input_ids"], batch["doc_ids"])
    for layer in pipeline_layers(model):
        activations = layer(activations)
    torch.testing.assert_close(PipelineLoss(model)(activations, batch["labels"]), model(batch)["loss"])


def test_zero0_master_weights_are_mapped_in_the_adapter_models_parameter_order(table):
    """ZeRO-0 bf16 checkpoints: the fp32 masters are matched to names by rebuilding the model on meta."""
    cfg = make_cfg(model=TARGETS_INPUT, train={"zero_stage": 0, "precision": "bf16"})
    model = build_model(cfg, VOCAB, table)
    groups = [[p.detach().double() for p in g["params"]] for g in model.param_groups(0.0, 1.0)]
    saved = {"module": {k: v.bfloat16() for k, v in model.state_dict().items()}, "optimizer": {"fp32_groups": groups}}
    state = _with_fp32_master_weights(saved, cfg, VOCAB)
    assert all(state[n].dtype == torch.float64 for n, _ in model.named_parameters())


@pytest.mark.parametrize("override, key", [("train.sparse_embedding=true", "train.sparse_embedding"),
                                           ("model.tie_softmax=true", "model.tie_softmax")])
def test_combinations_without_a_learned_table_are_config_errors_naming_the_key(override, key):
    extra = ["train.zero_stage=0", "model.head=softmax"]
    with pytest.raises(ConfigError, match=rf"model.input_embedding=targets .* {key}=true; set {key}=false or model.input_embedding=learned"):
        load_config(None, ["model.input_embedding=targets", *extra, override])


def test_the_table_input_works_with_every_engine_setting_and_the_tiny_config():
    for extra in (["train.zero_stage=3", "train.precision=bf16"], ["train.zero_stage=1", "train.pipeline_stages=2"]):
        assert load_config(None, ["model.input_embedding=targets", *extra]).model.input_embedding == "targets"
    cfg = load_config(None, ["model.input_embedding=targets", "model.head=softmax"])
    assert cfg.reads_target_table and cfg.model.init_embeddings_from_targets  # tiny.yaml's init is moot, not an error


def test_building_without_a_table_is_refused():
    with pytest.raises(ValueError, match="model.input_embedding=targets needs the target table"):
        build_model(make_cfg(model={**TARGETS_INPUT, "head": "softmax"}), VOCAB, None)
