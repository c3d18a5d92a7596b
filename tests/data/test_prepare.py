"""`pretrain prepare`: layout, content, determinism, tokenizer reuse and bad inputs."""
import collections
import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.data.manifest import load_manifest
from pretrain.data.corpus import corpus_reader
from pretrain.data.prepare import prepare_dataset
from pretrain.data.stream import read_shard
from pretrain.data.tokenizer import SPECIAL_IDS, file_sha256, load_tokenizer


def derived(tiny_data, workdir, *overrides):
    """tiny_data's config with another workdir (its own data dir) and more overrides."""
    base = [f"{k}={v}" for k, v in {
        "data.corpus": f"[{tiny_data.data.corpus[0]}]", "tokenizer.vocab_size": 1000, "data.seq_len": 32,
        "data.samples_per_shard": 256, "data.valid_fraction": 0.1,
    }.items()]
    return load_config(None, [f"workdir={workdir}", *base, *overrides])


def split_documents(data_dir, manifest, split, unpack):
    """The token lists of the documents of a split, in order (packing undone)."""
    entries = manifest["splits"][split]["shards"]
    return unpack([seq for e in entries for seq in read_shard(Path(data_dir) / e["name"], e, manifest["seq_len"])])


def test_layout_manifest_and_checksums(tiny_data):
    data_dir = tiny_data.data_dir
    manifest = load_manifest(data_dir)
    assert manifest["seq_len"] == 32 and manifest["vocab_size"] == 1000
    assert manifest["special_ids"] == SPECIAL_IDS == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    assert manifest["tokenizer_sha256"] == file_sha256(data_dir / "tokenizer.model")
    assert (data_dir / "config.resolved.yaml").is_file()
    sp = load_tokenizer(data_dir / "tokenizer.model")
    assert sp.id_to_piece(4) == "<mask>" and sp.get_piece_size() == 1000
    for split in ("train", "valid"):
        entry = manifest["splits"][split]
        assert len(entry["shards"]) >= 2
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"])
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
        assert sorted(p.name for p in (data_dir / split).iterdir()) == [Path(s["name"]).name for s in entry["shards"]]
        for shard in entry["shards"]:
            assert shard["sha256"] == file_sha256(data_dir / shard["name"])
            assert shard["bytes"] == (data_dir / shard["name"]).stat().st_size
        # every shard but the last is full
        assert {s["samples"] for s in entry["shards"][:-1]} == {256}


def test_shards_hold_the_whole_corpus_split_by_document(tiny_data, unpack):
    """Decoding the shards gives back every corpus line exactly once, each in one split, in corpus order."""
    data_dir = tiny_data.data_dir
    manifest = load_manifest(data_dir)
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    lines = [line for line in Path(tiny_data.data.corpus[0]).read_text().split("\n") if line.strip()]
    decoded = {split: [sp.decode(doc) for doc in split_documents(data_dir, manifest, split, unpack)] for split in ("train", "valid")}
    assert collections.Counter(decoded["train"] + decoded["valid"]) == collections.Counter(lines)
    for split, docs in decoded.items():
        assert manifest["splits"][split]["documents"] == len(docs)
        it = iter(lines)
        assert all(doc in it for doc in docs), f"{split} documents are not in corpus order"
    assert 0.05 < len(decoded["valid"]) / len(lines) < 0.15  # valid_fraction 0.1
    # tar members carry no time or owner of this machine
    import tarfile

    with tarfile.open(data_dir / manifest["splits"]["train"]["shards"][0]["name"]) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "pretrain")}
    assert [m.name for m in members[:4]] == ["00000-0000000000.doc_ids.npy", "00000-0000000000.input_ids.npy", "00000-0000000001.doc_ids.npy", "00000-0000000001.input_ids.npy"]


def test_cli_rebuild_is_byte_identical_and_prints_throughput(tiny_data, tmp_path, capsys):
    overrides = [f"workdir={tmp_path}", f"data.corpus=[{tiny_data.data.corpus[0]}]", "tokenizer.vocab_size=1000",
                 "data.seq_len=32", "data.samples_per_shard=256", "data.valid_fraction=0.1", "model.max_seq_len=32"]
    assert main(["prepare", "--no-progress", *overrides]) == 0
    out = capsys.readouterr().out
    assert "MB/s" in out and "tokens/s" in out and str(tmp_path / "data") in out
    first, second = tiny_data.data_dir, tmp_path / "data"
    files = sorted(p.relative_to(first) for p in first.rglob("*.tar")) + [Path("tokenizer.model"), Path("manifest.json")]
    assert len(files) > 10
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), f"{rel} differs between two identical runs"


