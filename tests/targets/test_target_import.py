"""Imported vectors: word2vec text / binary and fastText .bin, aligned to SentencePiece pieces."""
import numpy as np
import pytest
import torch
from gensim.models import FastText, KeyedVectors
from gensim.models.fasttext import save_facebook_model

from pretrain.config import TargetsConfig
from pretrain.targets import diagnostics as diag
from pretrain.targets.build import make_table
from pretrain.targets.fill import BYTE, PIECE, SPECIAL, fill_missing
from pretrain.targets.imported import align_to_pieces, import_vectors, load_keyed_vectors

D = 12
PIECES = ["<pad>", "<unk>", "<0x41>", "▁the", "the", "▁The", "ing", "▁zzz", "▁of", "▁"]
KINDS = [SPECIAL, SPECIAL, BYTE, PIECE, PIECE, PIECE, PIECE, PIECE, PIECE, PIECE]


def write_vectors(path, words, binary, seed=0):
    rng = np.random.default_rng(seed)
    kv = KeyedVectors(D)
    vectors = rng.standard_normal((len(words), D)).astype(np.float32)
    kv.add_vectors(words, vectors)
    kv.save_word2vec_format(str(path), binary=binary)
    return dict(zip(words, vectors))


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_alignment_passes_and_one_word_per_id(tmp_path, binary):
    path = tmp_path / ("v.bin" if binary else "v.vec")
    vecs = write_vectors(path, ["the", "ing", "▁of", "foo", "<unk>"], binary)
    imported = import_vectors(path, binary, PIECES, KINDS, D)
    expected_sources = [None, None, None, "word", None, None, "inner", None, "exact", None]
    assert imported.sources == expected_sources  # "the" goes to "▁the" only; specials never match words
    np.testing.assert_allclose(imported.vectors[3], vecs["the"], rtol=1e-6)
    np.testing.assert_allclose(imported.vectors[6], vecs["ing"], rtol=1e-6)
    np.testing.assert_allclose(imported.vectors[8], vecs["▁of"], rtol=1e-6)
    assert imported.composer is None and imported.stats["file_words"] == 5 and imported.stats["words_used"] == 3
    filled = fill_missing(imported.vectors, imported.sources, PIECES, KINDS, seed=0, composer=imported.composer)
    assert filled.counts["by_source"] == {"random": 7, "word": 1, "inner": 1, "exact": 1}
    assert diag.self_retrieval(filled.table) == 1.0


def test_lowercase_pass():
    kv = KeyedVectors(D)
    kv.add_vectors(["the"], np.ones((1, D), np.float32))
    imported = align_to_pieces(kv, ["▁The", "▁dog"], [PIECE, PIECE], D)
    assert imported.sources == ["lowercase", None]


def test_import_into_real_vocabulary_with_token_coverage(tmp_path, small_vocab, gloss_docs):
    pieces, kinds = small_vocab
    words = sorted({p[1:] for p, k in zip(pieces, kinds) if k == PIECE and p.startswith("▁") and len(p) > 2})[:100]
    vecs = write_vectors(tmp_path / "w.txt", words, binary=False, seed=1)
    counts = np.bincount(np.concatenate(gloss_docs), minlength=len(pieces))
    # isotropy post-processing off: the rows must equal the imported vectors exactly (alignment)
    tcfg = TargetsConfig(method="imported", import_path=str(tmp_path / "w.txt"), dim=D, remove_top_components=-1)
    table, parts = make_table(tcfg, pieces, kinds, None, counts, progress=False)
    assert table.shape == (len(pieces), D)
    torch.testing.assert_close(table.norm(dim=1), torch.ones(len(pieces)), atol=1e-5, rtol=0)
    for word in words[:20]:  # piece <-> row alignment
        row = table[pieces.index("▁" + word)].numpy()
        np.testing.assert_allclose(row, vecs[word] / np.linalg.norm(vecs[word]), atol=1e-6)
    imp = parts["import"]
    assert imp["ids_covered"] == 100 and imp["id_coverage"] == pytest.approx(100 / len(pieces))
    covered_ids = [pieces.index("▁" + w) for w in words]
    assert imp["token_coverage"] == pytest.approx(counts[covered_ids].sum() / counts.sum())
    assert parts["fill"]["by_source"]["random"] == len(pieces) - 100
    assert parts["fill"]["by_kind"]["special"] == {"random": 5}


def test_fasttext_bin_composes_uncovered_pieces(tmp_path, small_vocab, gloss_lines):
    pieces, kinds = small_vocab
    sentences = [line.split() for line in gloss_lines[:400]]
    model = FastText(sentences, vector_size=D, min_count=3, epochs=1, bucket=5000, workers=1, seed=0)
    save_facebook_model(model, str(tmp_path / "ft.bin"))
    kv = load_keyed_vectors(tmp_path / "ft.bin", binary=True)
    imported = import_vectors(tmp_path / "ft.bin", True, pieces, kinds, D)
    filled = fill_missing(imported.vectors, imported.sources, pieces, kinds, seed=0, composer=imported.composer)
    ngram_ids = [i for i, s in enumerate(filled.sources) if s == "ngram"]
    assert ngram_ids and all(kinds[i] == PIECE for i in ngram_ids)
    bare = {i: pieces[i][1:] if pieces[i].startswith("▁") and len(pieces[i]) > 1 else pieces[i] for i in ngram_ids}
    out_of_vocabulary = [i for i in ngram_ids if bare[i] not in kv.key_to_index]
    assert len(out_of_vocabulary) >= 10
    for i in out_of_vocabulary[:10]:  # composed exactly as fastText composes an out-of-vocabulary word
        np.testing.assert_allclose(filled.table[i].numpy(), kv.get_vector(bare[i]), rtol=1e-4, atol=1e-6)
    assert all(filled.sources[i] == "random" for i, k in enumerate(kinds) if k != PIECE)
    assert filled.counts["by_source"].get("word", 0) > 50


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="targets.import_path"):
        load_keyed_vectors(tmp_path / "missing.vec", binary=False)
    garbage = tmp_path / "garbage.vec"
    garbage.write_text("this is not\na vector file\n")
    with pytest.raises(ValueError, match=r"garbage\.vec.*word2vec/fastText format"):
        load_keyed_vectors(garbage, binary=False)
    write_vectors(tmp_path / "v.vec", ["a", "b"], binary=False)
    with pytest.raises(ValueError, match=r"set targets.dim=12"):
        import_vectors(tmp_path / "v.vec", False, PIECES, KINDS, dim=64)
    with pytest.raises(ValueError, match=r"needs targets.import_path"):
        make_table(TargetsConfig(method="imported", dim=D), PIECES, KINDS, None, np.ones(len(PIECES)), progress=False)
