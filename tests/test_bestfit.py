"""BOS-aligned best-fit packing (spec §2.3) as a Megatron dataset over indexed datasets."""

from __future__ import annotations

import numpy
import pytest
import torch

from parcae_megatron.data.bestfit import (
    BestFitDatasetConfig,
    BestFitGPTDataset,
    pack_best_fit,
)

BOS, EOS, PAD, SEQ = 1, 2, 3, 32


class Tokenizer:
    """The few tokenizer fields Megatron's datasets read."""

    bos, eod, pad, vocab_size = BOS, EOS, PAD, 300
    unique_identifiers = {"class": "Tokenizer", "vocab_size": 300}


def write_documents(prefix: str, seed: int, count: int = 120) -> list[numpy.ndarray]:
    """<bos> text <eos> documents of 3..100 tokens (many longer than a 33-token row)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    docs = []
    for _ in range(count):
        body = rng.integers(10, 300, size=int(rng.integers(1, 99)))
        doc = numpy.concatenate([[BOS], body, [EOS]]).astype(numpy.uint16)
        builder.add_document(torch.from_numpy(doc.astype(numpy.int64)), [len(doc)])
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


def config(tmp_path, seed=1, **kw) -> BestFitDatasetConfig:
    return BestFitDatasetConfig(
        random_seed=seed, sequence_length=SEQ, tokenizer=Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=str(tmp_path / "cache"),
        packing_buffer=kw.pop("packing_buffer", 16), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bestfit")
    prefix = str(tmp / "docs")
    return prefix, write_documents(prefix, seed=0)


def one_epoch(tmp_path, prefix, seed=1, num_samples=None) -> BestFitGPTDataset:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    data = IndexedDataset(prefix)
    return BestFitGPTDataset(data, prefix, numpy.arange(len(data), dtype=numpy.int32),
                             num_samples, Split.train, config(tmp_path, seed))


def test_best_fit_and_crop_by_hand():
    # buffer of 3, rows of 10: d2 (9) fits best, then only the shortest d3 is cropped (1 of
    # 2 tokens); next row d4 (7) then d1 (3); d0 alone cannot complete a row and is left over.
    packing = pack_best_fit([0, 1, 2, 3, 4], [5, 3, 9, 2, 7], row_length=10, buffer_size=3)
    assert packing.row_ptr.tolist() == [0, 2, 4]
    assert packing.parts.tolist() == [[2, 9], [3, 1], [4, 7], [1, 3]]
    assert packing.cropped_tokens == 1


def test_rows_start_at_bos_and_every_token_is_accounted_for(corpus, tmp_path):
    prefix, docs = corpus
    ds = one_epoch(tmp_path, prefix)
    lengths = numpy.array([len(d) for d in docs])
    seen: set[int] = set()
    placed = cropped = crops = 0
    for i in range(len(ds)):
        sample = ds[i]
        text = torch.cat([sample["tokens"], sample["labels"][-1:]])
        assert text.shape == (SEQ + 1,) and int(text[0]) == BOS
        lo, hi = int(ds.sample_index[i]), int(ds.sample_index[i + 1])
        expect = []
        for j, (doc, n) in enumerate(ds.document_index[lo:hi]):
            assert doc not in seen  # each document at most once per epoch
            seen.add(int(doc))
            expect.append(docs[doc][:n])
            placed += n
            if n < lengths[doc]:  # a crop: only ever the last piece of a row
                assert j == hi - lo - 1
                crops += 1
                cropped += lengths[doc] - n
        assert text.tolist() == numpy.concatenate(expect).tolist()
        assert sample["loss_mask"].sum() == SEQ  # no cross-document masking
    left_over = int(lengths[[d for d in range(len(docs)) if d not in seen]].sum())
    assert placed + cropped + left_over == lengths.sum()
    assert placed == len(ds) * (SEQ + 1)
    assert 0 < crops <= len(ds) and left_over < 16 * 100  # at most a buffer's worth unplaced
    from megatron.core.datasets.gpt_dataset import _build_document_index

    order = _build_document_index(numpy.arange(len(docs), dtype=numpy.int32), 1,
                                  numpy.random.RandomState(1), False)
    assert pack_best_fit(order, lengths, SEQ + 1, 16).cropped_tokens == cropped


def test_deterministic_cached_and_resumable(corpus, tmp_path):
    prefix, _ = corpus
    first = one_epoch(tmp_path / "a", prefix, num_samples=60)  # > one epoch of rows
    assert len(first) == 60
    rows = [first[i]["tokens"] for i in range(60)]
    # a resumed run builds the dataset again (cache hit) and reads from the middle
    resumed = one_epoch(tmp_path / "a", prefix, num_samples=60)
    assert resumed.document_index.__class__ is numpy.memmap
    for i in range(37, 60):
        assert torch.equal(resumed[i]["tokens"], rows[i])
    fresh = one_epoch(tmp_path / "b", prefix, num_samples=60)  # rebuilt from scratch
    assert all(torch.equal(fresh[i]["tokens"], rows[i]) for i in range(60))
    other_seed = one_epoch(tmp_path / "c", prefix, seed=2, num_samples=60)
    assert not all(torch.equal(other_seed[i]["tokens"], rows[i]) for i in range(60))


def test_blend_and_splits_through_megatrons_builder(corpus, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    prefix, _ = corpus
    other = str(tmp_path / "other")
    write_documents(other, seed=5, count=60)
    cfg = config(tmp_path, blend=([prefix, other], [0.7, 0.3]), split="80,10,10")
    train, valid, test = BlendedMegatronDatasetBuilder(
        BestFitGPTDataset, [40, 6, 6], lambda: True, cfg).build()
    for ds, n in ((train, 40), (valid, 6), (test, 6)):
        assert len(ds) >= n
        for i in range(n):
            assert int(ds[i]["tokens"][0]) == BOS
