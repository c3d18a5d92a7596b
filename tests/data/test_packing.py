"""Packing documents into fixed-length sequences with document boundaries."""
import numpy as np

from pretrain.data.packing import SequencePacker

EOS, PAD = 3, 0  # the project's ids (tests/data/conftest.py unpacks with eos=3)


def pack_all(documents, seq_len, batches=1):
    packer = SequencePacker(seq_len, eos_id=EOS, pad_id=PAD)
    out = []
    step = max(1, len(documents) // batches)
    for start in range(0, len(documents), step):
        out += list(packer.add(documents[start : start + step]))
    return out + list(packer.flush())


def test_small_example_exact_layout():
    seqs = pack_all([[10, 11], [12], [13, 14, 15, 16]], seq_len=4)
    assert [t.tolist() for t, _ in seqs] == [[10, 11, 3, 12], [3, 13, 14, 15], [16, 3, 0, 0]]
    # doc ids restart at 0 in every sequence; a continued document is document 0 there; -1 = padding
    assert [d.tolist() for _, d in seqs] == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, -1, -1]]
    assert all(t.dtype == np.int32 and d.dtype == np.int32 for t, d in seqs)


def test_roundtrip_random_documents_any_batching(unpack):
    rng = np.random.default_rng(0)
    documents = [rng.integers(5, 1000, size=rng.integers(0, 40)).tolist() for _ in range(300)]
    for seq_len, batches in [(7, 1), (32, 5), (64, 300)]:
        seqs = pack_all(documents, seq_len, batches)
        assert all(len(t) == seq_len and len(d) == seq_len for t, d in seqs)
        assert unpack(seqs) == documents
        total = sum(len(d) + 1 for d in documents)
        assert len(seqs) == -(-total // seq_len)
        # doc ids are non-decreasing within a sequence and step by one at each boundary
        for _, d in seqs:
            real = d[d >= 0]
            assert real[0] == 0 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)


def test_exact_multiple_leaves_nothing_to_flush():
    packer = SequencePacker(4, eos_id=EOS, pad_id=PAD)
    assert len(list(packer.add([[7, 7, 7], [8, 8, 8]]))) == 2
    assert list(packer.flush()) == []