def test_reused_tokenizer_new_seed_and_stale_shards_removed(tiny_data, tmp_path):
    reuse = f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"
    small = prepare_dataset(derived(tiny_data, tmp_path, reuse, "data.seed=7", "data.samples_per_shard=64"), progress=False)
    again = prepare_dataset(derived(tiny_data, tmp_path, reuse, "data.seed=7"), progress=False)
    original = load_manifest(tiny_data.data_dir)
    assert again["tokenizer_sha256"] == original["tokenizer_sha256"]
    assert len(small["splits"]["train"]["shards"]) > len(again["splits"]["train"]["shards"])
    # the extra shards of the first run are gone; nothing but the manifest's shards remains
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir()) == [Path(s["name"]).name for s in again["splits"]["train"]["shards"]]
    # another seed draws another train/valid split
    assert again["splits"]["valid"]["shards"][0]["sha256"] != original["splits"]["valid"]["shards"][0]["sha256"]


def test_invalid_utf8_is_counted_in_the_manifest(tiny_data, tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"a fine line of text\nbroken \xc3\x28 here\nanother line\n")
    reuse = f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"
    manifest = prepare_dataset(derived(tiny_data, tmp_path, reuse, f"data.corpus=[{corpus}]", "data.valid_fraction=0", "data.utf8_errors=skip"), progress=False)
    assert manifest["corpus"]["utf8_skipped_lines"] == 1 and manifest["corpus"]["documents"] == 2
    assert manifest["splits"]["valid"]["samples"] == 0 and manifest["splits"]["train"]["samples"] == 1


