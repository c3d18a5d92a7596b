"""The model on its own (no DeepSpeed): encoder masks, objectives, heads, losses, pipeline layers."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import config_from_dict
from pretrain.engine.pipeline import PipelineLoss, layer_key_prefixes, pipeline_layers, to_model_key
from pretrain.model import IGNORE_INDEX, Objective, batch_generator, build_model
from pretrain.model.encoder import attention_mask
from pretrain.model.objectives import causal_labels, mask_tokens
from pretrain_kernels import continuous_loss, loss_params

VOCAB, DIM, LENGTH = 60, 8, 12


def make_cfg(**sections):
    base = {"model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "max_seq_len": LENGTH},
            "targets": {"dim": DIM}, "loss": {"name": "cosine", "impl": "reference"}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


@pytest.fixture(scope="module")
def table():
    return F.normalize(torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0)), dim=1)


def make_batch(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, LENGTH), generator=g)
    docs = torch.zeros_like(ids)
    docs[:, LENGTH // 2:] = 1
    ids[-1, -3:], docs[-1, -3:] = 0, -1  # padding at the end of the last row
    return {"input_ids": ids, "doc_ids": docs}


# Encoder --------------------------------------------------------------------------------------------

def test_attention_mask_keeps_documents_apart_and_causal_looks_back():
    docs = torch.tensor([[0, 0, 1, 1, -1]])
    mask = attention_mask(docs, causal=False)[0, 0]
    assert mask[0].tolist() == [True, True, False, False, False]
    assert mask[4].tolist() == [False, False, False, False, True]  # padding sees only padding: no empty row
    causal = attention_mask(docs, causal=True)[0, 0]
    assert causal[1].tolist() == [True, True, False, False, False]
    assert causal[2].tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_hidden_states_do_not_see_other_documents(objective, table):
    torch.manual_seed(0)
    model = build_model(make_cfg(model={"objective": objective}), VOCAB, table).eval()
    batch = make_batch()
    changed = batch["input_ids"].clone()
    changed[:, LENGTH // 2:] = torch.randint(5, VOCAB, changed[:, LENGTH // 2:].shape)  # rewrite document 1
    first = model.encode(batch["input_ids"], batch["doc_ids"])
    second = model.encode(changed, batch["doc_ids"])
    torch.testing.assert_close(first[:, : LENGTH // 2], second[:, : LENGTH // 2])
    assert not torch.allclose(first[:, LENGTH // 2:], second[:, LENGTH // 2:])


def test_causal_encoder_ignores_the_future(table):
    torch.manual_seed(0)
    model = build_model(make_cfg(model={"objective": "causal"}), VOCAB, table).eval()
    ids = make_batch()["input_ids"]
    later = ids.clone()
    later[:, 5:] = 7
    torch.testing.assert_close(model.encode(ids)[:, :5], model.encode(later)[:, :5])


def test_encode_without_doc_ids_treats_pad_as_padding(table):
    torch.manual_seed(0)
    model = build_model(make_cfg(), VOCAB, table).eval()
    ids = make_batch()["input_ids"][:1, :6]
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], dim=1)
    torch.testing.assert_close(model.encode(ids), model.encode(padded)[:, :6])
    assert model.predict(ids).shape == (1, 6, DIM)


def test_training_input_longer_than_max_seq_len_is_refused(table):
    # encode() reads longer inputs by sliding windows (tests/downstream/test_downstream_embed.py);
    # the encoder itself, and so a training batch, refuses them
    model = build_model(make_cfg(), VOCAB, table)
    too_long = torch.ones(1, LENGTH + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.encoder(too_long, torch.zeros_like(too_long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model({"input_ids": too_long, "doc_ids": torch.zeros_like(too_long)})
    assert model.encode(too_long).shape[:2] == (1, LENGTH + 1)


# Objectives -----------------------------------------------------------------------------------------

def test_masking_is_80_10_10_over_non_pad_positions():
    ids = torch.randint(5, 1000, (64, 512), generator=torch.Generator().manual_seed(1))
    docs = torch.zeros_like(ids)
    docs[:, -12:] = -1
    ids[:, -12:] = 0
    corrupted, labels = mask_tokens(ids, docs, mask_prob=0.15, mask_id=4, vocab_size=1000, first_ordinary_id=5,
                                    generator=torch.Generator().manual_seed(2))
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, -12:].any()
    assert abs(chosen[:, :-12].float().mean().item() - 0.15) < 0.005
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    masked = (corrupted == 4) & chosen
    unchanged = (corrupted == ids) & chosen
    randomised = chosen & ~masked & ~unchanged
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # A random replacement equals the original 1 time in 995: counted as unchanged.
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01
    assert abs(randomised.sum().item() / n - 0.1) < 0.01
    assert corrupted[randomised].min() >= 5


def test_causal_labels_stop_at_document_boundaries_and_padding():
    ids = torch.tensor([[10, 11, 3, 20, 21, 0]])
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert causal_labels(ids, docs).tolist() == [[11, 3, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]]


def test_corruption_is_a_function_of_seed_step_micro_and_rank():
    objective = Objective("masked", VOCAB, 0.3)
    batch = make_batch(batch=8)
    first = objective(batch, batch_generator(1, 5, 0, 0))
    assert torch.equal(first["labels"], objective(batch, batch_generator(1, 5, 0, 0))["labels"])
    for other in (batch_generator(1, 6, 0, 0), batch_generator(1, 5, 1, 0), batch_generator(1, 5, 0, 1)):
        assert not torch.equal(first["labels"], objective(batch, other)["labels"])


# Heads and losses -----------------------------------------------------------------------------------

def test_continuous_loss_and_metrics_are_those_of_the_head_output(table):
    torch.manual_seed(0)
    cfg = make_cfg(loss={"name": "vmf_practice"})
    model = build_model(cfg, VOCAB, table)
    batch = model.objective(make_batch(), batch_generator(0, 1, 0, 0))
    out = model(batch)
    pred = model.predict(batch["input_ids"], batch["doc_ids"])
    expected = continuous_loss(pred, batch["labels"], table, "vmf_practice", impl="reference", **loss_params(cfg.loss))
    torch.testing.assert_close(out["loss"], expected)
    keep = batch["labels"] != IGNORE_INDEX
    cos = F.cosine_similarity(pred[keep], table[batch["labels"][keep]], dim=-1)
    torch.testing.assert_close(out["mean_cos"], cos.mean())
    torch.testing.assert_close(out["mean_pred_norm"], pred[keep].norm(dim=-1).mean())
    assert out["n_targets"].item() == keep.sum().item()


def test_fused_head_gives_the_same_loss_and_gradients(table):
    batch = Objective("masked", VOCAB, 0.3)(make_batch(), batch_generator(0, 1, 0, 0))
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(make_cfg(loss={"fused_head": fused, "chunk_size": 4}), VOCAB, table)
        out = model(batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), model.head.proj.weight.grad.clone(), out["mean_cos"]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])


def _assert_same_outputs_and_learned_grads(first, second):
    """Two (outputs, gradients) pairs of a learned-target model: every output and every gradient equal,
    the learned table's among them."""
    for key, value in first[0].items():
        torch.testing.assert_close(second[0][key], value, msg=key)
    assert first[1].keys() == second[1].keys() and "learned_targets.weight" in first[1]
    for name, grad in first[1].items():
        torch.testing.assert_close(second[1][name], grad, msg=name)


