"""model.embed(texts) and encode on inputs longer than the model's positions (sliding windows),
and sentence-transformers computing the same sentence vectors."""
import gzip

import pytest
import torch

from pretrain.downstream import export as ex
from pretrain.model.windows import split_windows, window_starts

TEXTS = ["a small domesticated carnivore kept as a pet", "the edible fruit of an apple tree", "x"]


@pytest.fixture
def long_text(repo_root, untrained_export):
    """A text of at least 500 pieces (glosses the tokenizer never saw, joined)."""
    _, sp = ex.load_encoder(untrained_export)
    with gzip.open(repo_root / "data" / "corpus" / "wordnet_glosses.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read(500_000)[420_000:].splitlines()[1:]
    text = ""
    for line in lines:
        text += line + " "
        if len(sp.encode(text)) >= 500:
            return text
    raise AssertionError("not enough text")


def test_window_starts_cover_every_piece_with_the_tail_window_ending_at_the_last():
    assert window_starts(10, 32, 16) == [0]
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(64, 32, 32) == [0, 32]
    for length in (33, 47, 500):
        starts = window_starts(length, 32, 10)
        covered = set().union(*(range(s, s + 32) for s in starts))
        assert covered == set(range(length)) and starts[-1] + 32 == length
    assert [w[0] for w in split_windows(list(range(500)), 32, 16, max_windows=4)] == [0, 160, 320, 468]
    with pytest.raises(ValueError, match="stride <= window"):
        window_starts(100, 32, 33)


def test_embed_is_the_mean_over_real_tokens_for_short_texts(untrained_export):
    model, sp = ex.load_encoder(untrained_export)
    vectors = model.embed(TEXTS)
    assert vectors.shape == (3, 32)
    for text, vector in zip(TEXTS, vectors):
        ids = torch.tensor([sp.encode(text) + [sp.eos_id()]])
        with torch.no_grad():
            expected = model.encode(ids)[0].mean(0)
        torch.testing.assert_close(vector, expected, atol=1e-5, rtol=0)


def test_attention_mask_gives_the_states_the_pad_ids_gave(untrained_export):
    model, sp = ex.load_encoder(untrained_export)
    rows = [sp.encode(t) + [sp.eos_id()] for t in TEXTS]
    ids = torch.zeros(3, max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        by_mask = model.encode(ids, attention_mask=mask)
        by_pad = model.encode(ids)
        # padding marked by the mask only (pad positions hold an ordinary id): real tokens unchanged
        other = model.encode(torch.where(mask.bool(), ids, 7), attention_mask=mask)
    assert torch.equal(by_mask, by_pad)
    torch.testing.assert_close(other[mask.bool()], by_mask[mask.bool()], atol=1e-6, rtol=0)


def test_a_500_piece_text_is_encoded_by_windows(untrained_export, long_text):
    model, sp = ex.load_encoder(untrained_export)
    ids = sp.encode(long_text) + [sp.eos_id()]
    assert len(ids) > 500 and model.max_positions == 32
    with torch.no_grad():
        states = model.encode(torch.tensor([ids]), stride=16)
        first = model.encode(torch.tensor([ids[:32]]))
        last = model.encode(torch.tensor([ids[-32:]]))
    assert states.shape == (1, len(ids), 32)
    # the first 16 pieces are only in window 0, the last few only in the tail window
    torch.testing.assert_close(states[0, :16], first[0, :16], atol=1e-6, rtol=0)
    torch.testing.assert_close(states[0, -4:], last[0, -4:], atol=1e-6, rtol=0)
    # embed: the mean of the windows' mean-pooled vectors
    windows = split_windows(ids, 32, 16)
    with torch.no_grad():
        expected = torch.stack([model.encode(torch.tensor([w]))[0].mean(0) for w in windows]).mean(0)
    torch.testing.assert_close(model.embed(long_text, stride=16)[0], expected, atol=1e-5, rtol=0)
    four = model.embed([long_text, TEXTS[0]], stride=16, max_windows=4)
    assert not torch.allclose(four[0], expected, atol=1e-4)  # fewer windows read: another vector
    torch.testing.assert_close(four[1], model.embed(TEXTS[0])[0], atol=1e-6, rtol=0)


def test_embed_without_a_tokenizer_says_how_to_get_one(untrained_export):
    model, _ = ex.load_encoder(untrained_export)
    del model.tokenizer
    with pytest.raises(ValueError, match="load_encoder"):
        model.embed(TEXTS)


def test_sentence_transformers_gives_pretrains_embedding(untrained_export):
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="the `.[hf]` extra provides sentence-transformers")
    model, _ = ex.load_encoder(untrained_export)
    st = sentence_transformers.SentenceTransformer(str(untrained_export), trust_remote_code=True, device="cpu")
    assert st.get_max_seq_length() == 32
    vectors = st.encode(TEXTS, convert_to_tensor=True, batch_size=2)
    assert (vectors.cpu() - model.embed(TEXTS)).abs().max() <= 1e-5
