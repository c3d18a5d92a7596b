"""The streaming loader: exactly-once across ranks x workers, seeding, epochs, exact resume, bad shards."""
import collections
import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from pretrain.data.manifest import load_manifest, manifest_sha256, write_manifest
from pretrain.data.stream import CorruptShardError, build_loader, iter_samples, read_shard
from pretrain.data.tokenizer import file_sha256

# More DataLoader workers than this machine's 2 cores is the point of some tests.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def rows(batches):
    return collections.Counter(tuple(row) for b in batches for row in b["input_ids"].tolist())


def all_rows(data_dir, split):
    return collections.Counter(tuple(x.tolist()) for x in iter_samples(data_dir, split))


def take(loader, n=None):
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if n is not None and len(out) == n:
            break
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["doc_ids"], y["doc_ids"]) for x, y in zip(a, b))


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    """A private copy of the tiny dataset that a test may damage."""
    return shutil.copytree(tiny_data.data_dir, tmp_path / "data")


def test_iter_samples_yields_every_sample_in_order(tiny_data):
    manifest = load_manifest(tiny_data.data_dir)
    samples = list(iter_samples(tiny_data.data_dir, "valid"))
    assert len(samples) == manifest["splits"]["valid"]["samples"]
    assert all(s.dtype == np.int32 and s.shape == (32,) for s in samples)
    first = manifest["splits"]["valid"]["shards"][0]
    expected = [ids for ids, _ in read_shard(tiny_data.data_dir / first["name"], first, 32)]
    assert all(np.array_equal(a, b) for a, b in zip(samples, expected))


@pytest.mark.parametrize(
    "split, world_size, num_workers",
    [("train", 1, 0), ("train", 3, 2), ("valid", 2, 2), ("valid", 3, 1)],
    ids=["1rank-inproc", "3ranks-2workers", "more-workers-than-shards", "a-rank-without-shards"],
)
def test_each_sample_exactly_once_per_epoch_across_ranks_and_workers(tiny_data, split, world_size, num_workers):
    data_dir = tiny_data.data_dir
    seen = collections.Counter()
    for rank in range(world_size):
        loader = build_loader(data_dir, split, batch_size=7, rank=rank, world_size=world_size, num_workers=num_workers, seed=3, epochs=1, shuffle_buffer=16)
        batches = take(loader)
        assert len(batches) == len(loader) == loader.batches_per_rank()[rank]
        for b in batches:
            assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[1] == 32
            assert torch.equal(b["doc_ids"] < 0, (b["input_ids"] == 0) & (b["doc_ids"] < 0))
        seen += rows(batches)
    assert seen == all_rows(data_dir, split)


def test_same_seed_same_batches_other_seed_other_order(tiny_data):
    kw = dict(batch_size=16, rank=0, world_size=1, num_workers=2, shuffle_buffer=32)
    one = take(build_loader(tiny_data.data_dir, "train", seed=5, epochs=1, **kw))
    again = take(build_loader(tiny_data.data_dir, "train", seed=5, epochs=1, **kw))
    other = take(build_loader(tiny_data.data_dir, "train", seed=6, epochs=1, **kw), n=5)
    assert same(one, again)
    assert not same(one[:5], other)
    every = all_rows(tiny_data.data_dir, "train")
    assert rows(one) == every


def test_each_epoch_is_complete_and_in_another_order(tiny_data):
    loader = build_loader(tiny_data.data_dir, "valid", batch_size=16, rank=0, world_size=1, num_workers=0, seed=5, epochs=2, shuffle_buffer=32)
    stream = [tuple(r) for b in take(loader) for r in b["input_ids"].tolist()]
    n = sum(all_rows(tiny_data.data_dir, "valid").values())
    assert len(stream) == 2 * n
    first, second = stream[:n], stream[n:]
    assert collections.Counter(first) == collections.Counter(second) == all_rows(tiny_data.data_dir, "valid")
    assert first != second


def test_without_shuffle_buffer_a_worker_reads_its_shards_in_order(tiny_data):
    data_dir = tiny_data.data_dir
    manifest = load_manifest(data_dir)
    loader = build_loader(data_dir, "valid", batch_size=1000, rank=0, world_size=1, num_workers=0, seed=0, epochs=1)
    (batch,) = take(loader)
    order = loader.spec.worker_shards(0, 0)
    shards = manifest["splits"]["valid"]["shards"]
    expected = [ids for s in order for ids, _ in read_shard(data_dir / shards[s]["name"], shards[s], 32)]
    assert np.array_equal(batch["input_ids"].numpy(), np.stack(expected))


