"""Reading the raw corpus: formats, document boundaries, the UTF-8 policy and bad inputs."""
import gzip
import random
import json

import pytest

from pretrain.data.corpus import CorpusReader, resolve_corpus_files
from pretrain.data.prepare import estimate_text_bytes


def read(paths, **kw):
    reader = CorpusReader([str(p) for p in paths], **kw)
    return list(reader), reader.stats


def test_plain_text_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\n\n  \nsecond doc\r\nthird\n")
    docs, stats = read([path])
    assert docs == ["first doc", "second doc", "third"]
    assert stats.documents == 3 and stats.text_bytes == path.stat().st_size


def test_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("p1 line1\np1 line2\n\n\np2\n   \np3 a\np3 b")
    docs, _ = read([path], doc_separator="blank_line")
    assert docs == ["p1 line1\np1 line2", "p2", "p3 a\np3 b"]


def test_gzip_detected_by_content_and_jsonl_by_name(tmp_path):
    records = [{"text": "alpha beta", "id": 1}, {"text": "gamma", "id": 2}]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    # a gzip file without the .gz suffix is still decompressed
    with gzip.open(tmp_path / "c.txt", "wt") as f:
        f.write("plain in gzip\n")
    docs, stats = read([tmp_path / "b.jsonl.gz", tmp_path / "c.txt"])
    assert docs == ["alpha beta", "gamma", "plain in gzip"]
    assert stats.text_bytes == sum(len(json.dumps(r)) + 1 for r in records) + len("plain in gzip\n")
    # the gzip trailer gives the uncompressed size without reading the data
    assert estimate_text_bytes([tmp_path / "c.txt"]) == len("plain in gzip\n")


def test_jsonl_custom_field_and_bad_records_counted(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "one"}\nnot json\n[1, 2]\n{"body": 7}\n{"other": "x"}\n{"body": "two"}\n')
    docs, stats = read([path], text_field="body")
    assert docs == ["one", "two"]
    assert stats.jsonl_skipped_records == 4
    assert "d.jsonl:2" in caplog.text


def test_jsonl_without_the_text_field_is_an_error_naming_the_field(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"content": "a"}\n{"content": "b"}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl.*'text'.*\['content'\].*data\.text_field"):
        read([path])


def test_directories_and_globs_expand_sorted_without_duplicates_or_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.txt", "a.txt", "sub/c.txt", ".hidden.txt"]:
        (tmp_path / name).write_text(name + "\n")
    files = resolve_corpus_files([str(tmp_path), str(tmp_path / "*.txt")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "b.txt", "sub/c.txt"]
    assert [f.name for f in resolve_corpus_files([str(tmp_path / "**" / "c.txt")])] == ["c.txt"]


def test_invalid_utf8_replace_policy_keeps_and_counts_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe bytes\nlast\n")
    docs, stats = read([path], utf8_errors="replace")
    assert docs == ["good line", "bad \ufffd\ufffd bytes", "last"]
    assert stats.utf8_replaced_lines == 1 and stats.utf8_skipped_lines == 0


def test_invalid_utf8_skip_policy_drops_and_counts_the_line(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff bytes\nlast\n")
    docs, stats = read([path], utf8_errors="skip")
    assert docs == ["good line", "last"]
    assert stats.utf8_skipped_lines == 1
    assert "bad.txt:2" in caplog.text and "skipped" in caplog.text


def test_missing_path_names_the_entry_and_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere.*matches no file.*data\.corpus"):
        CorpusReader([str(tmp_path / "nothere")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        CorpusReader([str(tmp_path / "*.nomatch")])


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    whole = gzip.compress(b"some text line\n" * 2000)
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.txt\.gz is a corrupt or truncated gzip"):
        read([path])


def test_missing_absolute_path_does_not_claim_other_places_were_searched(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as absolute:
        CorpusReader([str(tmp_path / "nothere.txt")])
    assert "nothere.txt" in str(absolute.value) and "looked in" not in str(absolute.value) and "absolute path" in str(absolute.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"looked in {tmp_path}"):
        CorpusReader(["relative/nothere.txt"])


@pytest.mark.parametrize("name, payload, why", [
    ("noise.txt", random.Random(0).randbytes(20_000), "not text"),
    ("tool", b"\x7fELF\x02\x01\x01" + bytes(200), "ELF executable"),
    ("noise.txt.gz", gzip.compress(random.Random(1).randbytes(20_000)), "not text"),
])
def test_binary_files_are_refused_with_their_name(tmp_path, name, payload, why):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=rf"{name}.*{why}.*remove it from data\.corpus"):
        read([path])
    # text with a few broken bytes is still text (the UTF-8 policy handles those)
    text = tmp_path / "fine.txt"
    text.write_bytes(b"plain words here\n" * 200 + b"one bad \xff byte\n")
    assert len(read([text])[0]) == 201


def test_jsonl_zst_reads_the_named_field_and_ignores_the_others(tmp_path):
    import zstandard

    records = [{"id": i, "content": f"document number {i}", "meta": {"lang": "en"}} for i in range(50)]
    path = tmp_path / "part.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    docs, stats = read([path], text_field="content")
    assert docs == [r["content"] for r in records] and stats.documents == 50
    assert estimate_text_bytes([path]) == sum(len(json.dumps(r)) + 1 for r in records)
    # two frames (as written by parallel compressors) read as one stream; a cut frame is an error
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"content": "a"}\n') + zstandard.ZstdCompressor().compress(b'{"content": "b"}\n'))
    assert read([path], text_field="content")[0] == ["a", "b"]
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(ValueError, match=r"part\.jsonl\.zst .*re-create it or remove it from data\.corpus"):
        read([path], text_field="content")


def test_parquet_column_is_read_one_row_group_at_a_time(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [None if i % 97 == 0 else f"row {i} " + "text " * 40 for i in range(20_000)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(rows))), "body": rows}), path, row_group_size=1000, compression="none")
    reader = CorpusReader([str(path)], text_field="body")
    before, peak, docs = pa.total_allocated_bytes(), 0, []
    for doc in reader:
        docs.append(doc)
        peak = max(peak, pa.total_allocated_bytes() - before)
    assert docs == [r for r in rows if r is not None]
    assert reader.stats.parquet_skipped_rows == rows.count(None)
    text_bytes = sum(len(r) for r in docs)
    assert reader.stats.text_bytes == text_bytes and peak < text_bytes / 5  # about one row group, not the file
    with pytest.raises(ValueError, match=r"docs\.parquet has no column 'text' \(its columns are \['id', 'body'\]\).*data\.text_field"):
        read([path])
    with pytest.raises(ValueError, match=r"column 'id' of .*docs\.parquet holds int64, not text"):
        read([path], text_field="id")


