"""`pretrain eval`: score a checkpoint on the validation shards.

Continuous head: predicted vectors decoded by nearest-neighbour search over the target table
(FAISS; eval.index flat/ivf/hnsw, eval.device auto/cpu/gpu/sharded). Softmax head: argmax of the
logits. Both heads are scored on the same masked positions (eval.seed), so their numbers compare.
Writes RUN_DIR/eval/report.json (top1, top5, loss, mean_cosine or perplexity, decode vectors/s),
eval/samples.txt (input, targets and predictions side by side) and, with tracking on, MLflow metrics
eval/* and the report as an artifact, added to the training run's MLflow run (on its server, if it was
tracked on one). Scored on another data set (--data-dir), everything is keyed by that data set's
name (<dir name>-<manifest sha256 prefix>): RUN_DIR/eval/<name>/report.json, metrics eval/<name>/*,
so no result overwrites another. Several processes (pretrain launch, torchrun) split the shards; rank 0 writes.

Examples (overrides come before the options):
  pretrain eval configs/tiny.yaml train.run_name=continuous
  pretrain eval configs/tiny.yaml eval.index=ivf eval.ivf_nprobe=32 --run-dir runs/tiny/runs/continuous
  pretrain launch --nproc-per-node 2 eval configs/tiny.yaml --run-dir runs/tiny/runs/softmax
  pretrain eval configs/tiny.yaml --export runs/tiny/export/continuous
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "evaluate a checkpoint: top-1/top-5 by nearest-neighbour decoding (FAISS) or argmax"
DESCRIPTION = __doc__
log = logging.getLogger("pretrain.eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", help="training run to evaluate (default: the config's run dir)")
    source.add_argument("--export", metavar="DIR", help="evaluate an export directory (`pretrain export`) instead of a run")
    parser.add_argument("--tag", help="checkpoint tag of the run, e.g. step-00000300 (default: latest)")
    parser.add_argument("--data-dir", help="prepared data whose valid/ split is scored (default: the run's data dir; "
                        "with --export: the config's data.dir)")
    parser.add_argument("--out", help="report path (default: RUN_DIR/eval/report.json, or EXPORT/eval/report.json)")


def run(args: argparse.Namespace) -> int:
    from pretrain.config import save_resolved
    from pretrain.data.stream import build_loader
    from pretrain.engine.distributed import detect, device_for, init_distributed
    from pretrain.evaluation import subject as subjects
    from pretrain.evaluation.decoder import NearestNeighbourDecoder
    from pretrain.evaluation.evaluate import evaluate
    from pretrain.evaluation.samples import format_samples, side_by_side

    cli_cfg = config_from_args(args)
    env = detect()
    if env.world_size > 1:
        init_distributed(env)
    device = device_for(env)
    if args.export and args.tag:
        raise ValueError(f"--tag picks a checkpoint of a training run; the export {args.export} holds one model: "
                         "drop --tag, or evaluate the run with --run-dir RUN_DIR --tag TAG")
    if args.export:
        subject = subjects.from_export(args.export, data_dir=args.data_dir or cli_cfg.data_dir)
        eval_dir = Path(args.export) / "eval"
    else:
        run_dir = Path(args.run_dir) if args.run_dir else cli_cfg.run_dir
        subject = subjects.from_run(run_dir, tag=args.tag, data_dir=args.data_dir)
        eval_dir = run_dir / "eval"
    dataset = dataset_key(subject.data_dir, subject.cfg.data_dir)
    out = Path(args.out) if args.out else eval_dir / (dataset or "") / "report.json"
    model = subject.model.to(device)
    eval_cfg = cli_cfg.eval
    decoder = None
    if model.continuous:
        decoder = NearestNeighbourDecoder.from_config(model.target_table, eval_cfg, gpu_id=env.local_rank, world_size=env.world_size)
    loader = build_loader(
        subject.data_dir, "valid", batch_size=eval_cfg.batch_size, rank=env.rank, world_size=env.world_size,
        num_workers=cli_cfg.data.loader_workers, seed=subject.cfg.data.seed, epochs=1,
        on_corrupt_shard=cli_cfg.data.on_corrupt_shard, shards_url=cli_cfg.data.shards_url,
    )
    result = evaluate(
        model, loader, decoder=decoder, topk=eval_cfg.topk, seed=eval_cfg.seed,
        max_batches=eval_cfg.max_batches, num_examples=eval_cfg.samples_to_show, progress=env.rank == 0,
    )
    if env.rank != 0:
        return 0

    samples = [
        side_by_side(subject.tokenizer, inputs, labels, predicted, objective=subject.cfg.model.objective,
                     special_ids=model.objective.special_ids)
        for inputs, labels, predicted in result.examples
    ]
    report = {
        **result.metrics,
        "objective": subject.cfg.model.objective,
        "loss_name": subject.cfg.loss.name if model.continuous else "cross_entropy",
        "checkpoint": subject.source,
        "data_dir": str(subject.data_dir),
        "dataset": dataset or "training data",
        "world_size": env.world_size,
        "skipped_shards": loader.skipped,  # this rank's (data.on_corrupt_shard=skip)
        "eval": eval_cfg.model_dump(mode="json"),
        "samples": samples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    (out.parent / "samples.txt").write_text(format_samples(samples) + "\n")
    save_resolved(cli_cfg, out.parent)
    _track(subject, cli_cfg, report, out, dataset)

    summary = f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}  loss {report['loss']:.4f}"
    summary += f"  mean cosine {report['mean_cosine']:.4f}" if model.continuous else f"  perplexity {report['perplexity']:.2f}"
    print(f"{report['head']} head ({report['decoding']}) on {report['tokens']} validation tokens: {summary}")
    print(f"baselines: chance top-1 {report['chance_top1']:.2e}, always-the-most-frequent-piece top-1 {report['majority_top1']:.4f}; "
          f"decode {report['decode']['vectors_per_s']:.0f} vectors/s ({report['decode'].get('placement', 'torch')})")
    if samples:
        print(format_samples(samples))
    print(f"report written to {out}")
    return 0


def dataset_key(data_dir: Path, training_data_dir: Path) -> str | None:
    """None for the data the model was trained on; else a name for the data set that no other shares."""
    from pretrain.data.manifest import manifest_sha256

    if Path(data_dir).resolve() == Path(training_data_dir).resolve():
        return None
    return f"{Path(data_dir).resolve().name}-{manifest_sha256(data_dir)[:8]}"


def _track(subject, cli_cfg, report: dict, out: Path, dataset: str | None) -> None:
    """Metrics eval/* (eval/<dataset>/* for another data set) at the checkpoint's step, into the run's
    MLflow run (or one beside the report)."""
    from pretrain.tracking.tracker import is_remote, read_run_record, start_tracking

    if not cli_cfg.tracking.enabled:
        return
    tracking = cli_cfg.tracking
    tracking_dir = Path(subject.source["run_dir"]) if "run_dir" in subject.source else out.parent
    recorded_uri = (read_run_record(tracking_dir) or {}).get("tracking_uri") or ""
    if not tracking.tracking_uri and is_remote(recorded_uri):
        # The run was tracked on a server: add to that MLflow run, not to a new local store.
        tracking = tracking.model_copy(update={"tracking_uri": recorded_uri})
    # The run's own config keeps its MLflow params unchanged; tracking settings come from the command line.
    cfg = subject.cfg.model_copy(update={"tracking": tracking})
    tracker = start_tracking(cfg, tracking_dir, rank=0)
    try:
        numbers = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers["decode_vectors_per_s"] = report["decode"]["vectors_per_s"]
        for key, value in report["decode"].get("recall_against_exact", {}).items():
            numbers[f"decode_{key}"] = value
        prefix = f"eval/{dataset}" if dataset else "eval"
        tracker.log_metrics({f"{prefix}/{k}": v for k, v in numbers.items()}, step=int(subject.source.get("step") or 0))
        tracker.set_tags({f"{prefix.replace('/', '.')}.{k}": v for k, v in report["eval"].items()})
        tracker.log_artifact(out, artifact_path=prefix)
        tracker.log_artifact(out.parent / "samples.txt", artifact_path=prefix)
    finally:
        tracker.close()
