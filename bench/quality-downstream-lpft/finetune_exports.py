# Usage: .venv/bin/python bench/quality-downstream-lpft/finetune_exports.py OUT.json --export NAME=DIR [...] [--task T ...] [KEY=VALUE ...]
"""The downstream half of `pretrain bench quality` (pretrain.bench.quality.downstream: the same controls, seeds,
label budgets and TF-IDF row) on encoders a study run already exported, under other fine-tuning settings
(KEY=VALUE overrides after the study's own, e.g. finetune.probe_first=true): comparing fine-tuning
recipes without pretraining the encoders again. The first --export's architecture gives the random-init
control; name the table control's export 'control: table embeddings, no pretraining'. The encoders of
2026-12-03 were exported before the study stamped its exports; for exports it stamped,
`pretrain bench quality ... --reuse-exports finetune.KEY=VALUE` does the same within the study."""
import argparse
import json
from pathlib import Path

from pretrain.bench import quality
from pretrain.config import load_config

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("out", type=Path)
parser.add_argument("--export", action="append", required=True, metavar="NAME=DIR")
parser.add_argument("--task", action="append", default=None)
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument("overrides", nargs="*")
args = parser.parse_intermixed_args()

overrides = [*quality.STUDY["overrides"], *args.overrides]
cfg = load_config("configs/tiny.yaml", overrides)
encoders = {}
for spec in args.export:
    name, _, path = spec.rpartition("=")
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"--export {spec}: {path}/config.json not found: name a `pretrain export` directory")
    encoders[name] = Path(path)
workdir = args.out.parent / (args.out.stem + "-runs")
tasks = quality.parse_tasks(args.task or ["wordnet-domains", "fortunes"], workdir)
result = {"overrides": overrides, "seeds": args.seeds, "exports": {n: str(p) for n, p in encoders.items()},
          "finetune": cfg.finetune.model_dump(exclude={"train_file", "valid_file"}), "tasks": {}}
for task in tasks:
    scores = quality.downstream(encoders, cfg, task, workdir, args.seeds, 20, 100)
    result["tasks"][task.name] = {**task.as_dict(), "results": scores, "verdict": quality.downstream_verdict(scores, ["softmax"])}
    args.out.write_text(json.dumps(result, indent=2, default=str))
print(json.dumps({t: {n: {b: f"{100 * r['mean']:.1f} ± {100 * r['spread'] / 2:.1f}" for b, r in by.items()} for n, by in v["results"].items()}
                  for t, v in result["tasks"].items()}, indent=1))
