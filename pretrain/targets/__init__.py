"""Target embeddings: the V x D table the continuous head predicts into (`pretrain targets`).

table.py (file + metadata checks) <- build.py (orchestration) <- corpus.py (shards -> piece documents),
trained.py (gensim), imported.py (word2vec / fastText files), fill.py (ids without a vector);
diagnostics.py (collapse / distinguishability / meaning); learned.py (trainable targets for the engine).
"""
