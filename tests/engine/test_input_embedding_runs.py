"""model.input_embedding=targets under DeepSpeed (2 processes): ZeRO-2, ZeRO-3 + bf16, learned targets and the
pipeline train with ranks in sync and resume exactly; export folds the adapter into an ordinary embedding."""
import json

import pytest
import torch
from engine_launch import assert_resumes_exactly_from_step_8, metrics_rows

from pretrain.downstream import export as ex
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.checkpoint import load_model_state
from pretrain.model import build_model
from pretrain.targets.table import load_target_table

pytestmark = pytest.mark.multiproc
RUNS = ["table_input", "table_input_softmax", "table_input_learned", "table_input_pipeline"]
PER_STEP = ("loss", "lr", "grad_norm", "mean_cos", "mean_pred_norm", "data_fingerprint", "samples_seen")
ADAPTER = "encoder.embed.adapter.weight"


@pytest.mark.parametrize("name", RUNS)
def test_table_input_runs_train_in_sync_and_only_the_adapter_holds_the_input(tiny_runs, name):
    run = tiny_runs[name]
    rows = metrics_rows(run.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 0.02, f"{name}: loss did not decrease ({first:.4f} -> {last:.4f})"
    assert all(not r["skipped"] for r in rows)
    summary = json.loads((run.run_dir / "train_summary.json").read_text())
    by_stage = {}
    for entry in summary["ranks"]:
        by_stage.setdefault(entry["stage"], set()).add(entry["param_digest"])
    assert all(len(digests) == 1 for digests in by_stage.values()), summary["ranks"]
    assert len(by_stage) == (2 if run.cfg.train.pipeline_stages == 2 else 1)
    state, cfg, meta = load_model_state(run.run_dir)
    assert cfg.model.input_embedding == "targets" and "encoder.embed.tok_emb.weight" not in state
    vocab = meta["vocab_size"]
    assert not [k for k, v in state.items() if vocab in v.shape and not k.startswith(("head.", "learned_targets."))]
    earlier, _, _ = load_model_state(run.run_dir / ckpt.CHECKPOINTS, tag="step-00000008")
    assert not torch.equal(earlier[ADAPTER], state[ADAPTER])  # the adapter trained
    model = build_model(cfg, vocab, load_target_table(cfg.targets_path)[0])
    model.load_state_dict(state, strict=True)
    assert torch.isfinite(model.predict(torch.randint(5, vocab, (2, cfg.data.seq_len)))).all()


@pytest.mark.parametrize("name", ["table_input", "table_input_learned"])
def test_table_input_run_resumes_exactly_from_its_step_8_checkpoint(engine_base, tiny_runs, tmp_path, name):
    """ZeRO-2, and ZeRO-3 with learned targets (their negatives come from the global RNG, which a resumed run
    must continue exactly): steps 9-16 after a resume equal the uninterrupted run's."""
    base, runs = engine_base
    assert_resumes_exactly_from_step_8(base, runs[name], tiny_runs[name].run_dir, tmp_path, PER_STEP)


def test_learned_targets_runs_are_rebuilt_on_the_source_table(tiny_runs):
    """Eval/export rebuild the model from the checkpoint: its input must be the table training read, not the learned one."""
    run = tiny_runs["table_input_learned"]
    source, _ = load_target_table(run.cfg.targets_path)
    rebuilt = ex.load_run_model(run.run_dir).model
    assert torch.equal(rebuilt.encoder.embed.input_table, source)
    assert not torch.allclose(rebuilt.target_table, source)  # decoding uses the learned table


@pytest.mark.parametrize("name", RUNS)
def test_export_folds_the_adapter_into_an_ordinary_embedding_with_the_same_outputs(tiny_runs, tmp_path, name):
    run = ex.load_run_model(tiny_runs[name].run_dir)
    out = ex.export_run(tiny_runs[name].run_dir, tmp_path / "export")
    exported, sp = ex.load_encoder(out)
    manifest = ex.read_manifest(out)
    assert manifest["config"]["model"]["input_embedding"] == "learned" and manifest["source"]["input_embedding"] == "targets"
    assert tuple(exported.encoder.embed.tok_emb.weight.shape) == (sp.get_piece_size(), run.cfg.model.d_model)
    ids = torch.randint(5, sp.get_piece_size(), (3, run.cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(ids), run.model.encode(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported.predict(ids), run.model.predict(ids), atol=1e-5, rtol=1e-5)


def test_hugging_face_loads_a_table_input_export(tiny_runs, tmp_path):
    from transformers import AutoModel

    run = ex.load_run_model(tiny_runs["table_input"].run_dir)
    out = ex.export_run(tiny_runs["table_input"].run_dir, tmp_path / "export")
    hf_model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(5, 1000, (2, run.cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        torch.testing.assert_close(hidden, run.model.encode(ids), atol=1e-5, rtol=1e-5)
