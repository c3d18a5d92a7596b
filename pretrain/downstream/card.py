"""Model cards (README.md) for exported and fine-tuned encoders: what was trained, on what, how well."""
from __future__ import annotations

from typing import Any, Mapping

LOAD_SNIPPET = """```python
import torch, pretrain
model, tokenizer = pretrain.load_encoder("{path}")   # verifies hashes and shapes; no DeepSpeed needed
ids = torch.tensor([tokenizer.encode("a small domesticated carnivore") + [tokenizer.eos_id()]])
hidden = model.encode(ids)                             # [1, L, {d_model}]
```"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: Mapping[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return lines


def export_card(
    *,
    name: str,
    config: Mapping[str, Any],
    vocab_size: int,
    num_parameters: int,
    dtype: str,
    source: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    eval_report: Mapping[str, Any] | None = None,
) -> str:
    """Markdown card: model, training, data, evaluation, files, how to load."""
    model, train, loss, targets = config["model"], config["train"], config["loss"], config["targets"]
    lines = [
        f"# {name}: softmax-free {model['objective']} encoder",
        "",
        f"A transformer encoder pretrained to predict the embedding of the target token ({model['head']} head, "
        f"`{loss['name']}` loss) instead of a softmax over the vocabulary; decoding is nearest-neighbour "
        "search over `targets.safetensors`.",
        "",
        "## Model",
        *_table({
            "layers × d_model × heads × d_ff": f"{model['n_layers']} × {model['d_model']} × {model['n_heads']} × {model['d_ff']}",
            "max sequence length": model["max_seq_len"],
            "parameters": f"{num_parameters:,}",
            "vocabulary (SentencePiece)": vocab_size,
            "target table": f"{vocab_size} × {targets['dim']} ({'learned' if targets.get('learned') else targets['method']})",
            "weights dtype": dtype,
        }),
        "",
        "## Training",
        *_table({
            "steps": source.get("step", "?"),
            "micro batch × grad accum": f"{train['micro_batch_size']} × {train['grad_accum']}",
            "world size": source.get("world_size", "?"),
            "learning rate": train["lr"],
            "ZeRO stage / pipeline stages": f"{train['zero_stage']} / {train['pipeline_stages']}",
            "precision": train["precision"],
            "checkpoint": f"{source.get('run_dir', '?')} @ {source.get('tag', '?')}",
        }),
        "",
        "## Data",
    ]
    corpus = ", ".join(config["data"]["corpus"])
    lines.append(f"Corpus: {corpus}; sequences of {config['data']['seq_len']} tokens.")
    if data:
        lines += ["", *_table(data)]
    lines += ["", "## Evaluation"]
    scalars = {k: v for k, v in (eval_report or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += _table(scalars) if scalars else ["No `eval/report.json` in the run directory (run `pretrain eval`)."]
    lines += [
        "",
        "## Files",
        "`model.safetensors` (weights), `config.json` (resolved config, vocab size, sha256 of every file), "
        "`tokenizer.model` (SentencePiece), `targets.safetensors` (target table).",
        "",
        "## Use",
        LOAD_SNIPPET.format(path="EXPORT_DIR", d_model=model["d_model"]),
        "",
    ]
    return "\n".join(lines)


def finetune_card(manifest: Mapping[str, Any], report: Mapping[str, Any], classifier: Mapping[str, Any]) -> str:
    """Markdown card of a fine-tuned classifier: task, labels, scores per epoch, baseline."""
    model = manifest["config"]["model"]
    init = "random initialisation (same architecture)" if report["from_scratch"] else f"the pretrained encoder in {report['init']}"
    lines = [
        f"# Sequence classifier ({len(classifier['labels'])} labels), fine-tuned from {init}",
        "",
        f"Encoder {model['n_layers']} × {model['d_model']}, {classifier['pooling']}-pooled, linear head; "
        f"labels {classifier['labels']}; texts cut to {classifier['max_len']} tokens.",
        f"Train {report['train_file']} ({report['train_rows']} rows), validation {report['valid_file']} ({report['valid_rows']} rows).",
        "",
        "| epoch | train loss | accuracy | macro-F1 |",
        "|---|---|---|---|",
        *[f"| {h['epoch']} | {h['train_loss']:.4f} | {h['accuracy']:.4f} | {h['macro_f1']:.4f} |" for h in report["history"]],
        "",
        f"Majority-class baseline: accuracy {report['majority_baseline']['accuracy']:.4f}, "
        f"macro-F1 {report['majority_baseline']['macro_f1']:.4f}.",
        "",
        "Load with `pretrain.downstream.finetune.load_classifier(DIR)` (classifier, tokenizer, labels), "
        "or the encoder alone with `pretrain.load_encoder(DIR)`.",
        "",
    ]
    return "\n".join(lines)
