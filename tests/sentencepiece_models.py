"""Tiny *standard* SentencePiece models for tests: control pieces ``<s>`` / ``</s>`` / ``<pad>``
as ``spm_train`` makes them (unlike data_prep's ``<|bos|>`` family), or no BOS at all."""

from __future__ import annotations

import io
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ")


def train_standard_spm(path: Path, bos: bool = True, vocab_size: int = 300) -> Path:
    """Write a byte-fallback BPE model to ``path``: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<pad>`` 3 (with ``bos=False``: BOS disabled, ``</s>`` 1, ``<pad>`` 2)."""
    import sentencepiece as spm

    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3) if bos else \
        dict(unk_id=0, bos_id=-1, eos_id=1, pad_id=2)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([TEXT] * 20), model_writer=model,
                                   model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2, num_threads=1, **ids)
    path.write_bytes(model.getvalue())
    return path
