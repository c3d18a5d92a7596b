"""`pretrain export` on the tiny trained runs (ZeRO-2/3, softmax, bf16 causal, pipeline) and load_encoder.

"Training-time model": train_summary.json holds the sha256 of the live parameters of every rank at the
end of training (gathered under ZeRO-3); the loaded export must reproduce it bit for bit, and its
outputs must equal those of the model the engine's own consolidation gives.
"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import pretrain
from pretrain.cli import main as cli_main
from pretrain.downstream import export as ex
from pretrain.engine.checkpoint import load_model_state
from pretrain.model import build_model
from pretrain.targets.table import load_target_table

pytestmark = pytest.mark.multiproc


def _digest(module: torch.nn.Module) -> str:
    """As pretrain.engine.trainer.param_digest computes it on the live engine module."""
    digest = hashlib.sha256()
    for _, p in sorted(module.named_parameters()):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _engine_model(run_dir, tag=None):
    """The model rebuilt from the engine's consolidated fp32 state dict (load_model_state)."""
    state, cfg, meta = load_model_state(run_dir, tag=tag)
    table = load_target_table(meta.get("targets_path") or cfg.targets_path)[0] if cfg.reads_target_table else None
    model = build_model(cfg, meta["vocab_size"], table)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _sample_ids(sp, length):
    texts = ["a small domesticated carnivore kept as a pet", "the edible fruit of an apple tree"]
    rows = [(sp.encode(t) + [sp.eos_id()])[:length] for t in texts]
    ids = torch.full((2, length), sp.pad_id(), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


@pytest.fixture(scope="module")
def exports(tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {name: ex.export_run(tiny_runs[name].run_dir, root / name) for name in ("zero2", "zero3", "softmax", "zero1", "pipeline")}


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_export_reproduces_the_training_time_model_exactly(tiny_runs, exports, name):
    model, sp = pretrain.load_encoder(exports[name])
    assert not model.training
    summary = json.loads((tiny_runs[name].run_dir / "train_summary.json").read_text())
    assert {r["param_digest"] for r in summary["ranks"]} == {_digest(model)}
    reference, cfg = _engine_model(tiny_runs[name].run_dir)
    ids = _sample_ids(sp, cfg.data.seq_len)
    with torch.no_grad():
        assert torch.equal(model.encode(ids), reference.encode(ids))
        assert torch.equal(model.predict(ids), reference.predict(ids))
    assert torch.equal(model.target_table, reference.target_table)


@pytest.mark.parametrize("name", ["softmax", "zero1", "pipeline"])
def test_other_layouts_export_and_load_identically(tiny_runs, exports, name):
    model, sp = pretrain.load_encoder(exports[name])
    reference, cfg = _engine_model(tiny_runs[name].run_dir)
    ids = _sample_ids(sp, cfg.data.seq_len)
    with torch.no_grad():
        assert torch.equal(model.predict(ids), reference.predict(ids))
    assert ex.read_manifest(exports[name])["config"]["model"] == cfg.model.model_dump(mode="json")


def test_config_json_and_model_card_describe_the_run(tiny_runs, exports):
    manifest = json.loads((exports["zero3"] / "config.json").read_text())
    assert manifest["source"]["step"] == 16 and manifest["source"]["zero_stage"] == 3
    assert manifest["source"]["tag"] == "step-00000016"
    assert manifest["vocab_size"] == 1000 and manifest["special_ids"]["pad"] == 0
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer.model", "targets.safetensors", "modeling_softmaxfree.py",
                                      "tokenizer.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json",
                                      "1_Pooling/config.json"}
    for name, record in manifest["files"].items():
        assert record["sha256"] == hashlib.sha256((exports["zero3"] / name).read_bytes()).hexdigest()
    card = (exports["zero3"] / "README.md").read_text()
    assert "| steps | 16 |" in card and "| ZeRO stage / pipeline stages | 3 / 1 |" in card
    assert "train sequences / tokens" in card


def test_bf16_export_halves_the_file_and_stays_close(tiny_runs, exports, tmp_path):
    out = ex.export_run(tiny_runs["zero2"].run_dir, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dtype"] == "bf16"
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys() if f.get_tensor(k).is_floating_point())
    size16, size32 = ((d / "model.safetensors").stat().st_size for d in (out, exports["zero2"]))
    assert size16 < 0.55 * size32
    model16, sp = pretrain.load_encoder(out)
    model32, _ = pretrain.load_encoder(exports["zero2"])
    ids = _sample_ids(sp, 32)
    with torch.no_grad():
        h16, h32 = model16.encode(ids), model32.encode(ids)
    assert h16.dtype == torch.float32
    torch.testing.assert_close(h16, h32, atol=5e-2, rtol=5e-2)
    assert not torch.equal(h16, h32)


def test_loading_needs_neither_deepspeed_nor_the_run(exports, tmp_path):
    moved = _copy_export(exports["zero2"], tmp_path / "moved")
    code = (
        "import sys, pretrain; m, sp = pretrain.load_encoder(sys.argv[1]); "
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('deepspeed', 'mlflow', 'faiss', 'gensim')); "
        "print(type(m).__name__, sp.get_piece_size(), bad)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(moved)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PretrainModel", "1000", "[]"]


def _copy_export(src, dst):
    return Path(shutil.copytree(src, dst))


