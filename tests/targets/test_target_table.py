"""Target table file: safetensors round trip, unit rows, metadata checks with clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from pretrain.targets.table import load_target_table, random_unit_table, read_table_meta, save_target_table

META = {"tokenizer_sha256": "a" * 64, "method": "random", "manifest_sha256": "b" * 64}


def test_round_trip_normalises_rows_and_keeps_metadata(tmp_path):
    raw = torch.randn(37, 8) * torch.arange(1, 38).unsqueeze(1)  # rows of very different norms
    path = save_target_table(tmp_path / "t.safetensors", raw, META)
    table, meta = load_target_table(path, tokenizer_sha256="a" * 64, vocab_size=37)
    assert table.dtype == torch.float32 and table.shape == (37, 8)
    torch.testing.assert_close(table.norm(dim=1), torch.ones(37), atol=1e-6, rtol=0)
    torch.testing.assert_close(table, raw / raw.norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert meta["vocab_size"] == "37" and meta["dim"] == "8" and meta["method"] == "random"
    assert read_table_meta(path)["manifest_sha256"] == "b" * 64


def test_random_table_is_seeded_and_unit():
    a, b, c = random_unit_table(50, 4, seed=3), random_unit_table(50, 4, seed=3), random_unit_table(50, 4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(50), atol=1e-6, rtol=0)


@pytest.fixture
def saved(tmp_path):
    return save_target_table(tmp_path / "t.safetensors", torch.randn(10, 4), META)


def test_tokenizer_mismatch_names_file_and_fix(saved):
    with pytest.raises(ValueError, match=r"t\.safetensors.*tokenizer.*pretrain targets"):
        load_target_table(saved, tokenizer_sha256="c" * 64)


def test_vocab_size_mismatch_names_file_and_fix(saved):
    with pytest.raises(ValueError, match=r"t\.safetensors has 10 rows but the tokenizer has 11 pieces.*pretrain targets"):
        load_target_table(saved, vocab_size=11)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain targets"):
        load_target_table(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file"):
        load_target_table(bad)


def test_foreign_safetensors_without_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"embeddings": torch.randn(5, 3)}, str(path))
    with pytest.raises(ValueError, match=r"foreign\.safetensors lacks metadata"):
        load_target_table(path)


def test_non_unit_rows_on_disk_are_refused(tmp_path):
    path = tmp_path / "raw.safetensors"
    meta = {**META, "vocab_size": "5", "dim": "3"}
    save_file({"embeddings": torch.randn(5, 3) * 3}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="not unit-norm"):
        load_target_table(path)


@pytest.mark.parametrize("bad_value", [0.0, float("nan")])
def test_save_refuses_zero_and_nan_rows(tmp_path, bad_value):
    table = torch.randn(6, 3)
    table[2] = bad_value
    with pytest.raises(ValueError, match=r"first ids: \[2\]"):
        save_target_table(tmp_path / "t.safetensors", table, META)


def test_save_requires_metadata(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        save_target_table(tmp_path / "t.safetensors", torch.randn(4, 3), {"method": "random", "manifest_sha256": "x"})


def damage_table_values(path, swap=(1, 2), flip_signs=50) -> None:
    """Swap two rows and flip sign bits in place: every row stays unit-norm, the header is untouched."""
    import json

    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len
    dim = int(json.loads(data[8:start])["__metadata__"]["dim"])
    row = dim * 4
    a, b = (start + i * row for i in swap)
    data[a:a + row], data[b:b + row] = data[b:b + row], data[a:a + row]
    for i in range(flip_signs):
        data[start + 4 * (i * 7 % (len(data[start:]) // 4)) + 3] ^= 0x80  # float32 little-endian: sign in byte 3
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("swap, flips", [((1, 2), 0), ((0, 0), 50)])
def test_swapped_rows_or_flipped_signs_are_refused(tmp_path, swap, flips):
    path = save_target_table(tmp_path / "t.safetensors", torch.randn(40, 8), META)
    damage_table_values(path, swap, flips)
    with pytest.raises(ValueError, match=r"t\.safetensors: its values do not match the sha256 .*pretrain targets"):
        load_target_table(path)
