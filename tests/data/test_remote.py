"""Shards read from a URL prefix: S3 over HTTP against a local moto server the test starts (the real
s3fs client, pointed at it by AWS_ENDPOINT_URL), and a flaky `pipe:` command for the retry."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from unittest import mock
from pathlib import Path

import pytest
import torch

from pretrain.data.stream import CorruptShardError, build_loader, iter_samples


def take(loader, n):
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if len(out) == n:
            return out
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["doc_ids"], y["doc_ids"]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def s3_bucket(tiny_data, tmp_path_factory):
    """A moto S3 server on 127.0.0.1 holding a copy of tiny_data's data dir under s3://shards/tiny."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server did not start (see {log.name})")
            time.sleep(0.2)
    aws = dict(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    with mock.patch.dict(os.environ, aws):  # restored when the module's tests are done
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("shards")
        fs.put(str(tiny_data.data_dir) + "/", "shards/tiny", recursive=True)
        yield fs
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def meta_only(tiny_data, tmp_path):
    """The data dir a training node keeps: manifest and tokenizer, no shard."""
    meta = tmp_path / "data"
    meta.mkdir()
    for name in ("manifest.json", "tokenizer.model"):
        shutil.copy(tiny_data.data_dir / name, meta / name)
    return meta


def test_s3_stream_equals_the_local_one_and_resumes_exactly(tiny_data, s3_bucket, meta_only):
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=0, seed=3, shuffle_buffer=16)
    local = take(build_loader(tiny_data.data_dir, "train", **kw), 40)
    remote_loader = build_loader(meta_only, "train", shards_url="s3://shards/tiny", **kw)
    first = take(remote_loader, 15)
    assert same(first, local[:15])
    state = json.loads(json.dumps(remote_loader.state_dict()))
    resumed = build_loader(meta_only, "train", shards_url="s3://shards/tiny", **kw)
    resumed.load_state_dict(state)
    assert same(take(resumed, 25), local[15:40])
    assert sum(1 for _ in iter_samples(meta_only, "valid", shards_url="s3://shards/tiny")) == sum(1 for _ in iter_samples(tiny_data.data_dir, "valid"))


def test_s3_manifest_and_shards_are_checked(tiny_data, s3_bucket, meta_only):
    manifest = json.loads((meta_only / "manifest.json").read_text())
    victim = manifest["splits"]["valid"]["shards"][1]["name"]
    s3_bucket.mv(f"shards/tiny/{victim}", "shards/elsewhere.tar")
    try:
        with pytest.raises(CorruptShardError, match=rf"{victim} is missing"):
            build_loader(meta_only, "valid", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0, epochs=1, shards_url="s3://shards/tiny")
    finally:
        s3_bucket.mv("shards/elsewhere.tar", f"shards/tiny/{victim}")
    (meta_only / "manifest.json").write_text(json.dumps(manifest, indent=1))  # same content, other bytes
    with pytest.raises(ValueError, match=r"s3://shards/tiny/manifest.json differs from .*come from another prepare"):
        build_loader(meta_only, "valid", batch_size=8, rank=0, world_size=1, num_workers=0, seed=0, epochs=1, shards_url="s3://shards/tiny")


def test_a_transient_read_error_is_retried_with_back_off(tiny_data, meta_only, tmp_path, caplog):
    """pipe: command that fails the first time it is asked for each shard, then succeeds."""
    marks = tmp_path / "marks"
    marks.mkdir()
    command = f"pipe:m={marks}/$(echo {{name}} | tr / _); if [ -e $m ]; then cat {tiny_data.data_dir}/{{name}}; else touch $m; echo flaky >&2; exit 1; fi"
    samples = list(iter_samples(meta_only, "valid", shards_url=command))
    assert len(samples) == sum(1 for _ in iter_samples(tiny_data.data_dir, "valid"))
    assert caplog.text.count("retry 1 of 3") == len(list(marks.iterdir())) >= 3  # the manifest and every shard, once each
    # a read that keeps failing is reported, naming what was read, after the last attempt
    with pytest.raises(FileNotFoundError, match=r"cannot read pipe:exit 7 .*after 4 attempts.*data\.shards_url"):
        list(iter_samples(meta_only, "valid", shards_url="pipe:exit 7"))


@pytest.mark.system
@pytest.mark.multiproc
def test_training_from_s3_is_killed_mid_run_and_resumes_with_the_same_losses(tiny_runs, s3_bucket, meta_only, tmp_path):
    """`pretrain train` (2 processes, loader workers) streaming from the moto S3 server, killed at
    step 10, resumed from its step-8 checkpoint: the 16 per-step losses equal the local zero2 run's."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
    import tiny_runs as tiny_runs_script
    from engine_launch import launch, metrics_rows, wait_for_step

    from pretrain.engine.trainer import PAUSE_ENV

    base = tiny_runs["zero2"].run_dir.parent / "base.yaml"
    run_dir = tmp_path / "run"
    args = ["train", str(base), *tiny_runs_script.RUNS["zero2"], f"train.run_dir={run_dir}", "train.run_name=zero2",
            f"data.dir={meta_only}", "data.shards_url=s3://shards/tiny"]
    job = launch(args, 2, tmp_path / "a", env={PAUSE_ENV: "10"})
    wait_for_step(job, run_dir, 10)
    job.kill()
    job = launch(args, 2, tmp_path / "b")
    assert job.wait() == [0, 0], job.output()
    per_step = ("loss", "lr", "grad_norm", "data_fingerprint", "samples_seen")
    resumed, reference = metrics_rows(run_dir), metrics_rows(tiny_runs["zero2"].run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert [{k: r[k] for k in per_step} for r in resumed] == [{k: r[k] for k in per_step} for r in reference]
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_plain_http_prefix_streams_the_same_samples(tiny_data, meta_only):
    """An HTTP server on 127.0.0.1 serving the data dir (python -m http.server): fsspec's HTTP reader."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tiny_data.data_dir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/manifest.json", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "http.server did not start"
                time.sleep(0.2)
        remote = list(iter_samples(meta_only, "valid", shards_url=f"http://127.0.0.1:{port}"))
        local = list(iter_samples(tiny_data.data_dir, "valid"))
        assert len(remote) == len(local) and all((a == b).all() for a, b in zip(remote, local))
    finally:
        server.terminate()
        server.wait(timeout=30)
