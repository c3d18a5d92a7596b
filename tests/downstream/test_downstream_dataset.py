"""Labelled-data reading (CSV/TSV/JSONL) with clear errors, the pooled classifier, and the metrics."""
import json

import pytest
import torch
from torch import nn

from pretrain.downstream.classify import (
    LabelledTexts, SequenceClassifier, WindowPolicy, balanced_head, holdout_split, label_vocabulary, read_labelled,
)
from pretrain.downstream.finetune import classification_metrics, majority_baseline


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_csv_tsv_read_the_same_rows(tmp_path):
    rows = [("a plant, green", "plant"), ('a "quoted" dog', "animal"), ("bread", "food")]
    jsonl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": t, "label": y, "extra": 1}) for t, y in rows) + "\n\n")
    csv = _write(tmp_path / "d.csv", "label,text\n" + "".join(f'{y},"{t.replace(chr(34), chr(34) * 2)}"\n' for t, y in rows))
    tsv = _write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows if '"' not in t))
    for path in (jsonl, csv):
        data = read_labelled(path)
        assert list(zip(data.texts, data.labels)) == rows
    assert read_labelled(tsv).labels == ["plant", "food"]


def test_integer_labels_and_renamed_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"sentence": "x", "y": 0}\n{"sentence": "z", "y": 1}\n')
    data = read_labelled(path, text_field="sentence", label_field="y")
    assert data.labels == ["0", "1"] and data.texts == ["x", "z"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "holds no rows"),
        ("blank.jsonl", "\n  \n", "holds no rows"),
        ("header_only.csv", "text,label\n", "holds no rows"),
        ("no_label.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "tag": "y"}\n', "line 2: no column 'label'"),
        ("no_label.csv", "text,tag\nhello,x\n", "no column 'label'"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n', "line 2: not valid JSON"),
        ("list.jsonl", '["a", "x"]\n', "expected a JSON object"),
        ("empty_text.jsonl", '{"text": "  ", "label": "x"}\n', "empty or missing 'text'"),
        ("null_label.jsonl", '{"text": "a", "label": null}\n', "empty or missing 'label'"),
        ("dict_label.jsonl", '{"text": "a", "label": {"k": 1}}\n', "must be a string or an integer"),
        ("data.parquet", "x", "unknown format '.parquet'"),
    ],
)
def test_bad_files_raise_errors_that_name_the_file(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message) as info:
        read_labelled(path)
    assert str(path) in str(info.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        read_labelled(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_labelled(path)


def test_label_vocabulary_refuses_unknown_and_single_labels(tmp_path):
    train = read_labelled(_write(tmp_path / "t.jsonl", '{"text": "a", "label": "b"}\n{"text": "c", "label": "a"}\n'))
    valid = read_labelled(_write(tmp_path / "v.jsonl", '{"text": "a", "label": "a"}\n{"text": "c", "label": "zebra"}\n'))
    assert label_vocabulary(train) == ["a", "b"]
    with pytest.raises(ValueError, match=r"\['zebra'\] never appear in the training file.*row 2"):
        label_vocabulary(train, valid)
    single = read_labelled(_write(tmp_path / "s.jsonl", '{"text": "a", "label": "b"}\n'))
    with pytest.raises(ValueError, match="only one label"):
        label_vocabulary(single)


def test_shipped_dataset_reads_cleanly(repo_root):
    train = read_labelled(repo_root / "data/finetune/train.jsonl")
    valid = read_labelled(repo_root / "data/finetune/valid.jsonl")
    assert (len(train), len(valid)) == (3200, 800)
    assert label_vocabulary(train, valid) == ["animal", "food", "person", "plant"]


class _PositionwiseEncoder(nn.Module):
    """Stand-in encoder whose hidden state at a position depends only on that token."""

    max_positions = 4

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)

    def encode(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def test_mean_pooling_ignores_padding_and_first_takes_position_zero():
    torch.manual_seed(0)
    enc = _PositionwiseEncoder()
    model = SequenceClassifier(enc, hidden_size=3, num_labels=2, pooling="mean", pad_id=0).eval()
    short = model.batch([[5, 6, 7]])
    padded = model.batch([[5, 6, 7], [1, 2, 3, 4]])
    assert padded.input_ids.tolist()[0] == [5, 6, 7, 0] and padded.attention_mask.tolist()[0] == [1, 1, 1, 0]
    torch.testing.assert_close(model(padded)[0], model(short)[0])
    torch.testing.assert_close(model.features(short), enc.embed.weight[[5, 6, 7]].mean(0, keepdim=True))
    first = SequenceClassifier(enc, hidden_size=3, num_labels=2, pooling="first", pad_id=0)
    torch.testing.assert_close(first.features(padded), enc.embed.weight[[5, 1]])
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(enc, 3, 2, pooling="max")


def test_a_text_longer_than_a_window_is_the_mean_of_its_windows_not_cut():
    enc = _PositionwiseEncoder()
    model = SequenceClassifier(enc, hidden_size=3, num_labels=2, pooling="mean", pad_id=0,
                               windows=WindowPolicy(window=4, stride=2, max_windows=0)).eval()
    text = [5, 6, 7, 8, 9, 5]  # windows [5 6 7 8], [7 8 9 5]
    w = enc.embed.weight
    expected = (w[[5, 6, 7, 8]].mean(0) + w[[7, 8, 9, 5]].mean(0)) / 2
    torch.testing.assert_close(model.features(model.batch([text, [5]])), torch.stack([expected, w[5]]))
    first = SequenceClassifier(enc, 3, 2, pooling="first", windows=WindowPolicy(4, 2, 0))
    torch.testing.assert_close(first.features(first.batch([text])), ((w[5] + w[7]) / 2)[None])


def test_metrics_match_hand_computed_values():
    gold = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    scores = classification_metrics(pred, gold, 3)
    # per class (P, R): 0 -> (1/2, 1/2), 1 -> (2/3, 1), 2 -> (1, 1/2)
    assert scores["per_class_f1"] == [0.5, 0.8, round(2 / 3, 4)]
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class that is never predicted nor present scores 0, without NaN
    never = classification_metrics(torch.tensor([0, 0]), torch.tensor([0, 1]), 3)
    assert never["per_class_f1"] == [pytest.approx(2 / 3, abs=1e-4), 0.0, 0.0]


def test_majority_baseline_is_the_most_frequent_label_of_the_evaluation_split():
    base = majority_baseline([2, 1, 1, 0], 3)
    assert base["label_index"] == 1
    assert base["accuracy"] == pytest.approx(0.5)
    assert base["macro_f1"] == pytest.approx((0 + 2 / 3 + 0) / 3)
    # a tie goes to the lowest index, whatever order the rows come in (not the first label seen)
    assert majority_baseline([2, 0, 2, 0, 1], 3)["label_index"] == 0


def test_holdout_split_keeps_every_label_in_both_parts_and_is_seeded(tmp_path):
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2
    data = LabelledTexts(tmp_path / "x.csv", [f"t{i}" for i in range(len(labels))], labels)
    train, held = holdout_split(data, 0.2, seed=0)
    assert sorted(held.labels) == ["a", "a", "b", "c"] and len(train) == 13
    assert set(train.texts) | set(held.texts) == set(data.texts) and not set(train.texts) & set(held.texts)
    assert holdout_split(data, 0.2, seed=0)[1].texts == held.texts
    assert holdout_split(data, 0.2, seed=1)[1].texts != held.texts


def test_balanced_head_takes_the_first_rows_of_each_label(tmp_path):
    labels = ["a", "a", "b", "a", "c", "b", "c", "a", "b", "c"]
    data = LabelledTexts(tmp_path / "x.jsonl", [f"t{i}" for i in range(len(labels))], labels)
    head = balanced_head(data, 6)
    assert head.labels == ["a", "a", "b", "c", "b", "c"]
    assert head.texts == ["t0", "t1", "t2", "t4", "t5", "t6"]
    assert balanced_head(data, 0) is data and balanced_head(data, 99) is data