def test_empty_corpus_is_a_clear_error(tiny_data, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n   \n")
    with pytest.raises(ValueError, match=r"holds no text.*empty\.txt.*data\.corpus"):
        prepare_dataset(derived(tiny_data, tmp_path, f"data.corpus=[{corpus}]"), progress=False)
    reuse = f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"
    with pytest.raises(ValueError, match=r"holds no text"):
        prepare_dataset(derived(tiny_data, tmp_path, reuse, f"data.corpus=[{corpus}]"), progress=False)
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_missing_corpus_via_cli_is_one_clean_line(tmp_path, capsys):
    assert main(["prepare", f"workdir={tmp_path}", f"data.corpus=[{tmp_path / 'nope.txt'}]"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pretrain prepare: error: corpus entry") and "nope.txt" in err and "Traceback" not in err


def test_unusable_tokenizer_files_are_rejected(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model_path .*nothere\.model not found.*leave it empty"):
        prepare_dataset(derived(tiny_data, tmp_path, f"tokenizer.model_path={tmp_path / 'nothere.model'}"), progress=False)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"garbage\.model is not a SentencePiece model"):
        prepare_dataset(derived(tiny_data, tmp_path, f"tokenizer.model_path={garbage}"), progress=False)
    # a real SentencePiece model with SentencePiece's default ids (unk=0, bos=1, eos=2, no pad)
    spm.SentencePieceTrainer.train(input=str(tiny_data.data.corpus[0]), model_prefix=str(tmp_path / "default"), vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    with pytest.raises(ValueError, match=r"default\.model has special ids .*pad_id=0"):
        prepare_dataset(derived(tiny_data, tmp_path, f"tokenizer.model_path={tmp_path / 'default.model'}"), progress=False)


def test_corpus_too_small_for_the_valid_split(tiny_data, tmp_path):
    corpus = tmp_path / "two.txt"
    corpus.write_text("one line\nanother line\n")
    reuse = f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"
    with pytest.raises(ValueError, match=r"valid split.*valid_fraction"):
        prepare_dataset(derived(tiny_data, tmp_path, reuse, f"data.corpus=[{corpus}]", "data.valid_fraction=0.01"), progress=False)


def test_report_has_throughput(tiny_data):
    report = json.loads((tiny_data.data_dir / "prepare_report.json").read_text())
    assert report["encode_tokens_per_s"] > 0 and report["encode_mb_per_s"] > 0
    assert report["tokens"] == sum(s["tokens"] for s in load_manifest(tiny_data.data_dir)["splits"].values())


def test_bpe_tokenizer_has_the_special_ids_and_round_trips(tiny_data, tmp_path):
    from pretrain.data.tokenizer import train_tokenizer

    lines = [line for line in Path(tiny_data.data.corpus[0]).read_text().split("\n")[:3000] if line.strip()]
    sp = train_tokenizer(lines, tmp_path / "bpe.model", model_type="bpe", vocab_size=600, character_coverage=0.9995, seed=0, num_threads=1)
    assert load_tokenizer(tmp_path / "bpe.model").get_piece_size() == sp.get_piece_size() <= 600
    assert sp.id_to_piece(4) == "<mask>" and (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    text = "Zebra-like ünïcode ✓ and  two spaces\tand a tab"  # unseen characters go through byte fallback
    assert sp.decode(sp.encode(text)) == text and sp.unk_id() not in sp.encode(text)
    assert (tmp_path / "bpe.vocab").read_text().count("\n") == sp.get_piece_size()


def _wordnet_lines(tiny_data):
    return [line for line in Path(tiny_data.data.corpus[0]).read_text().split("\n") if line.strip()]


def test_one_huge_line_is_sampled_for_the_tokenizer(tiny_data, tmp_path):
    """A corpus that is one 300 KB line used to give 'gave 0 documents' when the byte-rate draw skipped it."""
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(" ".join(_wordnet_lines(tiny_data))[:300_000] + "\n")
    manifest = prepare_dataset(derived(tiny_data, tmp_path, f"data.corpus=[{corpus}]", "tokenizer.vocab_size=600",
                                       "tokenizer.sample_bytes=100000", "data.valid_fraction=0"), progress=False)
    assert manifest["vocab_size"] > 400 and manifest["corpus"]["documents"] == 1


def test_a_huge_document_does_not_starve_the_tokenizer_sample(tiny_data, tmp_path, caplog):
    """1.5 MB in one line amid 400 KB of normal lines: the normal lines still fill the sample and
    the vocabulary reaches the size asked (the old byte-rate sampler stopped at the budget after the big line)."""
    lines = _wordnet_lines(tiny_data)
    big = " ".join(lines)[:300_000] * 5
    corpus = tmp_path / "mixed.txt"
    corpus.write_text("\n".join(lines[:3] + [big] + lines[3:]) + "\n")  # 4th: a document the old byte-rate draw kept (seed 0)
    caplog.set_level("INFO", logger="pretrain.data.prepare")
    manifest = prepare_dataset(derived(tiny_data, tmp_path, f"data.corpus=[{corpus}]", "tokenizer.sample_bytes=600000",
                                       "data.valid_fraction=0"), progress=False)
    assert manifest["vocab_size"] == 1000
    assert "fewer than tokenizer.vocab_size" not in caplog.text
    trained = re.search(r"on (\d+) documents \(([\d.]+) MB, (\d+) cut", caplog.text)
    assert int(trained[1]) > 0.9 * len(lines) and float(trained[2]) < 0.6 and int(trained[3]) <= 1


def test_sample_caps_each_document_and_keeps_sentences_under_the_sentencepiece_limit():
    from pretrain.data.tokenizer import MAX_SENTENCE_BYTES, sample_documents

    docs = ["word " * 100_000, *(f"line {i} of text" for i in range(1000))]
    sample = sample_documents(docs, budget_bytes=200_000, seed=0, doc_cap_bytes=50_000)
    assert sample.documents == 1001 and sample.capped_documents == 1
    assert max(len(s.encode()) for s in sample.sentences) <= MAX_SENTENCE_BYTES
    assert sum(len(s.encode()) for s in sample.sentences) == sample.bytes <= 50_000 + sum(len(d) for d in docs[1:])
    # a budget smaller than the corpus keeps a seeded subset, in corpus order, never empty
    small = sample_documents(docs[1:], budget_bytes=1000, seed=0)
    assert 0 < small.documents < 1000 and small.sentences == sorted(small.sentences, key=docs.index)
    assert small.sentences == sample_documents(docs[1:], budget_bytes=1000, seed=0).sentences
    assert sample_documents(["x" * 10], budget_bytes=1, seed=3).sentences == ["x" * 10]


def test_a_vocabulary_smaller_than_asked_is_a_warning(tiny_data, tmp_path, caplog):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n".join(_wordnet_lines(tiny_data)[:40]) + "\n")
    manifest = prepare_dataset(derived(tiny_data, tmp_path, f"data.corpus=[{corpus}]", "tokenizer.vocab_size=3000", "data.valid_fraction=0"), progress=False)
    assert manifest["vocab_size"] < 3000
    assert f"the tokenizer has {manifest['vocab_size']} pieces, fewer than tokenizer.vocab_size=3000" in caplog.text and "small.txt" in caplog.text


def test_too_many_distinct_characters_names_the_files_and_the_config_key(tiny_data, tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "cjk.txt"
    corpus.write_text("\n".join("".join(chr(rng.randrange(0x4E00, 0x4E00 + 3000)) for _ in range(200)) for _ in range(300)) + "\n")
    with pytest.raises(ValueError, match=r"cjk\.txt.*tokenizer\.character_coverage=1\.0 .*tokenizer\.vocab_size=500.*lower tokenizer\.character_coverage"):
        prepare_dataset(derived(tiny_data, tmp_path, f"data.corpus=[{corpus}]", "tokenizer.vocab_size=500", "tokenizer.character_coverage=1.0"), progress=False)


def test_prepare_end_to_end_from_jsonl_zst_and_parquet(tiny_data, tmp_path, unpack):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = _wordnet_lines(tiny_data)[:600]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = "".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(lines[:300]))
    (corpus / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(records.encode()))
    pq.write_table(pa.table({"body": lines[300:], "n": list(range(300))}), corpus / "b.parquet", row_group_size=64)
    reuse = f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"
    manifest = prepare_dataset(derived(tiny_data, tmp_path, reuse, f"data.corpus=[{corpus}]", "data.text_field=body", "data.valid_fraction=0"), progress=False)
    sp = load_tokenizer(tmp_path / "data" / "tokenizer.model")
    assert [sp.decode(doc) for doc in split_documents(tmp_path / "data", manifest, "train", unpack)] == lines
    assert manifest["corpus"]["documents"] == 600


def test_parallel_prepare_is_byte_identical_to_one_process(tiny_data, tmp_path, unpack):
    """Parts (two files, the first cut in 60 KB byte ranges) run in 1 or 3 processes give the same
    shards, part results and manifest; range boundaries neither lose nor repeat a line."""
    lines = _wordnet_lines(tiny_data)[:2400]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(lines[:1600]) + "\n")
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[1600:]))
    reuse = f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"
    outputs = {}
    for processes in (1, 3):
        cfg = derived(tiny_data, tmp_path / f"p{processes}", reuse, f"data.corpus=[{corpus}]", "data.part_bytes=60000", "data.samples_per_shard=64")
        manifest = prepare_dataset(cfg, progress=False, processes=processes)
        report = json.loads((cfg.data_dir / "prepare_report.json").read_text())
        assert report["processes"] == processes and report["parts"] == len(list((cfg.data_dir / "parts").iterdir())) > 3
        outputs[processes] = {p.relative_to(cfg.data_dir): p.read_bytes() for p in cfg.data_dir.rglob("*") if p.suffix in (".tar", ".json", ".model") and p.name != "prepare_report.json"}
    assert outputs[1].keys() == outputs[3].keys() and outputs[1] == outputs[3]
    sp = load_tokenizer(tmp_path / "p1" / "data" / "tokenizer.model")
    decoded = {split: [sp.decode(doc) for doc in split_documents(tmp_path / "p1" / "data", manifest, split, unpack)] for split in ("train", "valid")}
    assert sorted(decoded["train"] + decoded["valid"]) == sorted(lines) and len(decoded["train"]) + len(decoded["valid"]) == len(lines)
    assert manifest["corpus"]["text_bytes"] == sum(f.stat().st_size for f in corpus.iterdir())


def test_eval_only_writes_just_a_valid_split_of_the_whole_corpus(tiny_data, tmp_path, unpack, capsys):
    lines = _wordnet_lines(tiny_data)[:300]
    corpus = tmp_path / "heldout.txt"
    corpus.write_text("\n".join(lines) + "\n")
    overrides = [f"workdir={tmp_path}", f"data.corpus=[{corpus}]", "data.seq_len=32", "data.valid_fraction=0.1"]
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "shard-00000-00000.tar").write_bytes(b"stale train shard of an earlier full prepare")
    assert main(["prepare", "--no-progress", "--eval-only", *overrides]) == 1
    assert "tokenizer.model_path" in capsys.readouterr().err
    assert main(["prepare", "--no-progress", "--eval-only", *overrides, f"tokenizer.model_path={tiny_data.data_dir / 'tokenizer.model'}"]) == 0
    manifest = load_manifest(tmp_path / "data")
    assert list(manifest["splits"]) == ["valid"] and manifest["eval_only"] is True
    assert manifest["tokenizer_sha256"] == file_sha256(tiny_data.data_dir / "tokenizer.model")
    assert not list((tmp_path / "data" / "train").glob("*.tar"))
    sp = load_tokenizer(tmp_path / "data" / "tokenizer.model")
    assert [sp.decode(doc) for doc in split_documents(tmp_path / "data", manifest, "valid", unpack)] == lines
    from pretrain.data.stream import build_loader

    with pytest.raises(ValueError, match=r"split 'train' is not in"):  # the stream refuses a split it does not have
        build_loader(tmp_path / "data", "train", batch_size=4, rank=0, world_size=1, num_workers=0, seed=0)


def test_steps_in_array_tasks_give_the_one_process_output(tiny_data, tmp_path, capsys):
    """tokenizer step, then 3 tasks in any order (the last one writes the manifest) == prepare in one go;
    a missing part is named by the manifest step."""
    lines = _wordnet_lines(tiny_data)[:1500]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.txt").write_text("\n".join(lines[i * 500:(i + 1) * 500]) + "\n")
    base = [f"data.corpus=[{corpus}]", "data.seq_len=32", "data.samples_per_shard=64", "data.valid_fraction=0.1",
            "data.part_bytes=30000", "tokenizer.vocab_size=500"]
    reference = derived(tiny_data, tmp_path / "one", *base)
    prepare_dataset(reference, progress=False, processes=1)
    args = [f"workdir={tmp_path / 'array'}", *base]
    # results of an earlier prepare with another seed are there: never mistaken for this run's
    prepare_dataset(load_config(None, [*args, "data.seed=5"]), progress=False, processes=1)
    assert main(["prepare", "--step", "tokenizer", *args]) == 0
    for task in (2, 0):
        assert main(["prepare", "--step", "parts", "--task-index", str(task), "--task-count", "3", "--manifest-when-complete", *args]) == 0
    assert not (tmp_path / "array" / "data" / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"part-00001\.json was made with another tokenizer or data config .*rerun that part"):
        from pretrain.data.prepare import finish_prepare

        finish_prepare(load_config(None, args))
    assert main(["prepare", "--step", "parts", "--task-index", "1", "--task-count", "3", "--manifest-when-complete", *args]) == 0
    assert "manifest written" in capsys.readouterr().out
    one, array = reference.data_dir, tmp_path / "array" / "data"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.suffix in (".tar", ".json", ".model") and p.name != "prepare_report.json")
    assert len(files) > 10 and files == sorted(p.relative_to(array) for p in array.rglob("*") if p.suffix in (".tar", ".json", ".model") and p.name != "prepare_report.json")
    assert all((one / f).read_bytes() == (array / f).read_bytes() for f in files)
    # the manifest step names a shard that is not the size its part recorded
    victim = next(f for f in files if f.suffix == ".tar")
    (array / victim).write_bytes((array / victim).read_bytes()[:-512])
    with pytest.raises(ValueError, match=rf"part \d+ .*: shard .*{victim.name} has \d+ bytes, .*part-\d+.json says \d+ \(truncated"):
        finish_prepare(load_config(None, args))


