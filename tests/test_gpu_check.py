"""`make gpu-check CPU_SMOKE=1`: scripts/gpu_check.py runs every part end to end on tiny CPU shapes and
writes a JSON report with figures from each part (the GPU run itself needs a GPU machine)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"
PARTS = {"kernels", "bench_loss", "bandwidth", "decode", "train"}


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_cpu_smoke_runs_every_part_and_each_produces_figures(smoke_report):
    report, summary = smoke_report
    assert report["mode"] == "cpu-smoke" and report["ok"] is True
    assert set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert f"## {name}: ok" in summary
    parts = report["parts"]
    # Kernels: every loss in fp32 and bf16 (loss, both gradients, dtypes, ignored rows), strided layouts
    # of two losses, and the negative search, per dtype.
    assert parts["kernels"]["checks"] == parts["kernels"]["passed"] == 2 * (10 * 5 + 2 * 3 + 1)
    # bench loss: softmax and continuous rows at both vocabulary sizes; the GPU-only peers are named.
    assert len(parts["bench_loss"]["summary"]) == 2
    for rows in parts["bench_loss"]["summary"].values():
        assert rows["softmax"]["ms"] > 0 and rows["cosine+fused D8"]["ms"] > 0
    assert all("not installed" in s or "needs CUDA" in s for s in parts["bench_loss"]["peers"].values())
    targets = parts["bench_loss"]["targets"]
    assert targets["fastest_continuous"].split()[0].split("+")[0] in ("cosine", "vmf_practice")
    assert isinstance(targets["speedup_vs_softmax"], float) and isinstance(targets["speedup_vs_softmax_chunked"], float)
    assert targets["speedup_vs_fused_ce"].startswith("not measured")  # no Liger/CCE row without CUDA
    # Bandwidth: interleaved medians with their ranges, both methods, and the derived figures.
    for row in parts["bandwidth"]["losses"].values():
        for method in ("kernel", "reference"):
            low, high = row[method]["min_max_ms"]
            assert 0 < low <= row[method]["median_ms"] <= high
        assert row["speedup_vs_reference"] > 0 and row["achieved_gb_s"] > 0
    assert parts["bandwidth"]["peak_bandwidth_gb_s"] is None  # no HBM figure on a CPU
    # Decode: FAISS and torch top-k both searched; sharding explains why it did not run.
    methods = parts["decode"]["vectors_per_s"]["256"]
    assert methods["torch_cpu"] > 0 and methods["faiss_flat_cpu"] > 0
    assert "needs ≥ 2 GPUs" in parts["decode"]["sharded"]
    # Train: the three heads trained and timed side by side.
    assert {h for h, r in parts["train"]["heads"].items() if r["tokens_per_s"] > 0} == {"continuous_fused", "continuous", "softmax"}


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    gpu_check = _load_script()

    def broken(mode):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(gpu_check, "part_decode", broken)
    status = gpu_check.main(["--cpu-smoke", "--only", "decode", "train", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["ok"] is False
    assert report["parts"]["decode"]["status"] == "failed" and "decoder exploded" in report["parts"]["decode"]["error"]
    assert report["parts"]["train"]["status"] == "ok"


def test_without_a_gpu_the_full_run_is_refused_with_the_smoke_command():
    gpu_check = _load_script()
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", "unused"])
    assert exc.value.code == 2


def test_loss_targets_compare_the_fastest_continuous_head_with_softmax_and_the_fused_ce_peers():
    # The peers run only on CUDA, so their branch is checked on a results table of known figures.
    gpu_check = _load_script()
    row = lambda ms, mib: {"ms": ms, "peak_mib": mib}  # noqa: E731
    results = {
        # row names as `pretrain bench loss` writes them
        "32768": {"softmax": row(100.0, 900), "softmax_chunked": row(110.0, 300), "cosine D512": row(2.0, 40),
                  "cosine+fused D512": row(1.5, 10), "liger": row(40.0, 300)},
        "262144": {"softmax": row(400.0, 7000), "softmax_chunked": row(420.0, 900), "cosine D512": row(2.0, 40),
                   "cosine+fused D512": row(2.0, 12), "liger": row(90.0, 400), "cce": row(50.0, 30)},
    }
    targets = gpu_check._loss_targets(results["262144"], results, ["32768", "262144"])
    assert targets["fastest_continuous"] in ("cosine D512", "cosine+fused D512") and targets["speedup_vs_softmax"] == 200.0
    assert targets["speedup_vs_softmax_chunked"] == 210.0
    assert targets["speedup_vs_softmax_met"] is True
    assert targets["fastest_fused_ce"] == "cce" and targets["speedup_vs_fused_ce"] == 25.0
    assert targets["speedup_vs_fused_ce_met"] is False
    assert targets["memory_flat_in_v_met"] is True