@pytest.mark.parametrize("policy", ["split", "skip"])
def test_an_oversize_line_is_split_or_skipped_with_a_count_and_a_warning(tmp_path, caplog, policy):
    long_line = "é" * 700 + "z"  # 1401 bytes, the limit cuts inside characters
    path = tmp_path / "long.txt"
    path.write_text(f"short one\n{long_line}\nshort two\n", encoding="utf-8")
    docs, stats = read([path], doc_separator="line", max_record_bytes=256, oversize=policy)
    assert docs[0] == "short one" and docs[-1] == "short two"
    assert "long.txt:2: longer than data.max_record_bytes=256" in caplog.text
    if policy == "split":
        assert "".join(docs[1:-1]) == long_line and all(len(d.encode()) <= 259 for d in docs) and stats.oversize_split == 1
    else:
        assert len(docs) == 2 and stats.oversize_skipped == 1
    assert stats.text_bytes == path.stat().st_size
    # a JSONL record over the limit is skipped whatever the policy (it cannot be parsed in pieces)
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text(json.dumps({"text": long_line}) + "\n" + json.dumps({"text": "x" * 40}) + "\n")
    docs, stats = read([jsonl], max_record_bytes=256, oversize=policy)
    assert docs == ["x" * 40] and stats.oversize_skipped == 1 and "long.jsonl:1: longer than" in caplog.text
    # a Parquet value over the limit follows the policy
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": [long_line, "short"]}), parquet)
    docs, stats = read([parquet], max_record_bytes=256, oversize=policy)
    assert docs[-1] == "short" and "long.parquet:row 1: longer than" in caplog.text
    assert "".join(docs[:-1]) == (long_line if policy == "split" else "")


def test_auto_doc_separator_reads_wrapped_prose_and_markdown_by_paragraph(tmp_path, caplog):
    caplog.set_level("INFO", logger="pretrain.data.corpus")
    prose = "\n\n".join("\n".join(f"paragraph {p} wrapped line {i} of some prose text" for i in range(4)) for p in range(5)) + "\n"
    (tmp_path / "book.txt").write_text(prose)
    (tmp_path / "notes.md").write_text("# Title\n\nOne sentence that is long enough to be a whole line of markdown.\n")
    (tmp_path / "records.txt").write_text("first record on its own line\nsecond record\n\nthird record after a blank\n")
    docs, stats = read([tmp_path / "book.txt", tmp_path / "notes.md", tmp_path / "records.txt"])
    assert docs[:5] == prose.strip().split("\n\n")
    assert docs[5:7] == ["# Title", "One sentence that is long enough to be a whole line of markdown."]
    assert docs[7:] == ["first record on its own line", "second record", "third record after a blank"]
    assert stats.blank_line_files == 2 and "book.txt: hard-wrapped text" in caplog.text
    # an explicit choice applies to every file
    assert len(read([tmp_path / "book.txt"], doc_separator="line")[0]) == 20


@pytest.mark.parametrize("range_bytes", [97, 500, 4096])
def test_paragraph_file_read_in_byte_ranges_gives_each_paragraph_once(tmp_path, range_bytes):
    """Ranges of a hard-wrapped file: a paragraph belongs to the range its first line starts in."""
    rng = random.Random(range_bytes)
    blocks = []
    for p in range(60):
        lines = [f"p{p} line {i} " + "word " * rng.randrange(1, 12) for i in range(rng.randrange(1, 6))]
        blocks.append("\n".join(lines) + "\n" + rng.choice(["\n", "\n\n", "   \n", "\t\n\n"]))
    path = tmp_path / "book.txt"
    path.write_text("".join(blocks))
    whole, whole_stats = read([path], doc_separator="blank_line")
    assert len(whole) == 60
    reader = CorpusReader([str(path)], doc_separator="blank_line")
    size = path.stat().st_size
    pieces = [doc for start in range(0, size, range_bytes) for doc in reader.file_documents(path, start, min(start + range_bytes, size))]
    assert pieces == whole and reader.stats.text_bytes == size == whole_stats.text_bytes
