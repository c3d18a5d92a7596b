"""`pretrain finetune` on a user's own CSV/JSONL file (string labels, held-out fraction, long texts,
probe, baselines) and the from-scratch / table-initialised baselines, on untrained tiny exports."""
import csv
import json

import pytest
import torch

import pretrain
from pretrain.cli import main as cli_main
from pretrain.downstream import export as ex
from pretrain.downstream.card import export_card
from pretrain.downstream.classify import document_ids, holdout_split, read_labelled
from pretrain.downstream.finetune import load_classifier, predict
from pretrain.model import init_embeddings_from_table

TOPICS = {"animal": "zoo", "food": "kitchen", "person": "office", "plant": "garden"}


def _user_rows(repo_root, rows_per_label, long_every=5):
    """Rows of the shipped set, labels renamed to the user's own strings; every long_every-th text
    made long (well past the encoder's 32 positions) by repeating it."""
    data = read_labelled(repo_root / "data/finetune/train.jsonl")
    taken, out = {}, []
    for text, label in zip(data.texts, data.labels):
        if taken.get(label, 0) < rows_per_label:
            taken[label] = taken.get(label, 0) + 1
            out.append({"body": " ".join([text] * 12) if len(out) % long_every == 0 else text, "topic": TOPICS[label]})
    return out


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["topic", "body"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def csv_run(untrained_export, tmp_path_factory, request):
    repo_root = request.config.rootpath
    tmp = tmp_path_factory.mktemp("user_csv")
    train = _write_csv(tmp / "news.csv", _user_rows(repo_root, 40))
    out = tmp / "out"
    args = ["finetune", "finetune.max_len=32", "finetune.epochs=2", "tracking.enabled=false", "--train", str(train),
            "--text-field", "body", "--label-field", "topic", "--init", str(untrained_export), "--out", str(out)]
    assert cli_main(args) == 0
    return json.loads((out / "finetune_report.json").read_text()), out, train


def test_user_csv_uses_every_row_holds_out_a_fraction_and_maps_string_labels(csv_run):
    report, out, _ = csv_run
    assert report["labels"] == ["garden", "kitchen", "office", "zoo"]
    rows = report["rows"]
    assert rows["train"]["rows"] == rows["train"]["rows_available"] == 128  # 160 rows, 20% of each label held out
    assert rows["valid"]["per_label"] == {"garden": 8, "kitchen": 8, "office": 8, "zoo": 8}
    assert sum(rows["train"]["per_label"].values()) == 128 and report["valid_rows"] == 32
    assert set(report["per_class"]) == set(report["labels"]) and all(c["support"] == 8 for c in report["per_class"].values())
    assert report["majority_baseline"]["accuracy"] == pytest.approx(0.25)
    assert 0.0 <= report["tfidf_baseline"]["accuracy"] <= 1.0 and report["tfidf_baseline"]["accuracy"] > 0.25
    # long texts were read by windows, and the policy is written down
    assert report["windows"]["longest_text_tokens"] > 32 and report["windows"]["window"] == 32
    assert "sliding windows of 32 tokens, 16 apart (at most 4 windows" in report["windows"]["policy"]
    card = (out / "README.md").read_text()
    assert report["windows"]["policy"] in card and "| zoo | 8 |" in card and "TF-IDF + logistic regression: accuracy" in card
    # the labels are saved with the model, and the saved classifier reproduces the score
    model, sp, labels = load_classifier(out)
    assert labels == report["labels"]


def test_saved_user_classifier_reproduces_its_accuracy_on_the_held_out_rows(csv_run):
    report, out, train = csv_run
    model, sp, labels = load_classifier(out)
    assert model.windows.window == 32 and model.windows.max_windows == 4
    # the held-out rows are re-derived with the same seed and fraction
    _, held = holdout_split(read_labelled(train, "body", "topic"), 0.2, 0)
    pred = predict(model, document_ids(sp, held.texts), 16)
    gold = torch.tensor([labels.index(y) for y in held.labels])
    assert float((pred == gold).float().mean()) == pytest.approx(report["accuracy"])


def test_cli_prints_row_counts_per_split_and_label(untrained_export, tmp_path, repo_root, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _user_rows(repo_root, 12))
    valid = _write_jsonl(tmp_path / "valid.jsonl", _user_rows(repo_root, 12)[:20])
    out = tmp_path / "probe"
    args = ["finetune", "finetune.max_len=32", "finetune.tfidf_baseline=false", "--probe",
            "--train", str(train), "--valid", str(valid), "--text-field", "body", "--label-field", "topic",
            "--init", str(untrained_export), "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "rows: train 48 {'garden': 12, 'kitchen': 12, 'office': 12, 'zoo': 12}, evaluation 20" in printed
    assert "pretrained (probe): accuracy" in printed and "zoo" in printed
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["mode"] == "probe" and report["tfidf_baseline"] is None and len(report["history"]) == 1
    # the probe leaves the encoder exactly as exported
    before, _ = ex.load_encoder(untrained_export)
    after, _ = ex.load_encoder(out)
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())
    assert report["history"][0]["train_loss"] < 1.3  # fitted below chance's log(4) = 1.386 on its own rows
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("softmax-free-pretraining").experiment_id])[0]
    assert run.data.metrics["majority_accuracy"] == pytest.approx(report["majority_baseline"]["accuracy"])
    assert run.data.metrics["accuracy"] == pytest.approx(report["accuracy"]) and "tfidf_accuracy" not in run.data.metrics