@pytest.mark.parametrize(
    "num_workers, shuffle_buffer, epochs, stops",
    [(0, 0, None, [1, 90]), (2, 64, 2, [3, 70, 137]), (3, 16, None, [40, 101])],
    ids=["inproc-infinite", "2workers-shuffle-2epochs", "3workers-shuffle-infinite"],
)
def test_resume_continues_with_exactly_the_next_batch(tiny_data, num_workers, shuffle_buffer, epochs, stops):
    def make():
        return build_loader(tiny_data.data_dir, "train", batch_size=16, rank=1, world_size=4, num_workers=num_workers, seed=11, epochs=epochs, shuffle_buffer=shuffle_buffer)

    total = 160  # a rank sees ~1100 samples (~70 batches of 16) per epoch: 160 batches cross epochs
    reference = take(make(), n=total)
    if epochs is not None:
        assert len(reference) == len(make()) < total  # the finite stream ended on its own
    for stop in stops:
        first = make()
        head = take(first, n=stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = make()
        resumed.load_state_dict(state)
        tail = take(resumed, n=len(reference) - stop)
        assert same(head + tail, reference), f"resume after {stop} batches diverged"


@pytest.mark.timeout(120)  # the bug this guards against was a silent hang
def test_infinite_stream_with_more_workers_than_shards_runs_and_resumes(tiny_data):
    # valid has 2 shards: with 2 ranks each rank owns 1 shard, so 2 of its 3 workers never get one.
    def make():
        return build_loader(tiny_data.data_dir, "valid", batch_size=8, rank=1, world_size=2, num_workers=3, seed=9, shuffle_buffer=8)

    loader = make()
    reference = take(loader, n=70)  # a rank's shard is ~250 samples: 70 batches of 8 cross two epochs
    assert loader.epoch >= 2
    own = collections.Counter()
    for entry_index in loader.spec.worker_shards(0, 0):
        entry = loader.spec.shards[entry_index]
        own.update(tuple(ids.tolist()) for ids, _ in read_shard(tiny_data.data_dir / entry["name"], entry, 32))
    first_epoch = [tuple(r) for b in reference for r in b["input_ids"].tolist()][: sum(own.values())]
    assert collections.Counter(first_epoch) == own
    head = take(resumed := make(), n=25)
    state = json.loads(json.dumps(resumed.state_dict()))
    again = make()
    again.load_state_dict(state)
    assert same(head + take(again, n=45), reference)


def test_infinite_stream_refuses_fewer_shards_than_ranks(tiny_data):
    # Every rank refuses, also those that would get a shard: none is left waiting for the others.
    for rank in range(3):
        with pytest.raises(ValueError, match=r"'valid' .* has 2 shard\(s\) for world_size=3 ranks.*data\.samples_per_shard"):
            build_loader(tiny_data.data_dir, "valid", batch_size=8, rank=rank, world_size=3, num_workers=0, seed=0)
    # A finite pass (evaluation) is fine: the shardless rank yields no batch.
    assert take(build_loader(tiny_data.data_dir, "valid", batch_size=8, rank=2, world_size=3, num_workers=0, seed=0, epochs=1)) == []


def test_iterating_again_continues_where_the_last_loop_stopped(tiny_data):
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=2, seed=2, shuffle_buffer=8)
    reference = take(build_loader(tiny_data.data_dir, "valid", **kw), n=30)
    loader = build_loader(tiny_data.data_dir, "valid", **kw)
    assert same(take(loader, n=12) + take(loader, n=18), reference)
    assert loader.batches_served == 30


