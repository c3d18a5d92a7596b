"""The demo's closing summary: read from the files the stages write, and printed with the ratio."""
import json

from pretrain.commands import demo
from pretrain.config import load_config


def _write_run(run_dir, tokens_per_s, top1, peak):
    (run_dir / "eval").mkdir(parents=True)
    rows = [{"step": 10 * i, "loss": 1.0 / i, "tokens_per_s": tokens_per_s if i > 1 else 1.0, "peak_mem_mb": peak - 10 + i}
            for i in range(1, 11)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run_dir / "eval" / "report.json").write_text(json.dumps({"top1": top1, "top5": top1 + 0.1, "majority_top1": 0.04}))


def _write_finetune(out, accuracy):
    out.mkdir(parents=True)
    report = {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "train_rows": 400, "majority_baseline": {"accuracy": 0.25}}
    (out / "finetune_report.json").write_text(json.dumps(report))


def test_summary_reads_every_stage_and_prints_the_ratio(tmp_path, capsys):
    runs = {"continuous": tmp_path / "runs" / "continuous", "softmax": tmp_path / "runs" / "softmax"}
    _write_run(runs["continuous"], 4000.0, 0.22, 700)
    _write_run(runs["softmax"], 2000.0, 0.11, 800)
    _write_finetune(tmp_path / "ft" / "pretrained", 0.77)
    _write_finetune(tmp_path / "ft" / "scratch", 0.70)
    seconds = {"train continuous": 70.0, "train softmax": 110.0}
    summary = demo.collect_summary(runs, tmp_path / "ft", seconds, 300.0)
    cont, soft = summary["heads"]["continuous"], summary["heads"]["softmax"]
    # the warm-up step (tokens/s 1.0) is left out of the average; peak memory is the maximum
    assert cont["tokens_per_s"] == 4000.0 and soft["tokens_per_s"] == 2000.0
    assert cont["peak_mem_mb"] == 700 and soft["peak_mem_mb"] == 800
    assert summary["tokens_per_s_ratio"] == 2.0 and cont["steps"] == 100 and cont["final_loss"] == 0.1
    demo._print_summary(summary, load_config(None))
    out = capsys.readouterr().out
    assert "continuous / softmax tokens/s: 2.00x" in out
    assert "pretrained 0.770" in out and "scratch 0.700" in out
    assert f"pretrain ui {tmp_path / 'runs'}" in out


def test_a_rerun_starts_from_clean_outputs(tmp_path, capsys):
    for sub in ("runs/continuous/checkpoints", "export/continuous", "finetune/scratch", "data"):
        (tmp_path / sub).mkdir(parents=True)
    demo._fresh_outputs(tmp_path, [tmp_path / "runs" / "continuous", tmp_path / "runs" / "softmax"])
    assert not (tmp_path / "runs" / "continuous").exists() and not (tmp_path / "export").exists()
    assert not (tmp_path / "finetune").exists() and (tmp_path / "data").exists()
    assert "removed the previous demo's outputs" in capsys.readouterr().out
