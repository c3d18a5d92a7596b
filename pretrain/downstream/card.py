"""Model cards (README.md) for exported and fine-tuned encoders: what was trained, on what, how well."""
from __future__ import annotations

from typing import Any, Mapping

LOAD_SNIPPET = """```python
import torch, pretrain
model, tokenizer = pretrain.load_encoder("{path}")   # verifies hashes and shapes; no DeepSpeed needed
ids = torch.tensor([tokenizer.encode("a small domesticated carnivore") + [tokenizer.eos_id()]])
hidden = model.encode(ids)                             # [1, L, {d_model}]
vectors = model.embed(["a text", "another, of any length"])  # [2, {d_model}]: mean over real tokens
```

With Hugging Face tools (`pip install -e '.[hf]'`; the model code ships in `modeling_softmaxfree.py`):

```python
from transformers import AutoModel, AutoTokenizer
from sentence_transformers import SentenceTransformer
model = AutoModel.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
hidden = model(**tokenizer(["a text"], return_tensors="pt")).last_hidden_state
vectors = SentenceTransformer("{path}", trust_remote_code=True).encode(["a text"])
```"""

LONG_INPUTS = ("Inputs longer than {max_len} positions: `model.encode` and `model.embed` read them as sliding windows "
               "(stride half a window unless `stride=` says otherwise; `embed(..., max_windows=N)` keeps N evenly spread) "
               "and average; Hugging Face and sentence-transformers loading truncate to {max_len} tokens.")


def head_description(model: Mapping[str, Any], loss: Mapping[str, Any]) -> str:
    """One sentence on what the pretraining head predicted: the card says what this run did."""
    if model["head"] == "continuous":
        return (f"A transformer encoder pretrained ({model['objective']} objective) to predict the embedding of the target "
                f"token (continuous head, `{loss['name']}` loss) instead of a softmax over the vocabulary; decoding is "
                "nearest-neighbour search over `targets.safetensors`.")
    tied = ", tied to the input embeddings" if model.get("tie_softmax") else ""
    return (f"A transformer encoder pretrained ({model['objective']} objective) with a softmax head over the vocabulary "
            f"(cross-entropy{tied}), the usual language-model output layer; decoding is the arg-max logit.")


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
        f"# {name}: {'softmax-free' if model['head'] == 'continuous' else 'softmax'} {model['objective']} encoder",
        "",
        head_description(model, loss),
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
        "`tokenizer.model` (SentencePiece), `targets.safetensors` (target table, when the run had one), "
        "`modeling_softmaxfree.py`, `tokenizer.json` and the sentence-transformers files (Hugging Face loading).",
        "",
        "## Use",
        LOAD_SNIPPET.format(path="EXPORT_DIR", d_model=model["d_model"]),
        "",
        LONG_INPUTS.format(max_len=model["max_seq_len"]),
        "",
    ]
    return "\n".join(lines)


def finetune_card(manifest: Mapping[str, Any], report: Mapping[str, Any], classifier: Mapping[str, Any]) -> str:
    """Markdown card of a fine-tuned classifier: task, labels, how long texts were read, scores, baselines."""
    model = manifest["config"]["model"]
    init = {
        "pretrained": f"the pretrained encoder in {report['init']}",
        "scratch": "random initialisation (same architecture)",
        "scratch+table": "random initialisation with the input embeddings set from the target table (no pretraining)",
    }[report["init_kind"]]
    mode = "linear probe (frozen encoder)" if report["mode"] == "probe" else "fine-tuned"
    rows = report["rows"]
    tfidf = report.get("tfidf_baseline")
    lines = [
        f"# Sequence classifier ({len(classifier['labels'])} labels), {mode} from {init}",
        "",
        f"Encoder {model['n_layers']} × {model['d_model']}, {classifier['pooling']}-pooled, linear head; labels {classifier['labels']}.",
        f"Long texts: {report['windows']['policy']}.",
        f"Train {report['train_file']} ({report['train_rows']} of {rows['train']['rows_available']} rows), "
        f"evaluation {report['valid_file']} ({report['valid_rows']} rows).",
        "",
        "| epoch | train loss | accuracy | macro-F1 |",
        "|---|---|---|---|",
        *[f"| {h['epoch']} | {h['train_loss']:.4f} | {h['accuracy']:.4f} | {h['macro_f1']:.4f} |" for h in report["history"]],
        "",
        "| label | evaluation rows | precision | recall | F1 |",
        "|---|---|---|---|---|",
        *[f"| {label} | {c['support']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} |" for label, c in report["per_class"].items()],
        "",
        f"Majority-class baseline (evaluation split): accuracy {report['majority_baseline']['accuracy']:.4f}, "
        f"macro-F1 {report['majority_baseline']['macro_f1']:.4f}.",
        (f"TF-IDF + logistic regression: accuracy {tfidf['accuracy']:.4f}, macro-F1 {tfidf['macro_f1']:.4f}." if tfidf
         else "TF-IDF baseline not computed."),
        "",
        "Load with `pretrain.downstream.finetune.load_classifier(DIR)` (classifier, tokenizer, labels), "
        "or the encoder alone with `pretrain.load_encoder(DIR)`, "
        "`transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)` or "
        "`sentence_transformers.SentenceTransformer(DIR, trust_remote_code=True)`.",
        "",
    ]
    return "\n".join(lines)
