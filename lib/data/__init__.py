"""Data and tokenizer: text in (corpus, sources: files and readers), the SentencePiece tokenizer
and its fast encoder, encoding into token shards (pipeline, encode, parallel), and the training
batches and sampler read from them (batches)."""
