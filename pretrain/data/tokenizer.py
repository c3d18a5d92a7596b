"""Stage 2 of `pretrain prepare`: the SentencePiece tokenizer (train on a corpus sample, or reuse one).

Every tokenizer the project uses has the same special ids (the model and the shards rely on them):
pad=0, unk=1, bos=2, eos=3 and the control symbol ``<mask>``=4. Training uses the identity
normalisation, keeps whitespace and falls back to bytes, so ``decode(encode(text)) == text``.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
MASK_PIECE = "<mask>"
# SentencePiece skips training sentences longer than this (bytes); long lines are rare in text.
MAX_SENTENCE_BYTES = 1 << 15


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_tokenizer(
    sentences: Iterable[str],
    model_path: str | Path,
    *,
    model_type: str,
    vocab_size: int,
    character_coverage: float,
    seed: int,
    num_threads: int,
) -> spm.SentencePieceProcessor:
    """Train a SentencePiece model on ``sentences`` and write it to ``model_path`` (+ ``.vocab``)."""
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    # Through model_writer rather than model_prefix: the model file stores the trainer options,
    # and an output path among them would make identical tokenizers differ by location.
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_bytes,
            model_type=model_type,
            vocab_size=vocab_size,
            # a small corpus may not support the requested size: take what it has instead of failing
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            pad_id=SPECIAL_IDS["pad"],
            unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"],
            control_symbols=[MASK_PIECE],
            num_threads=max(1, num_threads),
            # its INFO chatter is hundreds of lines; warnings and errors still show
            minloglevel=1,
        )
    except RuntimeError as exc:
        raise ValueError(f"SentencePiece training failed for {model_path}: {exc}") from None
    model_path.write_bytes(model_bytes.getvalue())
    processor = load_tokenizer(model_path)
    # the human-readable piece list spm_train writes next to the model
    with open(model_path.with_suffix(".vocab"), "w", encoding="utf-8") as vocab:
        for i in range(processor.get_piece_size()):
            vocab.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
    return processor


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model and check it carries the project's special ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found: run `pretrain prepare` (or set tokenizer.model_path)")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"{path} is not a SentencePiece model ({exc}): point tokenizer.model_path at a .model file") from None
    check_special_ids(processor, path)
    return processor


def check_special_ids(processor: spm.SentencePieceProcessor, path: str | Path) -> None:
    found = {
        "pad": processor.pad_id(),
        "unk": processor.unk_id(),
        "bos": processor.bos_id(),
        "eos": processor.eos_id(),
        "mask": processor.piece_to_id(MASK_PIECE) if processor.piece_to_id(MASK_PIECE) != processor.unk_id() else -1,
    }
    if found != SPECIAL_IDS:
        raise ValueError(
            f"tokenizer {path} has special ids {found}, the project needs {SPECIAL_IDS}: train it with "
            "pad_id=0 unk_id=1 bos_id=2 eos_id=3 control_symbols=<mask>, or leave tokenizer.model_path empty "
            "so `pretrain prepare` trains one"
        )


def encode_batch(processor: spm.SentencePieceProcessor, texts: list[str], num_threads: int) -> list[list[int]]:
    """Token ids of each text; SentencePiece spreads the batch over ``num_threads`` C++ threads."""
    return processor.encode(texts, out_type=int, num_threads=max(1, num_threads or os.cpu_count() or 1))