def test_resume_in_a_new_process(tiny_data, tmp_path):
    kw = dict(batch_size=8, rank=0, world_size=2, num_workers=2, seed=4, shuffle_buffer=32)
    reference = take(build_loader(tiny_data.data_dir, "train", **kw), n=40)
    loader = build_loader(tiny_data.data_dir, "train", **kw)
    take(loader, n=25)
    (tmp_path / "state.json").write_text(json.dumps(loader.state_dict()))
    script = textwrap.dedent(f"""
        import json, torch
        from pretrain.data.stream import build_loader
        loader = build_loader({str(tiny_data.data_dir)!r}, "train", **{kw!r})
        loader.load_state_dict(json.loads(open({str(tmp_path / 'state.json')!r}).read()))
        out = []
        for batch in loader:
            out.append(batch["input_ids"])
            if len(out) == 15:
                break
        torch.save(torch.stack(out), {str(tmp_path / 'tail.pt')!r})
    """)
    subprocess.run([sys.executable, "-W", "ignore", "-c", script], check=True, timeout=120)
    tail = torch.load(tmp_path / "tail.pt", weights_only=True)
    assert torch.equal(tail, torch.stack([b["input_ids"] for b in reference[25:]]))


def test_state_from_other_settings_is_refused(tiny_data):
    kw = dict(batch_size=8, rank=0, world_size=2, seed=4, shuffle_buffer=32)
    loader = build_loader(tiny_data.data_dir, "train", num_workers=2, **kw)
    take(loader, n=2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"num_workers: saved 2, now 1"):
        build_loader(tiny_data.data_dir, "train", num_workers=1, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match=r"not a loader state"):
        loader.load_state_dict({"step": 3})


def test_infinite_loader_has_no_length(tiny_data):
    loader = build_loader(tiny_data.data_dir, "valid", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0)
    with pytest.raises(TypeError, match="epochs=N"):
        len(loader)
    assert len(take(loader, n=200)) == 200  # valid has ~500 samples: this runs through several epochs
    assert loader.epoch >= 2


# Bad data ------------------------------------------------------------------------------------

def first_train_shard(data_dir):
    return data_dir / load_manifest(data_dir)["splits"]["train"]["shards"][0]["name"]


def test_truncated_shard_is_reported_when_the_loader_is_built(data_copy):
    shard = first_train_shard(data_copy)
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CorruptShardError, match=rf"{shard}.*truncated.*pretrain prepare.*on_corrupt_shard=skip"):
        build_loader(data_copy, "train", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0)
    with pytest.raises(CorruptShardError, match=rf"{shard} fails its checksum"):
        list(iter_samples(data_copy, "train"))


def test_checksum_mismatch_stops_the_stream_with_a_clean_error_from_a_worker(data_copy):
    shard = first_train_shard(data_copy)
    payload = bytearray(shard.read_bytes())
    payload[2000] ^= 0xFF  # same size, other bytes: only the checksum can tell
    shard.write_bytes(bytes(payload))
    loader = build_loader(data_copy, "train", batch_size=8, rank=0, world_size=1, num_workers=2, seed=0, epochs=1)
    with pytest.raises(CorruptShardError) as info:
        take(loader)
    message = str(info.value)
    assert f"{shard} fails its checksum" in message and "Traceback" not in message


def test_skip_policy_counts_what_it_skips_and_loses_nothing_else(data_copy):
    manifest = load_manifest(data_copy)
    entry = manifest["splits"]["valid"]["shards"][1]
    bad = data_copy / entry["name"]
    lost = collections.Counter(tuple(ids.tolist()) for ids, _ in read_shard(bad, entry, 32))
    payload = bytearray(bad.read_bytes())
    payload[3000] ^= 0xFF
    bad.write_bytes(bytes(payload))
    expected = all_rows_except(data_copy, "valid", entry["name"])
    seen = collections.Counter()
    skipped = 0
    for rank in range(2):
        loader = build_loader(data_copy, "valid", batch_size=8, rank=rank, world_size=2, num_workers=2, seed=0, epochs=1, on_corrupt_shard="skip")
        seen += rows(take(loader))
        skipped += loader.skipped["samples"]
        if loader.skipped["shards"]:
            assert loader.skipped["entries"][0]["shard"] == entry["name"]
    assert skipped == entry["samples"] == sum(lost.values())
    assert seen == expected
    skipped_by_iter = []
    kept = sum(1 for _ in iter_samples(data_copy, "valid", on_corrupt_shard="skip", skipped=skipped_by_iter))
    assert kept == manifest["splits"]["valid"]["samples"] - entry["samples"]
    assert [(e["shard"], e["samples"]) for e in skipped_by_iter] == [(entry["name"], entry["samples"])]
    assert "fails its checksum" in skipped_by_iter[0]["error"]


