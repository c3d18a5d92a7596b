"""Downstream use of a pretrained encoder: export / load (export.py), classification fine-tuning (classify.py, finetune.py)."""
