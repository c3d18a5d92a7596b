"""slurm/prepare.sbatch on the real local SLURM cluster: a 4-task job array over two node daemons
prepares a corpus of several files (one cut into byte ranges); the last task writes the manifest,
and every shard, part result and the manifest equal those of a one-process `pretrain prepare`."""
from __future__ import annotations

import gzip
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import REPO_ROOT, load_config
from pretrain.data.prepare import prepare_dataset

pytestmark = pytest.mark.system

TASKS = 4
JOB_TIMEOUT = 600


def _output_files(data_dir: Path) -> dict[Path, bytes]:
    return {p.relative_to(data_dir): p.read_bytes() for p in sorted(data_dir.rglob("*"))
            if p.suffix in (".tar", ".json", ".model") and p.name != "prepare_report.json"}


def test_array_prepare_equals_one_process(slurm_cluster, tmp_path):
    with gzip.open(REPO_ROOT / "data" / "corpus" / "wordnet_glosses.txt.gz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(3000)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, start in enumerate((0, 1800, 2400)):  # the first file is cut into several byte ranges
        (corpus / f"part{i}.txt").write_text("".join(lines[start:start + (1800 if i == 0 else 600)]))
    args = [f"data.corpus=[{corpus}]", "data.seq_len=32", "data.samples_per_shard=64", "data.valid_fraction=0.1",
            "data.part_bytes=40000", "tokenizer.vocab_size=600", "data.num_proc=1"]
    reference = load_config(None, [f"workdir={tmp_path / 'one'}", *args])
    prepare_dataset(reference, progress=False, processes=1)

    work = [f"workdir={tmp_path / 'array'}", *args]
    from pretrain.cli import main

    assert main(["prepare", "--no-progress", "--step", "tokenizer", *work]) == 0
    logs = tmp_path / "logs"
    logs.mkdir()
    job = slurm_cluster.sbatch(
        "slurm/prepare.sbatch", *work,
        options=[f"--array=0-{TASKS - 1}", "--cpus-per-task=1", "--time=15", f"--output={logs}/%x-%A_%a.out"],
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + JOB_TIMEOUT
    while slurm_cluster.run("squeue", "-h", "-j", str(job)).strip():
        assert time.monotonic() < deadline, f"array job {job} still queued or running after {JOB_TIMEOUT} s"
        time.sleep(1)
    outputs = sorted(logs.glob("*.out"))
    log_text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in outputs)
    assert len(outputs) == TASKS, log_text
    assert log_text.count(f"of {TASKS}: parts done") == TASKS and log_text.count("manifest written") == 1, log_text

    one, array = _output_files(reference.data_dir), _output_files(tmp_path / "array" / "data")
    assert len([p for p in one if p.suffix == ".tar"]) > 10 and len(list((reference.data_dir / "parts").iterdir())) > TASKS
    assert one.keys() == array.keys()
    assert [p for p in one if one[p] != array[p]] == []