def flip_a_byte(path):
    payload = bytearray(path.read_bytes())
    payload[3000] ^= 0xFF  # same size: only reading the shard can tell
    path.write_bytes(bytes(payload))


@pytest.mark.timeout(120)  # the bug this guards against is an endless loop
@pytest.mark.parametrize("num_workers", [0, 2])
def test_infinite_skip_stream_with_every_shard_broken_ends_with_an_error(data_copy, num_workers):
    """Skipping must not turn into re-reading the same broken files forever."""
    entries = load_manifest(data_copy)["splits"]["valid"]["shards"]
    for entry in entries:
        flip_a_byte(data_copy / entry["name"])
    loader = build_loader(data_copy, "valid", batch_size=8, rank=0, world_size=1, num_workers=num_workers, seed=0, on_corrupt_shard="skip")
    with pytest.raises(CorruptShardError, match=rf"all {len(entries)} shard\(s\) of split 'valid' .* unreadable"):
        take(loader, 1)


def test_infinite_skip_stream_goes_on_while_some_shard_is_readable(data_copy):
    entries = load_manifest(data_copy)["splits"]["valid"]["shards"]
    for entry in entries[1:]:
        flip_a_byte(data_copy / entry["name"])
    good = collections.Counter(tuple(ids.tolist()) for ids, _ in read_shard(data_copy / entries[0]["name"], entries[0], 32))
    loader = build_loader(data_copy, "valid", batch_size=4, rank=0, world_size=1, num_workers=0, seed=0, on_corrupt_shard="skip")
    batches = take(loader, 3 * sum(good.values()) // 4)  # three epochs' worth of the one good shard
    assert set(rows(batches)) == set(good)
    assert loader.skipped["shards"] >= len(entries) - 1


def test_skip_policy_refuses_a_split_whose_shards_are_all_missing(data_copy):
    for entry in load_manifest(data_copy)["splits"]["valid"]["shards"]:
        (data_copy / entry["name"]).unlink()
    with pytest.raises(CorruptShardError, match="every shard of .*valid is missing or resized"):
        build_loader(data_copy, "valid", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0, on_corrupt_shard="skip")


def all_rows_except(data_dir, split, shard_name):
    manifest = load_manifest(data_dir)
    out = collections.Counter()
    for entry in manifest["splits"][split]["shards"]:
        if entry["name"] != shard_name:
            out.update(tuple(ids.tolist()) for ids, _ in read_shard(data_dir / entry["name"], entry, 32))
    return out


def test_unreadable_tar_with_matching_checksum(data_copy):
    """A manifest that vouches for a file that is not a tar of our samples (e.g. hand-edited)."""
    manifest = load_manifest(data_copy)
    entry = manifest["splits"]["valid"]["shards"][0]
    path = data_copy / entry["name"]
    path.write_bytes(b"this is not a tar archive" * 100)
    entry.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    write_manifest(data_copy, manifest)
    with pytest.raises(CorruptShardError, match=rf"{path} is not a readable shard"):
        list(iter_samples(data_copy, "valid"))


def test_manifest_problems_name_the_file_and_the_fix(data_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json in .*pretrain prepare"):
        build_loader(tmp_path / "nowhere", "train", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0)
    (data_copy / "manifest.json").write_text('{"format": 1, "seq_len": ')
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON.*pretrain prepare"):
        list(iter_samples(data_copy, "train"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        manifest_sha256(tmp_path)


def test_tokenizer_that_does_not_match_the_manifest(data_copy, tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(f"line number {i} of another corpus" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "other"), vocab_size=60, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    shutil.copyfile(tmp_path / "other.model", data_copy / "tokenizer.model")
    with pytest.raises(ValueError, match=r"tokenizer\.model .* is not the one the shards were tokenised with"):
        build_loader(data_copy, "train", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="is not the one"):
        next(iter_samples(data_copy, "valid"))


def test_bad_arguments_and_unknown_split(tiny_data):
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="split 'test' is not in"):
        build_loader(tiny_data.data_dir, "test", **kw)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        build_loader(tiny_data.data_dir, "train", **{**kw, "rank": 2, "world_size": 2})
    with pytest.raises(ValueError, match="on_corrupt_shard"):
        build_loader(tiny_data.data_dir, "train", **kw, on_corrupt_shard="ignore")
