"""An export loads in Hugging Face tools (transformers, sentence-transformers) and computes what
pretrain.load_encoder computes; the Hugging Face files are hashed and signed like the rest."""
import json
import subprocess
import sys

import pytest
import torch

from pretrain.downstream import export as ex
from pretrain.downstream import hf_files

transformers = pytest.importorskip("transformers", reason="the `.[hf]` extra (make install) provides transformers")

TEXTS = ["a small domesticated carnivore kept as a pet", "the edible fruit of an apple tree", "x"]


def _pretrain_batch(sp, texts):
    rows = [sp.encode(t) + [sp.eos_id()] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), sp.pad_id(), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


def test_automodel_and_autotokenizer_match_load_encoder_on_a_padded_batch(untrained_export):
    from transformers import AutoModel, AutoTokenizer

    model, sp = ex.load_encoder(untrained_export)
    hf_model = AutoModel.from_pretrained(untrained_export, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(untrained_export, trust_remote_code=True)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids = _pretrain_batch(sp, TEXTS)
    assert torch.equal(batch["input_ids"], ids)  # same pieces, eos at the end, pad id 0 to the right
    assert batch["attention_mask"].sum(1).tolist() == [len(sp.encode(t)) + 1 for t in TEXTS]
    with torch.no_grad():
        reference = model.encode(ids)
        hidden = hf_model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (hidden[real] - reference[real]).abs().max() <= 1e-5
    # each row alone (no padding) gives its padded row's hidden states: the mask really masks
    with torch.no_grad():
        alone = hf_model(**tokenizer(TEXTS[2:], return_tensors="pt")).last_hidden_state
    assert (alone[0] - hidden[2, : alone.shape[1]]).abs().max() <= 1e-5
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == TEXTS[0]


def test_fast_tokenizer_equals_sentencepiece_on_unseen_text(untrained_export, repo_root):
    import gzip

    from transformers import AutoTokenizer

    _, sp = ex.load_encoder(untrained_export)
    tokenizer = AutoTokenizer.from_pretrained(untrained_export)  # no remote code needed for the tokenizer
    with gzip.open(repo_root / "data" / "corpus" / "wordnet_glosses.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(800_000)[400_000:]  # the tokenizer was trained on the first 400 KB
    lines = [line for line in text.splitlines()[1:] if line][:3000] + hf_files.PROBE_TEXTS
    assert tokenizer.is_fast
    assert [tokenizer(t, add_special_tokens=False)["input_ids"] for t in lines] == sp.encode(lines)


def test_hf_files_are_hashed_signed_and_load_encoder_needs_no_transformers(untrained_export):
    manifest = ex.read_manifest(untrained_export)
    for name in (hf_files.MODELING_FILE, hf_files.HF_TOKENIZER_FILE, hf_files.HF_TOKENIZER_CONFIG_FILE, *hf_files.ST_FILES):
        assert name in manifest["files"], name
    assert manifest["auto_map"]["AutoModel"] == "modeling_softmaxfree.SoftmaxFreeModel"
    # load_encoder in a fresh interpreter where importing transformers fails
    script = (
        "import sys; sys.modules['transformers'] = None; sys.modules['sentence_transformers'] = None\n"
        f"import pretrain; m, sp = pretrain.load_encoder({str(untrained_export)!r}); print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PretrainModel"
    # the modeling file stands alone: no import of this package
    assert "pretrain" not in {line.split()[1].split(".")[0] for line in (untrained_export / hf_files.MODELING_FILE).read_text().splitlines()
                             if line.startswith(("import ", "from "))}


def test_tampered_modeling_file_is_refused(untrained_export, tmp_path):
    import shutil

    copy = shutil.copytree(untrained_export, tmp_path / "copy")
    with open(copy / hf_files.MODELING_FILE, "a") as f:
        f.write("\nimport os  # injected\n")
    with pytest.raises(ex.ExportError, match=rf"{hf_files.MODELING_FILE}: sha256 .* does not match"):
        ex.load_encoder(copy)


def test_sequence_classification_model_loads_the_export_encoder_and_mean_pools(untrained_export):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, _ = ex.load_encoder(untrained_export)
    hf = AutoModelForSequenceClassification.from_pretrained(untrained_export, trust_remote_code=True, num_labels=3).eval()
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(hf.model.encoder.state_dict()[name], value), name  # the export's weights, not a fresh init
    batch = AutoTokenizer.from_pretrained(untrained_export)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**batch).logits
    torch.testing.assert_close(logits, hf.classifier(model.embed(TEXTS)), atol=1e-5, rtol=0)


def test_hf_trainer_example_fine_tunes_an_export(untrained_export, tmp_path, repo_root):
    import importlib.util

    from pretrain.downstream.classify import read_labelled

    data = read_labelled(repo_root / "data/finetune/train.jsonl")
    rows = [{"body": t, "topic": y} for t, y in zip(data.texts, data.labels)][:160]
    train_file = tmp_path / "news.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = importlib.util.spec_from_file_location("hf_trainer_finetune", repo_root / "docs/examples/hf_trainer_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer, metrics = example.main([str(untrained_export), str(train_file), "--text-field", "body", "--label-field", "topic",
                                     "--out", str(tmp_path / "out"), "--epochs", "2"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == 160
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and trainer.state.global_step == 2 * -(-len(trainer.train_dataset) // 16)
    before, _ = ex.load_encoder(untrained_export)
    tuned = trainer.model.model.encoder.embed.tok_emb.weight.detach().cpu()
    assert not torch.equal(tuned, before.encoder.embed.tok_emb.weight)  # the encoder was fine-tuned too


def test_inexact_or_unconvertible_tokenizer_falls_back_to_sentencepiece_with_a_logged_reason(untrained_export, tmp_path, monkeypatch, caplog, repo_root):
    import gzip
    import shutil

    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from pretrain.data.tokenizer import load_tokenizer

    sp = load_tokenizer(untrained_export / "tokenizer.model")
    model_cfg = ex.read_manifest(untrained_export)["config"]["model"]
    exact = hf_files.fast_tokenizer

    def lowercasing(sp):  # a conversion that loses case: differs from SentencePiece on capitals
        tok = exact(sp)
        tok.normalizer = normalizers.Sequence([tok.normalizer, normalizers.Lowercase()])
        return tok

    monkeypatch.setattr(hf_files, "fast_tokenizer", lowercasing)
    out = tmp_path / "a"
    out.mkdir()
    shutil.copyfile(untrained_export / "tokenizer.model", out / "tokenizer.model")
    shutil.copyfile(untrained_export / "config.json", out / "config.json")
    with caplog.at_level("WARNING"):
        written = hf_files.write_hf_files(out, sp, "unigram", model_cfg)
    assert hf_files.HF_TOKENIZER_FILE not in written and not (out / hf_files.HF_TOKENIZER_FILE).exists()
    assert "differs from SentencePiece on" in caplog.text and "Capitalised" in caplog.text
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(tokenizer).__name__ == "SoftmaxFreeTokenizer"
    with gzip.open(repo_root / "data" / "corpus" / "wordnet_glosses.txt.gz", "rt", encoding="utf-8") as f:
        lines = [line for line in f.read(500_000)[400_000:].splitlines()[1:] if line][:500] + hf_files.PROBE_TEXTS
    assert [tokenizer(t)["input_ids"] for t in lines] == [ids + [sp.eos_id()] for ids in sp.encode(lines)]
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], _pretrain_batch(sp, TEXTS))
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == TEXTS[0]
    (tmp_path / "b").mkdir()
    assert hf_files.HF_TOKENIZER_FILE not in hf_files.write_hf_files(tmp_path / "b", sp, "bpe", model_cfg)
    assert "SentencePiece bpe model; only unigram converts exactly" in caplog.text


def test_causal_export_is_causal_in_transformers_too(make_untrained_export):
    from transformers import AutoModel

    causal = make_untrained_export("causal", overrides={"objective": "causal"}, seed=3)
    model, sp = ex.load_encoder(causal)
    hf = AutoModel.from_pretrained(causal, trust_remote_code=True).eval()
    assert hf.config.is_causal is True
    ids = _pretrain_batch(sp, TEXTS)
    mask = (ids != sp.pad_id()).long()
    with torch.no_grad():
        reference, hidden = model.encode(ids), hf(input_ids=ids, attention_mask=mask).last_hidden_state
        later = ids.clone()
        later[0, 3:] = 7
        prefix = hf(input_ids=later, attention_mask=torch.ones_like(later)).last_hidden_state
    assert (hidden[mask.bool()] - reference[mask.bool()]).abs().max() <= 1e-5
    torch.testing.assert_close(prefix[0, :3], hidden[0, :3], atol=1e-5, rtol=0)  # the future does not leak


def test_a_converted_tokenizer_is_reused_not_converted_again(untrained_export, tmp_path, monkeypatch):
    """Fine-tuning saves copy the source export's checked tokenizer.json instead of a second conversion."""
    from pretrain.data.tokenizer import load_tokenizer

    sp = load_tokenizer(untrained_export / "tokenizer.model")
    model_cfg = ex.read_manifest(untrained_export)["config"]["model"]

    def no_conversion(sp):
        raise AssertionError("converted again")

    monkeypatch.setattr(hf_files, "fast_tokenizer", no_conversion)
    out = tmp_path / "finetuned"
    out.mkdir()
    written = hf_files.write_hf_files(out, sp, "unigram", model_cfg, converted_in=untrained_export)
    assert hf_files.HF_TOKENIZER_FILE in written
    assert (out / hf_files.HF_TOKENIZER_FILE).read_bytes() == (untrained_export / hf_files.HF_TOKENIZER_FILE).read_bytes()
    config = json.loads((out / hf_files.HF_TOKENIZER_CONFIG_FILE).read_text())
    assert config == json.loads((untrained_export / hf_files.HF_TOKENIZER_CONFIG_FILE).read_text())
    with pytest.raises(AssertionError, match="converted again"):  # without a converted one: converts
        hf_files.write_hf_files(tmp_path, sp, "unigram", model_cfg, converted_in=tmp_path / "nowhere")