def test_fused_head_with_learned_targets_projects_once_and_matches_the_plain_head(table):
    """The learned table's remedy needs the predictions with their gradient outside the fused op; the
    fused path computes them once (they also give the metrics) and equals the plain head everywhere."""
    batch = Objective("masked", VOCAB, 0.3)(make_batch(), batch_generator(0, 1, 0, 0))
    results = []
    for fused in (False, True):
        model, _ = _learned_model(table, False, fused_head=fused, chunk_size=4)
        calls = []
        model.head.proj.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the same sampled negatives in both runs
        out = model(batch)
        out["loss"].backward()
        assert len(calls) == 1, f"fused={fused}: head.proj ran {len(calls)} times in one forward"
        results.append(({k: v.detach() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    _assert_same_outputs_and_learned_grads(*results)


def test_softmax_head_is_cross_entropy_and_can_be_tied():
    torch.manual_seed(0)
    model = build_model(make_cfg(model={"head": "softmax", "tie_softmax": True}), VOCAB)
    assert model.head.weight is model.encoder.embed.tok_emb.weight
    assert not any(k.startswith("head.") for k in model.state_dict())
    assert model.target_table is None
    batch = model.objective(make_batch(), batch_generator(0, 1, 0, 0))
    logits = model.predict(batch["input_ids"], batch["doc_ids"])
    assert logits.shape == (3, LENGTH, VOCAB)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model(batch)["loss"], expected)
    assert model.external_parameters() == [(model.head, model.encoder.embed.tok_emb.weight)]


def test_a_batch_without_targets_has_zero_loss_and_a_graph(table):
    model = build_model(make_cfg(), VOCAB, table)
    batch = {**make_batch(), "labels": torch.full((3, LENGTH), IGNORE_INDEX)}
    out = model(batch)
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad


@pytest.mark.parametrize("d_model", [DIM, 16])
def test_input_embeddings_from_the_target_table(d_model, table):
    cfg = make_cfg(model={"d_model": d_model, "init_embeddings_from_targets": True})
    emb = build_model(cfg, VOCAB, table).encoder.embed.tok_emb.weight.detach()
    if d_model == DIM:
        torch.testing.assert_close(F.normalize(emb, dim=1), table)
    else:  # a random projection keeps the angles roughly
        sims_emb = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T
        sims_table = table @ table.T
        assert torch.corrcoef(torch.stack([sims_emb.flatten(), sims_table.flatten()]))[0, 1] > 0.5


def test_param_groups_cover_every_parameter_once(table):
    model = build_model(make_cfg(), VOCAB, table)
    groups = model.param_groups(weight_decay=0.1, lr=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_learned_targets_are_a_trainable_submodule_with_their_own_lr(table):
    cfg = make_cfg(targets={"learned": True, "learned_lr_scale": 0.5, "contrastive_negatives": 8})
    model = build_model(cfg, VOCAB, table)
    weight = model.learned_targets.weight
    assert "learned_targets.weight" in model.state_dict()
    groups = model.param_groups(weight_decay=0.1, lr=1e-3)
    table_group = next(g for g in groups if any(p is weight for p in g["params"]))
    assert table_group["lr_scale"] == pytest.approx(0.5) and table_group["weight_decay"] == 0.0
    assert (model, weight) in model.external_parameters()
    out = model(model.objective(make_batch(), batch_generator(0, 1, 0, 0)))
    out["loss"].backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_name", ["vmf_practice", "cosine", "margin"])
@pytest.mark.parametrize("fused", [False, True])
def test_learned_table_reads_only_the_target_rows_and_gives_the_full_tables_gradients(loss_name, fused, table, monkeypatch):
    """The model hands the loss only the distinct target rows, labels renumbered into them (cheap at
    large V); loss, metrics and every gradient must equal those through the whole normalised table.
    The margin loss reads its negatives too: it must get the whole table."""
    from pretrain.targets.learned import LearnedTargets

    batch = Objective("masked", VOCAB, 0.3)(make_batch(), batch_generator(0, 1, 0, 0))
    assert batch["labels"][batch["labels"] != IGNORE_INDEX].unique().numel() < (batch["labels"] != IGNORE_INDEX).sum()  # repeats
    results, compact = [], []
    rows_for_loss = LearnedTargets.rows_for_loss
    for whole in (True, False):
        if whole:
            monkeypatch.setattr(LearnedTargets, "rows_for_loss", lambda self, ids: (self.table_for_loss(), ids))
        else:
            monkeypatch.setattr(LearnedTargets, "rows_for_loss", lambda self, ids: compact.append(rows_for_loss(self, ids)) or compact[-1])
        torch.manual_seed(0)
        cfg = make_cfg(loss={"name": loss_name, "fused_head": fused, "chunk_size": 4},
                       targets={"learned": True, "contrastive_negatives": 8})
        model = build_model(cfg, VOCAB, table)
        torch.manual_seed(1)  # the same sampled negatives in both runs
        out = model(batch)
        out["loss"].backward()
        results.append(({k: v.detach() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert (not compact) == (loss_name == "margin")
    if compact:
        assert compact[0][0].shape[0] == batch["labels"][batch["labels"] != IGNORE_INDEX].unique().numel() < VOCAB
    assert results[0][0].keys() == results[1][0].keys() and "mean_cos" in results[0][0]
    _assert_same_outputs_and_learned_grads(*results)


def _learned_model(table, sparse: bool, **loss):
    cfg = make_cfg(loss={"name": "vmf_practice", **loss}, targets={"learned": True, "contrastive_negatives": 8},
                   train={"sparse_embedding": sparse, "zero_stage": 0})
    torch.manual_seed(0)
    return build_model(cfg, VOCAB, table), cfg


@pytest.mark.parametrize("remedy", ["contrastive", "vicreg", "ema"])
@pytest.mark.parametrize("fused", [False, True])
def test_sparse_learned_table_gradient_is_the_dense_one_on_the_rows_read(remedy, fused, table):
    """train.sparse_embedding with learned targets: the table's gradient is row-sparse, holds only the
    rows the loss and the remedy read, and equals the dense gradient; every other gradient is unchanged."""
    batch = Objective("masked", VOCAB, 0.3)(make_batch(), batch_generator(0, 1, 0, 0))
    grads = {}
    for sparse in (False, True):
        model, _ = _learned_model(table, sparse, fused_head=fused, chunk_size=4)
        model.learned_targets.remedy = remedy
        if remedy == "ema":
            model.learned_targets.register_buffer("ema", model.learned_targets.weight.detach().clone())
        torch.manual_seed(1)  # the same sampled negatives in both runs
        model(batch)["loss"].backward()
        grads[sparse] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    table_grad, dense = grads[True]["learned_targets.weight"], grads[False]["learned_targets.weight"]
    assert table_grad.is_sparse and not dense.is_sparse
    read = set(table_grad.coalesce().indices()[0].tolist())
    assert read == set(dense.abs().sum(1).nonzero().squeeze(1).tolist()) and len(read) < VOCAB
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name].to_dense(), grad, msg=name)


def test_sparse_learned_table_steps_like_adamw_and_leaves_unread_rows_alone(table):
    """The trainer's optimizer on the sparse table: after one step it equals dense AdamW everywhere (an
    unread row has zero moments then); after two, rows read in neither batch have not moved, where the
    dense AdamW's momentum moves every row read before."""
    from pretrain.engine.optim import RowSparseAdamW, build_optimizer

    tables, read = {}, set()
    for sparse in (False, True):
        model, cfg = _learned_model(table, sparse)
        optimizer = build_optimizer(model.param_groups(cfg.train.weight_decay, 1e-2), cfg.train)
        assert isinstance(optimizer, RowSparseAdamW) == sparse
        start = model.learned_targets.weight.detach().clone()
        for step in (1, 2):
            batch = model.objective(make_batch(seed=step), batch_generator(0, step, 0, 0))
            torch.manual_seed(step)
            optimizer.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            if sparse:
                read |= set(model.learned_targets.weight.grad.coalesce().indices()[0].tolist())
            optimizer.step()
            tables[sparse, step] = model.learned_targets.weight.detach().clone()
    torch.testing.assert_close(tables[True, 1], tables[False, 1], rtol=1e-5, atol=1e-6)
    unread = torch.tensor(sorted(set(range(VOCAB)) - read))
    assert 0 < unread.numel() < VOCAB
    assert torch.equal(tables[True, 2][unread], start[unread])
    assert not torch.equal(tables[True, 2], start)


def test_sparse_learned_table_refuses_the_margin_loss():
    """The margin loss reads negative rows of the whole table: its gradient would be dense."""
    with pytest.raises(ValueError, match="offending: loss.name"):
        make_cfg(loss={"name": "margin"}, targets={"learned": True}, train={"sparse_embedding": True, "zero_stage": 0})
    assert make_cfg(loss={"name": "margin"}, train={"sparse_embedding": True, "zero_stage": 0}).train.sparse_embedding


def test_vocabulary_mismatch_between_model_and_table_is_refused(table):
    with pytest.raises(ValueError, match="rows but the vocabulary"):
        build_model(make_cfg(), VOCAB + 1, table)


# Pipeline layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["continuous", "softmax"])
def test_pipeline_layers_compute_the_plain_model(head, table):
    torch.manual_seed(0)
    model = build_model(make_cfg(model={"head": head}), VOCAB, table)
    batch = model.objective(make_batch(), batch_generator(0, 1, 0, 0))
    activations = (batch["input_ids"], batch["doc_ids"])
    for layer in pipeline_layers(model):
        activations = layer(activations)
    loss = PipelineLoss(model)(activations, batch["labels"])
    torch.testing.assert_close(loss, model(batch)["loss"])


def test_pipeline_keys_map_back_to_the_plain_model(table):
    model = build_model(make_cfg(), VOCAB, table)
    n_layers = len(model.encoder.blocks)
    mapped = {to_model_key(i, k, n_layers): v for i, layer in enumerate(pipeline_layers(model))
              for k, v in layer.state_dict().items()}
    plain = model.state_dict()
    assert mapped.keys() == plain.keys()
    assert all(torch.equal(mapped[k], plain[k]) for k in mapped)
    assert len(layer_key_prefixes(n_layers)) == n_layers + 2
    with pytest.raises(KeyError):
        to_model_key(0, "block.attn.qkv.weight", n_layers)


# κ schedule -----------------------------------------------------------------------------------------

def test_kappa_schedule_scales_the_prediction_the_vmf_loss_sees_then_steps_off(table):
    cfg = make_cfg(loss={"name": "vmf_practice", "kappa_warmup_steps": 4, "kappa_scale_start": 0.25})
    model = build_model(cfg, VOCAB, table).eval()
    plain = build_model(make_cfg(loss={"name": "vmf_practice"}), VOCAB, table).eval()
    plain.load_state_dict(model.state_dict())  # no extra state: exports and checkpoints are unchanged
    outputs = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 3, IGNORE_INDEX, 4])
    params = loss_params(cfg.loss)
    scales = []
    for step in range(6):
        scales.append(model.kappa_scale())
        expected = continuous_loss(outputs * scales[-1], labels, table, "vmf_practice", impl="reference", **params)
        assert model.loss_from_outputs(outputs, labels)["loss"] == pytest.approx(float(expected), rel=1e-5)
        model.after_optimizer_step()
    assert scales == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0])
    assert plain.kappa_scale() == 1.0
    assert float(model.loss_from_outputs(outputs, labels)["loss"]) == pytest.approx(float(plain.loss_from_outputs(outputs, labels)["loss"]))
    # Only the vMF losses have a κ: the schedule leaves the others alone.
    cosine = build_model(make_cfg(loss={"name": "cosine", "kappa_warmup_steps": 4}), VOCAB, table)
    assert cosine.kappa_scale() == 1.0


def test_kappa_schedule_is_refused_with_the_fused_head():
    with pytest.raises(ValueError, match="kappa_warmup_steps"):
        make_cfg(loss={"name": "vmf_practice", "kappa_warmup_steps": 4, "fused_head": True})
