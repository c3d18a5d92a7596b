"""Fine-tune a `pretrain export` with Hugging Face's Trainer (sequence classification head).

    pip install -e '.[hf]'
    python docs/examples/hf_trainer_finetune.py EXPORT_DIR news.csv --text-field body --label-field topic --out runs/hf-news

The export loads with AutoModelForSequenceClassification (trust_remote_code=True: the model code is
the export's modeling_softmaxfree.py): the pretrained encoder, a mean over real tokens, and a new
linear layer. Texts are truncated to the encoder's positions (`pretrain finetune` reads long texts
by windows instead). 20% of the rows, per label, are held out for evaluation.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path


def read_rows(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.suffix == ".jsonl" else list(csv.DictReader(f))
    return [str(r[text_field]) for r in rows], [str(r[label_field]) for r in rows]


def main(argv: list[str] | None = None):
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("data", type=Path, help="CSV (header row) or JSONL with a text and a label column")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--out", default="runs/hf-trainer")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    texts, names = read_rows(args.data, args.text_field, args.label_field)
    labels = sorted(set(names))
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.export_dir, trust_remote_code=True, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    encoded = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)
    examples = [{"input_ids": ids, "attention_mask": mask, "labels": labels.index(name)}
                for ids, mask, name in zip(encoded["input_ids"], encoded["attention_mask"], names)]
    # hold out 20% of each label's rows
    rng, held = random.Random(args.seed), set()
    for name in labels:
        rows = [i for i, n in enumerate(names) if n == name]
        held.update(rng.sample(rows, max(1, len(rows) // 5)))
    train = [e for i, e in enumerate(examples) if i not in held]
    evaluation = [e for i, e in enumerate(examples) if i in held]

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, weight_decay=0.01, logging_steps=5, save_strategy="no",
        eval_strategy="epoch", report_to=[], seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.out)  # a transformers directory: from_pretrained(args.out, trust_remote_code=True)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"], "labels": labels}))
    return trainer, metrics


if __name__ == "__main__":
    main()
