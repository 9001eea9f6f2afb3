"""Corpora to Megatron indexed datasets: tokenizer training, preprocessing, merging, blends.

Command-line tools (each has ``--help``):

- ``python -m data_prep.corpus``: the embedded default corpus (Python's own standard library).
- ``python -m data_prep.train_tokenizer``: a SentencePiece BPE model (docs/design.md §6.3 settings).
- ``python -m data_prep.preprocess``: jsonl/json/parquet/txt (plain, .gz, .zst) to .bin/.idx.
- ``python -m data_prep.merge``: concatenate several datasets into one.
- ``python -m data_prep.inspect``: counts, histograms, samples and a consistency check.
- ``python -m data_prep.blend``: a blend file to Megatron's data-path arguments.

Importing this package is cheap; torch/megatron-core are imported only where a dataset is
read or written.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
