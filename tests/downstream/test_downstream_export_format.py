"""Export file format on a stand-in module: hashes, shapes, dtypes, tampering, interrupted exports."""
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from pretrain.downstream import export as ex


class _StandIn(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied: one storage, two names
        self.register_buffer("steps", torch.tensor(7, dtype=torch.long))


@pytest.fixture
def standin_export(tmp_path):
    torch.manual_seed(0)
    model = _StandIn()
    (tmp_path / "src").mkdir()
    tok = tmp_path / "src" / "tokenizer.model"
    tok.write_bytes(b"not really a tokenizer, only hashed here")
    targets = tmp_path / "src" / "targets.safetensors"
    targets.write_bytes(b"stand-in table bytes")
    out = ex.write_export(
        tmp_path / "export", state_dict=model.state_dict(), config={"model": {"d_model": 6}}, vocab_size=11,
        tokenizer_path=tok, targets_path=targets, card="# card\n", extra={"source": {"step": 3}},
    )
    return model, out


def test_roundtrip_is_exact_in_fp32_and_keeps_tied_and_integer_tensors(standin_export):
    model, out = standin_export
    manifest = ex.read_manifest(out)
    assert manifest["vocab_size"] == 11 and manifest["weights_dtype"] == "fp32" and manifest["dtype"] == "float32" and manifest["source"] == {"step": 3}
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer.model", "targets.safetensors"}
    assert (out / "README.md").read_text() == "# card\n"
    fresh = _StandIn()
    loaded = ex.load_weights(out / "model.safetensors", fresh.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["steps"].dtype == torch.long
    fresh.load_state_dict(loaded)
    assert fresh.out.weight is fresh.embed.weight


def test_bf16_export_stores_bf16_and_loads_into_fp32_model(tmp_path, standin_export):
    model, out = standin_export
    ex.save_weights(tmp_path / "w.safetensors", model.state_dict(), "bf16")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.metadata()["dtype"] == "bf16"
        assert f.get_tensor("proj.weight").dtype == torch.bfloat16
    loaded = ex.load_weights(tmp_path / "w.safetensors", model.state_dict())
    assert loaded["proj.weight"].dtype == torch.float32
    torch.testing.assert_close(loaded["proj.weight"], model.proj.weight.detach(), atol=0, rtol=2**-8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ex.save_weights(tmp_path / "x.safetensors", model.state_dict(), "fp16")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.model", "targets.safetensors"])
def test_tampered_file_is_refused_by_name(standin_export, name):
    _, out = standin_export
    data = bytearray((out / name).read_bytes())
    data[-1] ^= 1
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ex.ExportError, match=rf"{name}: sha256 .* does not match"):
        ex.read_manifest(out)


def test_missing_files_and_bad_config_json(standin_export, tmp_path):
    _, out = standin_export
    (out / "targets.safetensors").unlink()
    with pytest.raises(ex.ExportError, match="targets.safetensors missing"):
        ex.read_manifest(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ex.ExportError, match="config.json is not valid JSON"):
        ex.read_manifest(out)
    (out / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ex.ExportError, match="is not a softmaxfree-encoder export"):
        ex.read_manifest(out)
    with pytest.raises(FileNotFoundError, match="pretrain export"):
        ex.read_manifest(tmp_path / "absent")


def test_manifest_cannot_point_outside_the_export(standin_export):
    _, out = standin_export
    manifest = json.loads((out / "config.json").read_text())
    manifest["files"]["../src/tokenizer.model"] = {"sha256": "0" * 64}
    (out / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ex.ExportError, match="not a plain file name"):
        ex.read_manifest(out)


def test_shape_and_name_mismatches_are_reported_per_tensor(standin_export):
    _, out = standin_export
    bigger = _StandIn(vocab=12).state_dict()
    with pytest.raises(ex.ExportError, match=r"shape mismatches embed.weight: \(11, 6\) vs model \(12, 6\)"):
        ex.load_weights(out / "model.safetensors", bigger)
    renamed = {("encoder." + k): v for k, v in _StandIn().state_dict().items()}
    with pytest.raises(ex.ExportError, match=r"missing tensors \['encoder.embed.weight'.*unexpected tensors \['embed.weight'"):
        ex.load_weights(out / "model.safetensors", renamed)


def test_truncated_weights_file_is_a_clear_error(standin_export):
    _, out = standin_export
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ex.ExportError, match="not a readable safetensors file"):
        ex.load_weights(path, _StandIn().state_dict())


def test_failed_reexport_leaves_no_loadable_export(standin_export, tmp_path):
    model, out = standin_export
    with pytest.raises(ValueError, match="dtype"):
        ex.write_export(out, state_dict=model.state_dict(), config={}, vocab_size=11, tokenizer_path=out / "tokenizer.model",
                        targets_path=out / "targets.safetensors", dtype="fp16")
    with pytest.raises(ex.ExportError, match="not a complete export"):
        ex.read_manifest(out)


def test_export_onto_an_existing_file_is_refused(standin_export, tmp_path):
    model, out = standin_export
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(ex.ExportError, match="a_file is a file, not a directory"):
        ex.write_export(target, state_dict=model.state_dict(), config={}, vocab_size=11, tokenizer_path=out / "tokenizer.model",
                        targets_path=None)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("edit", [
    lambda m: m["config"]["model"].update(objective="causal"),  # masked -> causal: would build another model
    lambda m: m.update(vocab_size=12),
    lambda m: m.update(special_ids={"pad": 1}),
])
def test_edited_config_json_is_refused_naming_the_file(standin_export, edit):
    _, out = standin_export
    manifest = json.loads((out / "config.json").read_text())
    edit(manifest)
    (out / "config.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ex.ExportError, match=r"config.json was edited after the export .*model.safetensors.*re-run `pretrain export`"):
        ex.read_manifest(out)


def test_config_signature_survives_reformatting_but_not_weights_from_another_export(standin_export, tmp_path):
    model, out = standin_export
    manifest = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(manifest, indent=4, sort_keys=True))  # same contents, other layout
    assert ex.read_manifest(out)["vocab_size"] == 11
    # weights of an export with another config, their hash patched into this config.json: still refused
    other = ex.write_export(tmp_path / "other", state_dict=model.state_dict(), config={"model": {"d_model": 7}}, vocab_size=11,
                            tokenizer_path=out / "tokenizer.model", targets_path=None)
    (out / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    manifest["files"]["model.safetensors"]["sha256"] = ex.file_sha256(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ex.ExportError, match="config.json was edited after the export"):
        ex.read_manifest(out)


def test_export_from_before_config_signing_is_refused_with_the_fix(standin_export):
    _, out = standin_export
    manifest = json.loads((out / "config.json").read_text())
    manifest["format_version"] = 1  # written before config signing and the Hugging Face files
    (out / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ex.ExportError, match=r"format_version 1 is not supported \(this code reads 2\); re-run `pretrain export`"):
        ex.read_manifest(out)
