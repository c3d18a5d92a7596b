"""`pretrain finetune` on the shipped WordNet-domain dataset, from a tiny export and from scratch."""
import csv
import json

import pytest
import torch

from pretrain.cli import main as cli_main
from pretrain.config import ConfigError, load_config
from pretrain.downstream import export as ex
from pretrain.downstream.classify import document_ids, read_labelled
from pretrain.downstream.finetune import classification_metrics, finetune, initial_encoder, load_classifier, predict

pytestmark = pytest.mark.multiproc  # needs the tiny_runs fixture (2-process training)


@pytest.fixture(scope="module")
def tiny_export(tiny_runs, tmp_path_factory):
    return ex.export_run(tiny_runs["zero2"].run_dir, tmp_path_factory.mktemp("ft") / "export")


@pytest.fixture(scope="module")
def finetuned(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "pretrained"
    # the tiny encoder has max_seq_len 32; MLflow goes to a SQLite store inside `out`
    cfg = load_config(None, ["finetune.max_len=32", "finetune.epochs=2", "finetune.max_train_examples=0"])
    return finetune(cfg, tiny_export, out), out


def test_finetuning_beats_the_majority_baseline(finetuned):
    report, _ = finetuned
    assert report["labels"] == ["animal", "food", "person", "plant"]
    # the shipped validation file is balanced (200 per label): majority = the lowest-index label, 0.25
    assert report["majority_baseline"]["accuracy"] == pytest.approx(0.25) and report["majority_baseline"]["label"] == "animal"
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert report["history"][1]["train_loss"] < report["history"][0]["train_loss"]
    assert report["accuracy"] > report["majority_baseline"]["accuracy"] + 0.25
    assert report["macro_f1"] > report["majority_baseline"]["macro_f1"] + 0.25
    assert report["accuracy"] == report["history"][-1]["accuracy"] and report["from_scratch"] is False


def test_saved_classifier_reproduces_the_reported_scores(finetuned, repo_root):
    report, out = finetuned
    written = json.loads((out / "finetune_report.json").read_text())
    assert written["accuracy"] == report["accuracy"]
    model, sp, labels = load_classifier(out)
    valid = read_labelled(repo_root / "data/finetune/valid.jsonl")
    gold = torch.tensor([labels.index(y) for y in valid.labels])
    with torch.no_grad():
        pred = predict(model, document_ids(sp, valid.texts), 64)
    assert classification_metrics(pred, gold, len(labels))["accuracy"] == pytest.approx(report["accuracy"])
    # the fine-tuned directory is an export too: the encoder alone loads, and it changed
    encoder, _ = ex.load_encoder(out)
    before, _ = ex.load_encoder(ex.read_manifest(out)["finetuned_from"]["export"])
    assert not torch.equal(encoder.encoder.embed.tok_emb.weight, before.encoder.embed.tok_emb.weight)
    assert "| 2 |" in (out / "README.md").read_text()
    (out / "classifier.safetensors").write_bytes(b"tampered")
    with pytest.raises(ex.ExportError, match="classifier.safetensors: sha256"):
        load_classifier(out)


def test_finetuning_logs_params_and_metrics_to_mlflow(finetuned):
    from mlflow import MlflowClient

    _, out = finetuned
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("softmax-free-pretraining").experiment_id])[0]
    assert run.data.params["finetune.init"].endswith("export")
    assert run.data.params["finetune.from_scratch"] == "False"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(json.loads((out / "finetune_report.json").read_text())["accuracy"])
    artifacts = {a.path: [f.path for f in client.list_artifacts(run.info.run_id, a.path)] if a.is_dir else None
                 for a in client.list_artifacts(run.info.run_id)}
    assert sorted(artifacts["encoder"]) == ["encoder/README.md", "encoder/config.json", "encoder/tokenizer.model"]
    assert "data" not in artifacts and "finetune_report.json" in artifacts  # not the pretraining data's files


def test_from_scratch_is_the_same_architecture_with_fresh_weights(tiny_export):
    pretrained, _, _ = initial_encoder(tiny_export, from_scratch=False, seed=0)
    scratch, _, _ = initial_encoder(tiny_export, from_scratch=True, seed=0)
    assert {k: v.shape for k, v in scratch.state_dict().items()} == {k: v.shape for k, v in pretrained.state_dict().items()}
    for name, value in pretrained.state_dict().items():
        if name.endswith("weight") and value.ndim == 2:
            assert not torch.equal(value, scratch.state_dict()[name]), name
    again, _, _ = initial_encoder(tiny_export, from_scratch=True, seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in scratch.state_dict().items())


def _subset_csv(src, dst, rows):
    data = read_labelled(src)
    with open(dst, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "domain"])
        writer.writerows(list(zip(data.texts, data.labels))[:rows])
    return dst


def test_cli_from_scratch_on_csv_files(tiny_export, tmp_path, repo_root, capsys):
    train = _subset_csv(repo_root / "data/finetune/train.jsonl", tmp_path / "train.csv", 320)
    valid = _subset_csv(repo_root / "data/finetune/valid.jsonl", tmp_path / "valid.csv", 80)
    out = tmp_path / "scratch"
    args = ["finetune", f"finetune.train_file={train}", f"finetune.valid_file={valid}", "finetune.text_field=sentence",
            "finetune.label_field=domain", "finetune.max_len=32", "finetune.epochs=1", "tracking.enabled=false",
            "--from-scratch", "--init", str(tiny_export), "--out", str(out)]
    assert cli_main(args) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["from_scratch"] is True and (report["train_rows"], report["valid_rows"]) == (320, 80)
    assert "from_scratch: true" in (out / "config.resolved.yaml").read_text()
    assert "scratch (finetune): accuracy" in capsys.readouterr().out


def test_cli_reports_data_and_config_errors_in_one_line(tiny_export, tmp_path, capsys):
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"text": "a kind of whale", "label": "mammal"}\n')
    out = ["--out", str(tmp_path / "o")]
    assert cli_main(["finetune", "finetune.max_len=32", f"finetune.valid_file={valid}", "--init", str(tiny_export), *out]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "['mammal'] never appear in the training file" in err
    assert cli_main(["finetune", "--init", str(tiny_export), *out]) == 1
    assert "finetune.max_len=64 exceeds the encoder's model.max_seq_len=32" in capsys.readouterr().err
    assert cli_main(["finetune", "--init", str(tmp_path / "missing"), *out]) == 1
    assert "pretrain export" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert cli_main(["finetune", "finetune.max_len=32", "--init", str(tiny_export), "--out", str(tmp_path / "a_file")]) == 1
    assert "a_file is a file, not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are known good


def test_max_len_beyond_the_encoder_is_a_config_error(tiny_export, tmp_path):
    with pytest.raises(ConfigError, match="set finetune.max_len=32 or less"):
        finetune(load_config(None, ["finetune.max_len=48"]), tiny_export, tmp_path / "o")


def test_output_directory_must_not_be_the_initial_export(tiny_export):
    before = (tiny_export / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="is the --init export itself"):
        finetune(load_config(None, ["finetune.max_len=32"]), tiny_export, tiny_export)
    assert (tiny_export / "config.json").read_bytes() == before
