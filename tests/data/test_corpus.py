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