def test_finetune_help_names_the_finetune_keys(capsys):
    with pytest.raises(SystemExit):
        cli_main(["finetune", "--help"])
    text = capsys.readouterr().out
    for key in ("finetune.train_file", "finetune.valid_file", "finetune.text_field", "finetune.label_field", "finetune.max_len",
                "finetune.window_stride", "finetune.max_windows", "finetune.max_train_examples", "finetune.device"):
        assert key in text, key


def test_card_describes_the_head_the_run_used(untrained_export):
    manifest = ex.read_manifest(untrained_export)
    args = dict(name="r", vocab_size=10, num_parameters=5, dtype="fp32", source={})
    softmax = export_card(config=manifest["config"], **args)
    assert "softmax head over the vocabulary" in softmax and "nearest-neighbour" not in softmax and "softmax-free" not in softmax
    continuous_cfg = json.loads(json.dumps(manifest["config"]))
    continuous_cfg["model"]["head"] = "continuous"
    continuous = export_card(config=continuous_cfg, **args)
    assert "# r: softmax-free masked encoder" in continuous and "nearest-neighbour" in continuous
    assert "sliding windows" in continuous and "trust_remote_code=True" in continuous


def test_baselines_random_and_table_initialised(untrained_continuous_export):
    pretrained, _ = pretrain.load_encoder(untrained_continuous_export)
    random_init, sp = pretrain.baseline_encoder(untrained_continuous_export, embeddings="random", seed=1)
    table_init, _ = pretrain.baseline_encoder(untrained_continuous_export, embeddings="table", seed=1)
    emb = lambda m: m.encoder.embed.tok_emb.weight  # noqa: E731
    assert not torch.equal(emb(random_init), emb(pretrained)) and not torch.equal(emb(table_init), emb(random_init))
    expected = torch.empty_like(emb(table_init))
    init_embeddings_from_table(expected, pretrained.target_table, seed=1)
    assert torch.equal(emb(table_init), expected)
    # the rest of the table-initialised model is as random as the other baseline's
    assert torch.equal(table_init.encoder.blocks[0].attn.qkv.weight, random_init.encoder.blocks[0].attn.qkv.weight)
    assert random_init.embed(["a pet"]).shape == (1, 32)
    with pytest.raises(ValueError, match="'random' or 'table'"):
        pretrain.baseline_encoder(untrained_continuous_export, embeddings="pretrained")


def test_table_init_needs_a_table_and_from_scratch(untrained_export, tmp_path):
    with pytest.raises(ex.ExportError, match="no targets.safetensors"):
        pretrain.baseline_encoder(untrained_export, embeddings="table")
    from pretrain.config import ConfigError, load_config
    from pretrain.downstream.finetune import finetune

    with pytest.raises(ConfigError, match="--from-scratch"):
        finetune(load_config(None, ["finetune.max_len=32", "finetune.table_init=true"]), untrained_export, tmp_path / "o")


def test_device_cuda_without_a_gpu_is_a_clear_error_and_auto_picks_what_exists():
    from pretrain.config import ConfigError
    from pretrain.downstream.finetune import pick_device

    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")


def test_probe_first_starts_fine_tuning_from_the_probes_head(untrained_export, tmp_path, repo_root, capsys):
    """finetune.probe_first (LP-FT): the head is fitted on the frozen encoder as --probe fits it, then
    everything is fine-tuned from there. With a vanishing lr the fine-tuned head stays the probe's head;
    without probe_first it stays the random one."""
    train = _write_jsonl(tmp_path / "train.jsonl", _user_rows(repo_root, 12))
    valid = _write_jsonl(tmp_path / "valid.jsonl", _user_rows(repo_root, 12)[:20])

    def head_after(name, *extra):
        out = tmp_path / name
        args = ["finetune", "finetune.max_len=32", "finetune.tfidf_baseline=false", "tracking.enabled=false", "finetune.epochs=1",
                "finetune.lr=1e-12", *extra, "--train", str(train), "--valid", str(valid), "--text-field", "body",
                "--label-field", "topic", "--init", str(untrained_export), "--out", str(out)]
        assert cli_main(args) == 0
        return load_classifier(out)[0].head.weight

    probe, lp_ft, plain = head_after("probe", "--probe"), head_after("lpft", "--probe-first"), head_after("plain")
    assert torch.allclose(lp_ft, probe, atol=1e-6)
    assert not torch.allclose(plain, probe, atol=1e-2)
    both = ["finetune", "--probe", "--probe-first", "--train", str(train), "--valid", str(valid), "--init", str(untrained_export), "--out", str(tmp_path / "both")]
    capsys.readouterr()
    assert cli_main(both) == 1 and "choose one" in capsys.readouterr().err
