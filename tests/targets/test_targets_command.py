"""`pretrain targets` on the tiny prepared dataset: table, report, metadata checks, CLI errors."""
import json

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from pretrain.cli import main
from pretrain.config import save_resolved
from pretrain.data.manifest import load_manifest, manifest_sha256
from pretrain.data.stream import iter_samples
from pretrain.data.tokenizer import load_tokenizer
from pretrain.targets.corpus import split_documents
from pretrain.targets.table import load_target_table, random_unit_table


@pytest.fixture(scope="module")
def built(tiny_targets):
    cfg = tiny_targets
    manifest = load_manifest(cfg.data_dir)
    table, meta = load_target_table(cfg.targets_path, tokenizer_sha256=manifest["tokenizer_sha256"], vocab_size=manifest["vocab_size"])
    report = json.loads((cfg.targets_path.parent / "report.json").read_text())
    return cfg, manifest, table, meta, report


def test_table_metadata_and_unit_rows(built):
    cfg, manifest, table, meta, report = built
    assert table.shape == (manifest["vocab_size"], cfg.targets.dim)
    torch.testing.assert_close(table.norm(dim=1), torch.ones(len(table)), atol=1e-5, rtol=0)
    assert meta["method"] == "trained" and meta["algorithm"] == "fasttext"
    assert meta["manifest_sha256"] == manifest_sha256(cfg.data_dir)
    assert (cfg.targets_path.parent / "config.resolved.yaml").is_file()


def test_report_counts_every_id_and_rows_align(built):
    cfg, manifest, table, _, report = built
    vocab = manifest["vocab_size"]
    assert sum(report["fill"]["by_source"].values()) == vocab
    special = manifest["special_ids"]
    counts = np.zeros(vocab, dtype=np.int64)
    for doc in split_documents(iter_samples(cfg.data_dir, "train"), special["eos"], [special["pad"], special["bos"], special["mask"]]):
        counts += np.bincount(doc, minlength=vocab)
    assert report["fill"]["by_source"]["trained"] == int((counts >= cfg.targets.min_count).sum())
    assert report["trainer"]["corpus_tokens"] == counts.sum() and report["trainer"]["tokens_per_s"] > 0
    # Ids without a vector hold row i of the seeded fallback table: rows are indexed by piece id.
    fallback = random_unit_table(vocab, cfg.targets.dim, seed=cfg.targets.seed)
    for i in special.values():
        torch.testing.assert_close(table[i], fallback[i])
    sp = load_tokenizer(cfg.data_dir / manifest["tokenizer_file"])
    assert set(report["diagnostics"]["neighbours"]) <= {sp.id_to_piece(i) for i in range(vocab)}


def test_diagnostics_decodable_and_meaningful(built):
    *_, report = built
    d = report["diagnostics"]
    assert d["self_retrieval"] == 1.0 and d["duplicates"] == 0
    assert 1.0 < d["effective_rank"] <= report["dim"] and -1.0 <= d["mean_pairwise_cosine"] < 0.9
    ca = d["context_agreement"]
    # Measured on tiny_data over 4 seeds x 2 algorithms: margin 0.047-0.058, random table 0.003-0.010.
    assert ca["margin"] > 0.03
    assert ca["margin"] > ca["random_table_margin"] + 0.025


def test_table_of_another_tokenizer_or_size_is_refused(built):
    cfg, manifest, *_ = built
    with pytest.raises(ValueError, match=r"targets\.safetensors was built for tokenizer sha256 [0-9a-f]{12}\.\.\., but this dataset's tokenizer is 000000000000.*pretrain targets"):
        load_target_table(cfg.targets_path, tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match=rf"has {manifest['vocab_size']} rows but the tokenizer has 4000 pieces"):
        load_target_table(cfg.targets_path, vocab_size=4000)


