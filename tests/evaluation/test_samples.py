"""The readable side-by-side sample, detokenised with a real SentencePiece model."""
import gzip
import itertools
from pathlib import Path

import pytest
import torch

from pretrain.data.tokenizer import SPECIAL_IDS, train_tokenizer
from pretrain.evaluation.samples import DOC_BREAK, MASK_TEXT, format_samples, side_by_side
from pretrain.model import IGNORE_INDEX

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus" / "wordnet_glosses.txt.gz"
TEXT = "whole, unit: an assemblage of parts that is regarded as a single entity"


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    with gzip.open(CORPUS, "rt") as f:
        lines = [line.rstrip("\n") for line in itertools.islice(f, 3000)]
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    return train_tokenizer(lines, path, model_type="unigram", vocab_size=400, character_coverage=1.0, seed=0, num_threads=1)


def masked_case(sp, positions):
    original = torch.tensor(sp.encode(TEXT))
    labels = torch.full_like(original, IGNORE_INDEX)
    labels[positions] = original[positions]
    corrupted = original.clone()
    corrupted[positions] = SPECIAL_IDS["mask"]
    return original, corrupted, labels


def test_masked_sample_shows_targets_and_predictions_in_brackets(sp):
    positions = [1, 4, 9]
    original, corrupted, labels = masked_case(sp, positions)
    predicted = torch.full_like(original, IGNORE_INDEX)
    predicted[positions] = original[positions]
    wrong = sp.piece_to_id("\u2581the")
    predicted[4] = wrong
    row = side_by_side(sp, corrupted, labels, predicted, objective="masked")
    assert row["input"].count(MASK_TEXT) == 3
    # Brackets removed, the target line is the original text exactly.
    assert row["target"].replace("[", "").replace("]", "") == TEXT
    assert row["target"].count("[") == 3 and row["predicted"].count("[") == 3
    assert "[the]" in row["predicted"] and "[the]" not in row["target"]
    assert row["correct"] == 2 and row["predicted_positions"] == 3


def test_prediction_of_a_special_id_is_named_not_empty(sp):
    original, corrupted, labels = masked_case(sp, [2])
    predicted = torch.full_like(original, IGNORE_INDEX)
    predicted[2] = SPECIAL_IDS["pad"]
    row = side_by_side(sp, corrupted, labels, predicted, objective="masked")
    assert "[<pad>]" in row["predicted"] and "[]" not in row["predicted"]


def test_documents_and_padding(sp):
    ids = sp.encode("first doc") + [SPECIAL_IDS["eos"]] + sp.encode("second doc") + [SPECIAL_IDS["pad"]] * 4
    ids = torch.tensor(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    row = side_by_side(sp, ids, labels, labels.clone(), objective="masked")
    assert row["input"] == "first doc" + DOC_BREAK + "second doc"
    assert row["predicted_positions"] == 0


def test_causal_sample_is_the_continuation_and_the_guesses(sp):
    ids = torch.tensor(sp.encode(TEXT))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:-1] = ids[1:]
    predicted = labels.clone()
    predicted[-2] = sp.piece_to_id("\u2581the")
    row = side_by_side(sp, ids, labels, predicted, objective="causal")
    assert row["target"] == sp.decode(ids[1:].tolist())
    assert row["predicted"].endswith(" the") and row["correct"] == len(ids) - 2
    assert row["input"] == TEXT


def test_format_and_length_check(sp):
    original, corrupted, labels = masked_case(sp, [1])
    row = side_by_side(sp, corrupted, labels, labels.clone(), objective="masked")
    text = format_samples([row, row])
    assert text.count("1/1 predicted pieces correct") == 2 and "predicted : " in text
    with pytest.raises(ValueError, match="sequence lengths differ"):
        side_by_side(sp, corrupted, labels[:-1], labels, objective="masked")
