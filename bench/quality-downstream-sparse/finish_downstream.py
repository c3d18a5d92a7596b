# Usage: .venv/bin/python bench/quality-downstream-sparse/finish_downstream.py WORKDIR STUDY_LOG OUT.json [KEY=VALUE ...]
"""The downstream half of a `pretrain bench quality` run, on the encoders that run already exported.

The study of 2026-12-03 (`--variant softmax --variant adaptive_softmax_sparse --variant learned_vmf_sparse
--downstream softmax,adaptive_softmax_sparse,learned_vmf_sparse --task wordnet-domains --task fortunes
data.valid_fraction=0.05 finetune.epochs=20 train.seed=N`) pretrained and exported its three encoders
(6000 steps each) and then stopped in fine-tuning: an export pretrained with row-sparse tables loaded
with sparse embedding gradients, which clip_grad_norm_ refused (fixed in 46b3194). This script runs the
same pretrain.bench.quality.downstream on those exports (the same controls, seeds and label budgets as
the study's defaults) instead of pretraining them again, and takes each encoder's pretraining record
from the study's log."""
import ast
import json
import re
import sys
from pathlib import Path

from pretrain.bench import quality
from pretrain.config import load_config

workdir, log_file, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
overrides = [*quality.STUDY["overrides"], *sys.argv[4:]]
corpus = quality.parse_corpora(["wordnet=data/corpus"])[0]
cfg, _, _ = quality.prepare_corpus(load_config("configs/tiny.yaml", overrides), corpus, workdir, quality.STUDY["bytes"],
                                   quality.corpus_source(corpus))  # the study's prepared data (reused: same key)
exports = workdir / corpus.name / "exports"
chosen = ["softmax", "adaptive_softmax_sparse", "learned_vmf_sparse"]
encoders = {v: exports / v for v in chosen} | {"control: table embeddings, no pretraining": exports / "table-init"}
pretraining = {m[1]: ast.literal_eval(m[2]) for m in re.finditer(r"quality: downstream encoder (\S+): (\{.*\})", log_file.read_text())}
assert set(pretraining) == set(chosen), f"{log_file}: pretraining records {sorted(pretraining)}"
tasks = quality.parse_tasks(["wordnet-domains", "fortunes"], workdir)
result = {"overrides": overrides, "seeds": 3, "finetune": {k: getattr(cfg.finetune, k) for k in ("epochs", "lr", "encoder_lr_scale", "pooling", "batch_size")},
          "pretraining": pretraining, "tasks": {}}
for task in tasks:
    scores = quality.downstream(encoders, cfg, task, workdir / corpus.name, 3, 20, 100)
    result["tasks"][task.name] = {**task.as_dict(), "results": scores,
                                  "verdict": quality.downstream_verdict(scores, ["softmax", "adaptive_softmax_sparse"])}
    out.write_text(json.dumps(result, indent=2, default=str))
print(json.dumps({t: {n: {b: round(100 * r["mean"], 1) for b, r in by.items()} for n, by in v["results"].items()} for t, v in result["tasks"].items()}, indent=1))