def test_cli_trains_prints_throughput_and_diagnostics(tiny_data, tmp_path, capsys):
    config = save_resolved(tiny_data, tmp_path, name="cfg.yaml")
    out = tmp_path / "t" / "targets.safetensors"
    rc = main(["targets", str(config), f"targets.path={out}", "targets.algorithm=skipgram", "targets.epochs=1", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "trainer: skipgram" in printed and "tokens/s" in printed
    assert "effective rank" in printed and "self-retrieval 1.0000" in printed and "context agreement" in printed
    report = json.loads((out.parent / "report.json").read_text())
    assert report["trainer"]["epochs"] == 1 and report["algorithm"] == "skipgram"
    assert (out.parent / "config.resolved.yaml").is_file() and not list(out.parent.glob(".corpus-*"))


def test_cli_imports_word2vec_with_coverage(tiny_data, tmp_path, capsys):
    manifest = load_manifest(tiny_data.data_dir)
    sp = load_tokenizer(tiny_data.data_dir / manifest["tokenizer_file"])
    words = [sp.id_to_piece(i)[1:] for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("▁") and len(sp.id_to_piece(i)) > 2][:50]
    kv = KeyedVectors(8)
    kv.add_vectors(words, np.random.default_rng(0).standard_normal((len(words), 8)).astype(np.float32))
    kv.save_word2vec_format(str(tmp_path / "w.bin"), binary=True)
    config = save_resolved(tiny_data, tmp_path, name="cfg.yaml")
    out = tmp_path / "imp" / "targets.safetensors"
    rc = main(["targets", str(config), f"targets.path={out}", "targets.method=imported", f"targets.import_path={tmp_path / 'w.bin'}",
               "targets.import_binary=true", "targets.dim=8", "targets.remove_top_components=-1", "--no-progress"])
    assert rc == 0 and "50/1000 ids covered" in capsys.readouterr().out
    table, meta = load_target_table(out, tokenizer_sha256=manifest["tokenizer_sha256"])
    assert meta["method"] == "imported" and table.shape == (1000, 8)
    row = table[sp.piece_to_id("▁" + words[0])].numpy()
    np.testing.assert_allclose(row, kv[words[0]] / np.linalg.norm(kv[words[0]]), atol=1e-6)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["targets", f"workdir={tmp_path}", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no manifest.json" in err and "pretrain prepare" in err


def test_cli_imported_without_file(tiny_data, tmp_path, capsys):
    config = save_resolved(tiny_data, tmp_path, name="cfg.yaml")
    rc = main(["targets", str(config), f"targets.path={tmp_path / 'x.safetensors'}", "targets.method=imported", "--no-progress"])
    assert rc == 1 and "needs targets.import_path" in capsys.readouterr().err


def test_cli_skips_and_counts_a_corrupt_train_shard(tiny_data, tmp_path, capsys):
    import shutil

    data_dir = shutil.copytree(tiny_data.data_dir, tmp_path / "data")
    entry = load_manifest(data_dir)["splits"]["train"]["shards"][2]
    payload = bytearray((data_dir / entry["name"]).read_bytes())
    payload[3000] ^= 0xFF
    (data_dir / entry["name"]).write_bytes(bytes(payload))
    config = save_resolved(tiny_data, tmp_path, name="cfg.yaml")
    out = tmp_path / "t" / "targets.safetensors"
    common = ["targets", str(config), f"data.dir={data_dir}", f"targets.path={out}", "targets.algorithm=skipgram", "targets.epochs=1"]
    assert main([*common, "--no-progress"]) == 1 and "fails its checksum" in capsys.readouterr().err  # default policy: stop
    assert main([*common, "data.on_corrupt_shard=skip", "--no-progress"]) == 0
    assert f"skipped 1 corrupt train shard(s), {entry['samples']} samples" in capsys.readouterr().out
    skipped = json.loads((out.parent / "report.json").read_text())["skipped_shards"]
    assert skipped["shards"] == 1 and skipped["samples"] == entry["samples"] and skipped["entries"][0]["shard"] == entry["name"]
