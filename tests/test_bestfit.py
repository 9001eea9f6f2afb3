"""BOS-aligned best-fit packing (docs/design.md §6.3) as a Megatron dataset over indexed datasets,
and the compiled packer against the original Python algorithm."""

from __future__ import annotations

import time

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae_megatron.data import packing as packing_module
from parcae_megatron.data.bestfit import (
    BestFitDatasetConfig,
    BestFitGPTDataset,
    Packing,
    pack_best_fit,
)
from parcae_megatron.data.packing import _pack_python, kernel_available
from tests.bestfit_reference import reference_pack

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C compiler for the packer")


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
    assert resumed.document_index.dtype == resumed.sample_index.dtype == numpy.int32
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


def same(a: Packing, b: Packing) -> bool:
    return (a.row_ptr.tolist() == b.row_ptr.tolist() and a.parts.tolist() == b.parts.tolist()
            and a.cropped_tokens == b.cropped_tokens)


@st.composite
def packing_inputs(draw):
    """Small streams (ids may repeat, lengths 0..3 rows), rows of 1..64, buffers of 1..12."""
    row = draw(st.integers(1, 64))
    lengths = draw(st.lists(st.integers(0, 3 * row), min_size=1, max_size=40))
    stream = draw(st.lists(st.integers(0, len(lengths) - 1), max_size=300))
    return (stream, lengths, row, draw(st.integers(1, 12)),
            draw(st.none() | st.integers(0, 80)), draw(st.integers(1, 50)))


@needs_kernel
@settings(max_examples=400, deadline=None)
@given(packing_inputs())
def test_compiled_packer_matches_the_reference(case):
    stream, lengths, row, buffer, max_rows, chunk = case
    expect = reference_pack(stream, lengths, row, buffer, max_rows)
    # the stream as one array, and as the chunks an endless epoch stream arrives in
    assert same(pack_best_fit(numpy.asarray(stream), lengths, row, buffer, max_rows), expect)
    chunks = (numpy.asarray(stream[i:i + chunk]) for i in range(0, len(stream), chunk))
    got = pack_best_fit(chunks, numpy.asarray(lengths), row, buffer, max_rows)
    assert same(got, expect) and got.parts.dtype == numpy.int32


@settings(max_examples=150, deadline=None)
@given(packing_inputs())
def test_python_fallback_matches_the_reference(case):
    stream, lengths, row, buffer, max_rows, _ = case
    expect = reference_pack(stream, lengths, row, buffer, max_rows)
    assert same(_pack_python(stream, numpy.asarray(lengths), row, buffer, max_rows), expect)


@needs_kernel
def test_row_pointers_widen_past_int32(monkeypatch):
    lengths = numpy.arange(1, 60)
    stream = numpy.random.default_rng(0).integers(0, len(lengths), 2000)
    expect = reference_pack(stream.tolist(), lengths.tolist(), 50, 8, 300)
    monkeypatch.setattr(packing_module, "INT32_LIMIT", 100)  # as if 2**31 parts were near
    got = pack_best_fit(stream, lengths, 50, 8, 300)
    assert got.row_ptr.dtype == numpy.int64 and same(got, expect)


@needs_kernel
def test_output_grows_past_its_first_allocation(monkeypatch):
    monkeypatch.setattr(packing_module, "PART_SLACK", 0)  # rows of ~10 parts, room for 4
    lengths = numpy.random.default_rng(1).integers(1, 8, 500)
    stream = numpy.random.default_rng(2).integers(0, len(lengths), 5000)
    for max_rows in (None, 200):
        expect = reference_pack(stream.tolist(), lengths.tolist(), 40, 6, max_rows)
        assert len(expect.parts) > 4 * (len(expect.row_ptr) - 1)
        assert same(pack_best_fit(stream, lengths, 40, 6, max_rows), expect)


@needs_kernel
def test_a_document_id_outside_the_lengths_is_refused():
    with pytest.raises(IndexError, match=r"document ids must be in \[0, 3\)"):
        pack_best_fit(numpy.array([0, 3]), [5, 6, 7], 10, 2)


def test_without_a_compiler_small_runs_fall_back_and_large_runs_say_what_to_do(monkeypatch):
    def unavailable():
        raise packing_module.KernelUnavailable("no C compiler ('cc' not found; set CC)")

    monkeypatch.setattr(packing_module, "load_kernel", unavailable)
    packing = pack_best_fit([0, 1, 2, 3, 4], [5, 3, 9, 2, 7], row_length=10, buffer_size=3)
    assert packing.parts.tolist() == [[2, 9], [3, 1], [4, 7], [1, 3]]
    with pytest.raises(packing_module.KernelUnavailable,
                       match=r"50800000 rows .*python -m parcae_megatron\.data\.packing"):
        pack_best_fit(iter([]), [1], 2049, 1000, max_rows=50_800_000)


def test_epoch_order_is_megatrons_document_index():
    from megatron.core.datasets.gpt_dataset import _build_document_index

    from parcae_megatron.data.packing import _shuffled

    for n, seed in ((1, 0), (7, 3), (1000, 1234)):
        indices = numpy.arange(5, 5 + n, dtype=numpy.int32)
        ours, theirs = numpy.random.RandomState(seed), numpy.random.RandomState(seed)
        for _ in range(3):  # consecutive epochs draw from one random state
            epoch = _shuffled(indices, ours)
            assert epoch.dtype == numpy.int32
            assert epoch.tolist() == _build_document_index(indices, 1, theirs, False).tolist()


