"""Train piece embeddings on the tokenized shards with gensim (skip-gram or fastText, negative sampling).

Sentences are documents of SentencePiece piece strings ("▁the", "ing", "<0x0A>"): the word-boundary
marker stays part of the piece, so fastText's character n-grams tell word-initial pieces apart.
gensim reads them from a LineSentence file (corpus.write_piece_corpus) on all cores.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from gensim.models.callbacks import CallbackAny2Vec
from tqdm.auto import tqdm

from pretrain.config import TargetsConfig
from pretrain.targets.corpus import piece_tokens
from pretrain.targets.fill import Composer, ngram_composer

log = logging.getLogger(__name__)
TRAINED = "trained"
# gensim reports progress only through this logger ("EPOCH %i - PROGRESS: at %.2f%% ...").
GENSIM_PROGRESS_LOGGER = "gensim.models.word2vec"


@dataclass
class TrainedVectors:
    vectors: np.ndarray  # [V, D]; zero rows where sources[i] is None
    sources: list[Optional[str]]  # "trained" or None (piece below min_count / absent)
    composer: Optional[Composer]  # fastText n-gram composition for the others
    stats: dict  # trainer throughput and settings, for the report
    model: object = None  # the gensim model (FastText / Word2Vec)


class _ProgressBar(logging.Handler, CallbackAny2Vec):
    """A tqdm bar in tokens fed by gensim's progress log records and its end-of-epoch callback."""

    def __init__(self, bar: tqdm, epoch_tokens: int):
        logging.Handler.__init__(self, logging.INFO)
        self.bar, self.epoch_tokens, self.epoch = bar, epoch_tokens, 0

    def _move_to(self, tokens: float) -> None:
        tokens = int(min(tokens, self.bar.total or tokens))
        if tokens > self.bar.n:
            self.bar.update(tokens - self.bar.n)

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("EPOCH %i - PROGRESS") and len(record.args) >= 2:
            self._move_to((self.epoch + float(record.args[1]) / 100) * self.epoch_tokens)

    def on_epoch_end(self, model) -> None:
        self.epoch += 1
        self._move_to(self.epoch * self.epoch_tokens)


def _build_model(cfg: TargetsConfig, workers: int):
    from gensim.models import FastText, Word2Vec

    common = dict(
        vector_size=cfg.dim, window=cfg.window, negative=cfg.negative, hs=0 if cfg.negative else 1,
        min_count=cfg.min_count, sg=1, seed=cfg.seed, workers=workers, epochs=cfg.epochs,
    )
    if cfg.algorithm == "fasttext":
        return FastText(bucket=cfg.ngram_buckets, **common)
    return Word2Vec(**common)


def train_piece_vectors(corpus_file: str | Path, pieces: list[str], cfg: TargetsConfig, *, progress: bool = True) -> TrainedVectors:
    """Train on a corpus file written with corpus.write_piece_corpus(..., piece_tokens(pieces));
    every piece seen >= targets.min_count times gets a vector."""
    workers = cfg.workers or os.cpu_count() or 1
    progress_logger = logging.getLogger(GENSIM_PROGRESS_LOGGER)
    saved = logging.getLogger("gensim").level, progress_logger.level, progress_logger.propagate
    logging.getLogger("gensim").setLevel(logging.WARNING)  # our bar replaces gensim's INFO chatter
    try:
        model = _build_model(cfg, workers)
        model.build_vocab(corpus_file=str(corpus_file))
        if not model.wv.index_to_key:
            raise ValueError(
                f"no piece occurs {cfg.min_count}+ times in the training split: nothing to train targets on "
                "(lower targets.min_count or use more data)"
            )
        total = model.corpus_total_words * cfg.epochs
        with tqdm(total=total, unit="tok", unit_scale=True, desc=f"targets {cfg.algorithm}", disable=not progress, mininterval=1.0) as bar:
            tracker = _ProgressBar(bar, model.corpus_total_words)
            progress_logger.setLevel(logging.INFO)
            progress_logger.propagate = False
            progress_logger.addHandler(tracker)
            try:
                t0 = time.perf_counter()
                model.train(corpus_file=str(corpus_file), total_words=model.corpus_total_words, epochs=cfg.epochs, callbacks=[tracker])
                seconds = time.perf_counter() - t0
            finally:
                progress_logger.removeHandler(tracker)
    finally:
        logging.getLogger("gensim").setLevel(saved[0])
        progress_logger.setLevel(saved[1])
        progress_logger.propagate = saved[2]

    vectors = np.zeros((len(pieces), cfg.dim), dtype=np.float32)
    sources: list[Optional[str]] = [None] * len(pieces)
    token_to_id = {t: i for i, t in enumerate(piece_tokens(pieces))}
    for token in model.wv.index_to_key:
        i = token_to_id.get(token)
        if i is None:
            raise ValueError(f"corpus file {corpus_file} holds {token!r}, which is no piece of this tokenizer: it was written for another vocabulary")
        vectors[i], sources[i] = model.wv[token], TRAINED
    stats = {
        "algorithm": cfg.algorithm,
        "epochs": cfg.epochs,
        "workers": workers,
        "corpus_tokens": int(model.corpus_total_words),
        "trained_tokens": int(total),
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(total / max(seconds, 1e-9), 1),
        "pieces_in_model": len(model.wv.index_to_key),
    }
    log.info("trained %s vectors on %d tokens x %d epochs in %.1f s (%.0f tokens/s, %d threads)",
             cfg.algorithm, model.corpus_total_words, cfg.epochs, seconds, stats["tokens_per_s"], workers)
    composer = ngram_composer(model.wv) if cfg.algorithm == "fasttext" else None
    return TrainedVectors(vectors, sources, composer, stats, model)