def _edit_config(export_dir, edit):
    """Edit config.json and re-sign it in the weights' metadata, as a buggy writer would produce it:
    the checks behind the signature (shapes, vocabulary, validation) are what these cases exercise.
    An edit without re-signing is refused earlier (test_downstream_export_format)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    manifest = json.loads((export_dir / "config.json").read_text())
    edit(manifest)
    weights = export_dir / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(weights)), str(weights), metadata={**metadata, ex.CONFIG_SIGNATURE_KEY: ex.config_signature(manifest)})
    manifest["files"]["model.safetensors"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (export_dir / "config.json").write_text(json.dumps(manifest))


def test_mismatched_export_files_give_clear_errors(exports, tiny_runs, tmp_path):
    # config.json says a wider model than the weights hold -> per-tensor shape report
    wide = _copy_export(exports["zero2"], tmp_path / "wide")
    _edit_config(wide, lambda m: m["config"]["model"].update(d_model=64))
    with pytest.raises(ex.ExportError, match=r"model.safetensors does not fit .*shape mismatches encoder\.embed\.tok_emb\.weight: \(1000, 32\) vs model \(1000, 64\)"):
        pretrain.load_encoder(wide)
    # another vocabulary size than the tokenizer has
    vocab = _copy_export(exports["zero2"], tmp_path / "vocab")
    _edit_config(vocab, lambda m: m.update(vocab_size=999))
    with pytest.raises(ex.ExportError, match=r"tokenizer.model has 1000 pieces but config.json says vocab_size=999"):
        pretrain.load_encoder(vocab)
    # a target table built for another tokenizer, with its hash updated so only the pairing is wrong
    other = _copy_export(exports["zero2"], tmp_path / "other")
    table, meta = load_target_table(other / "targets.safetensors")
    from pretrain.targets.table import save_target_table

    save_target_table(other / "targets.safetensors", table, {**meta, "tokenizer_sha256": "f" * 64})
    _edit_config(other, lambda m: m["files"]["targets.safetensors"].update(sha256=hashlib.sha256((other / "targets.safetensors").read_bytes()).hexdigest()))
    with pytest.raises(ex.ExportError, match="target table does not belong with this export.*built for tokenizer sha256 ffffffffffff"):
        pretrain.load_encoder(other)
    # a config that no longer validates
    broken = _copy_export(exports["zero2"], tmp_path / "broken")
    _edit_config(broken, lambda m: m["config"]["model"].update(n_heads=3))
    with pytest.raises(ex.ExportError, match=r"(?s)does not validate.*divisible by model.n_heads"):
        pretrain.load_encoder(broken)


def test_tampered_weights_are_refused_before_loading(exports, tmp_path):
    tampered = _copy_export(exports["zero3"], tmp_path / "t")
    path = tampered / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit inside a weight
    path.write_bytes(bytes(data))
    with pytest.raises(ex.ExportError, match="model.safetensors: sha256 .* does not match"):
        pretrain.load_encoder(tampered)


def test_cli_export_with_tag_and_clean_errors(tiny_runs, exports, tmp_path, capsys):
    out = tmp_path / "step8"
    assert cli_main(["export", str(tiny_runs["zero2"].run_dir), str(out), "--tag", "step-00000008"]) == 0
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 8
    early, _ = pretrain.load_encoder(out)
    reference, _ = _engine_model(tiny_runs["zero2"].run_dir, tag="step-00000008")
    assert _digest(early) == _digest(reference) != _digest(pretrain.load_encoder(exports["zero2"])[0])
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "no_run"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrain export: error:") and "no_run" in err and "\n" not in err
    assert cli_main(["export", str(tiny_runs["zero2"].run_dir), str(tmp_path / "y"), "--tag", "step-00000099"]) == 1
    assert "step-00000099" in capsys.readouterr().err


def test_model_card_carries_the_eval_numbers(tiny_runs, tmp_path):
    import shutil

    run = shutil.copytree(tiny_runs["zero2"].run_dir, tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"head": "continuous", "top1": 0.1234, "top5": 0.25, "tokens": 999}))
    out = ex.export_run(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "| top1 | 0.1234 |" in card and "| top5 | 0.2500 |" in card and "| tokens | 999 |" in card
    assert json.loads((out / "config.json").read_text())["eval"]["top1"] == 0.1234


def test_the_model_card_usage_snippet_runs(exports):
    card = (exports["zero2"] / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("EXPORT_DIR", str(exports["zero2"]))
    scope: dict = {}
    exec(code, scope)  # a fresh namespace: the snippet must import what it uses
    assert scope["hidden"].shape[0] == 1 and scope["hidden"].shape[-1] == 32


@pytest.mark.parametrize("name", ["zero2", "softmax"])
def test_exported_run_loads_in_transformers_and_sentence_transformers(exports, name):
    transformers = pytest.importorskip("transformers", reason="the `.[hf]` extra (make install) provides transformers")
    from sentence_transformers import SentenceTransformer

    model, sp = pretrain.load_encoder(exports[name])
    hf = transformers.AutoModel.from_pretrained(exports[name], trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exports[name], trust_remote_code=True)
    texts = ["a small domesticated carnivore kept as a pet", "the edible fruit of an apple tree"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], _sample_ids(sp, batch["input_ids"].shape[1]))
    with torch.no_grad():
        hidden, reference = hf(**batch).last_hidden_state, model.encode(batch["input_ids"])
    real = batch["attention_mask"].bool()
    assert (hidden[real] - reference[real]).abs().max() <= 1e-5
    vectors = SentenceTransformer(str(exports[name]), trust_remote_code=True, device="cpu").encode(texts, convert_to_tensor=True)
    assert (vectors - model.embed(texts)).abs().max() <= 1e-5