@needs_kernel
def test_one_percent_of_the_1p3b_run_packs_at_the_rate_target():
    # 1 % of 198364 x 256 rows of 2049 tokens; the target is the full run in 2 minutes.
    from parcae_megatron.data.packing import synthetic_lengths

    rows = 198364 * 256 // 100
    lengths = synthetic_lengths(rows * 2049 // 1100, seed=1)
    order = numpy.random.default_rng(1).permutation(len(lengths)).astype(numpy.int32)
    start = time.process_time()  # one core's work: a loaded CI machine cannot distort it
    packing = pack_best_fit(iter([order, order]), lengths, 2049, 1000, rows)
    rate = rows / (time.process_time() - start)
    assert len(packing.row_ptr) == rows + 1 and packing.row_ptr[-1] == len(packing.parts)
    assert 2.5 < len(packing.parts) / rows < 4  # ~3.2 pieces per row, as on a real corpus
    assert rate >= 198364 * 256 / 120, f"{rate:.0f} rows per CPU second"


def test_kernel_is_built_ahead_into_a_chosen_directory(tmp_path):
    """`python -m parcae_megatron.data.packing` (the step for compute nodes without a
    compiler) builds into $PARCAE_KERNEL_DIR; without a compiler it says so in one line."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PARCAE_KERNEL_DIR=str(tmp_path / "k"))
    cmd = [sys.executable, "-m", "parcae_megatron.data.packing"]
    if kernel_available():
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip().startswith(str(tmp_path / "k")) and os.path.isfile(out.strip())
    proc = subprocess.run(cmd, env=dict(env, PARCAE_KERNEL_DIR=str(tmp_path / "none"),
                                        CC="no-such-cc"), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: no C compiler ('no-such-cc' not found; set CC)"


def _cache_files(tmp_path, name: str) -> list:
    return sorted((tmp_path / "cache").glob(f"*-{name}"))


def test_a_broken_cache_is_rebuilt_not_loaded(corpus, tmp_path):
    """A truncated parts.npy (a writer killed mid-write, before the rename existed) or a missing
    description (a writer killed before its last rename) rebuilds the packing."""
    prefix, _ = corpus
    first = one_epoch(tmp_path, prefix, num_samples=40)
    rows = [first[i]["tokens"] for i in range(40)]
    (parts,), (description,) = _cache_files(tmp_path, "parts.npy"), \
        _cache_files(tmp_path, "description.txt")
    size = parts.stat().st_size
    parts.write_bytes(parts.read_bytes()[:size // 2])
    again = one_epoch(tmp_path, prefix, num_samples=40)
    assert all(torch.equal(again[i]["tokens"], rows[i]) for i in range(40))
    assert parts.stat().st_size == size  # rewritten whole
    description.unlink()
    again = one_epoch(tmp_path, prefix, num_samples=40)
    assert all(torch.equal(again[i]["tokens"], rows[i]) for i in range(40))
    assert description.is_file()
    # nothing but the three files: no temporary left behind
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_cache_files_are_shared_as_the_umask_allows(corpus, tmp_path):
    import os
    import stat

    prefix, _ = corpus
    old = os.umask(0o022)
    try:
        one_epoch(tmp_path, prefix, num_samples=20)
    finally:
        os.umask(old)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 3
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}


def test_a_new_packer_version_misses_the_old_cache(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    prefix, _ = corpus
    old = one_epoch(tmp_path, prefix, num_samples=20)
    assert old.config.packer_version == packing_module.PACKER_VERSION
    data = IndexedDataset(prefix)
    new = BestFitGPTDataset(data, prefix, numpy.arange(len(data), dtype=numpy.int32), 20,
                            Split.train, config(tmp_path, 1,
                                                packer_version=packing_module.PACKER_VERSION + 1))
    assert new.unique_description_hash != old.unique_description_hash
    assert len(_cache_files(tmp_path, "description.txt")) == 2  # packed again, cached apart


@needs_kernel
def test_kernel_is_loadable_by_others_and_cc_may_have_arguments(tmp_path, monkeypatch):
    """Built with ``CC`` holding a command and its arguments (``env cc``, as ``ccache gcc``
    would be); the library's mode follows the umask (0755 under 022), not mkstemp's 0600."""
    import os
    import stat

    monkeypatch.setenv("PARCAE_KERNEL_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("CC", "env cc")
    old = os.umask(0o022)
    try:
        path = packing_module.build_kernel()
    finally:
        os.umask(old)
    assert path.parent == tmp_path / "k" and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [path.name]  # no temporary
    import ctypes

    assert ctypes.CDLL(str(path)).bf_new  # it loads
    monkeypatch.setenv("CC", "no-such-launcher cc")
    monkeypatch.setenv("PARCAE_KERNEL_DIR", str(tmp_path / "other"))
    with pytest.raises(packing_module.KernelUnavailable,
                       match=r"no C compiler \('no-such-launcher' not found; set CC\)"):
        packing_module.build_kernel()
