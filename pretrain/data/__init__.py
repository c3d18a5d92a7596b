"""The data path, one stage per module: corpus (read files) -> tokenizer (SentencePiece) -> packing
(fixed-length sequences) -> shards (WebDataset tars) + manifest; prepare runs them in order; stream
reads the shards back for training and evaluation (exact resume)."""