def test_the_tokenizer_sample_of_a_big_corpus_reads_only_a_seeded_draw_of_parts(tiny_data, tmp_path, caplog):
    """12 files of 20 KB, tokenizer.sample_bytes=5000: about 50 KB of parts (3) are read, the same ones each run."""
    from pretrain.data.prepare import plan_parts, sample_parts

    lines = _wordnet_lines(tiny_data)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i:02d}.txt").write_text("\n".join(lines[i * 200:(i + 1) * 200]) + "\n")
    cfg = derived(tiny_data, tmp_path, f"data.corpus=[{corpus}]", "tokenizer.sample_bytes=5000", "tokenizer.vocab_size=300", "data.valid_fraction=0")
    parts = plan_parts(cfg, corpus_reader(cfg))
    drawn = sample_parts(cfg, parts)
    assert drawn == sample_parts(cfg, parts) and drawn == sorted(drawn, key=lambda p: p.index)
    assert 2 <= len(drawn) <= 4 and sum(Path(p.file).stat().st_size for p in drawn) >= 50_000
    caplog.set_level("INFO", logger="pretrain.data.prepare")
    manifest = prepare_dataset(cfg, progress=False)
    assert f"drawn from {len(drawn)} of the 12 parts" in caplog.text and manifest["corpus"]["documents"] == 2400
