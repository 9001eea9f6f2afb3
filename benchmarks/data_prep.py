"""Benchmark data_prep.preprocess against a naive loop on the embedded corpus.

Measures, in one process and on the same data and tokenizer (SentencePiece BPE trained on
the corpus, vocab 32768 by default):

* naive: one process reads the jsonl, tokenizes one document at a time and calls
  ``IndexedDatasetBuilder.add_document`` (what a first script usually does);
* ``data_prep.preprocess`` with 1 and 2 workers (whole call: planning, pool start, merge,
  hashing, atomic publish);
* both tokenizer kinds side by side (``sentencepiece`` and the paper's ``hf-bpe``, same
  vocabulary and sample): compression in bytes of text per token, and ``preprocess`` tokens/s
  with 1 worker (``kinds`` in the JSON).

The three run interleaved (naive, 1 worker, 2 workers, naive, …) for one warm-up round and
``--repeats`` timed rounds; each figure is the median with its min–max, ratios taken round by
round (benchmarks/timing.py); torch/megatron-core are imported before timing. The 1-minute
load average before and after is reported: on a busy machine the figures, the 2-worker
scaling above all, say more about the other processes than about this code.
It checks that all outputs are byte-identical, prints a table, then ONE JSON object on the last
line.

    .venv/bin/python benchmarks/data_prep.py [--mb 4] [--vocab 32768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import interleave  # noqa: E402

from data_prep import indexed  # noqa: E402
from data_prep.corpus import build_default_corpus  # noqa: E402
from data_prep.parallel import default_workers  # noqa: E402
from data_prep.preprocess import Options, preprocess  # noqa: E402
from data_prep.tokenizer import load_tokenizer  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402


def naive(corpus: str, model: str, prefix: str) -> tuple[float, int]:
    """Read, tokenize one document at a time, add_document; return (seconds, tokens)."""
    t0 = time.perf_counter()
    tok = load_tokenizer(model)
    dtype = indexed.token_dtype(tok.vocab_size)
    builder = indexed.builder(prefix + ".bin", dtype)
    tokens = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = [tok.bos, *tok.tokenize(json.loads(line)["text"]), tok.eos]
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return time.perf_counter() - t0, tokens


def ours(corpus: str, model: str, prefix: str, workers: int) -> tuple[float, int]:
    """data_prep.preprocess with ``workers`` processes; return (seconds, tokens)."""
    t0 = time.perf_counter()
    manifest = preprocess(Options(inputs=[corpus], output=prefix, tokenizer=model,
                                  workers=workers, overwrite=True, progress=False))
    return time.perf_counter() - t0, manifest["tokens"]


def compare_kinds(corpus: str, tmp: str, vocab: int, repeats: int) -> dict:
    """Per tokenizer kind: bytes of text per token (BOS/EOS not counted) and 1-worker
    ``preprocess`` tokens/s (median [min–max] of ``repeats`` rounds, the two kinds alternated),
    on the same corpus and vocabulary; ``hf_bpe_over_sentencepiece_time`` is per round."""
    paths, tokens = {}, {}
    for kind in ("sentencepiece", "hf-bpe"):
        prefix = os.path.join(tmp, f"kind-{kind}")
        train_tokenizer([corpus], prefix, vocab_size=vocab, kind=kind)
        paths[kind] = (prefix + ".model" if kind == "sentencepiece" else prefix, prefix)

    def run(kind: str):
        def call() -> None:
            path, prefix = paths[kind]
            tokens[kind] = ours(corpus, path, prefix + "-data", 1)[1]
        return call

    timings = interleave({kind: run(kind) for kind in paths}, repeats)
    out: dict = {}
    for kind, (_, prefix) in paths.items():
        manifest = json.load(open(prefix + "-data.manifest.json"))
        text_tokens = tokens[kind] - 2 * manifest["documents"]  # BOS and EOS per document
        spread = timings.time(kind)
        out[kind] = {"bytes_per_token": round(manifest["text_bytes"] / text_tokens, 4),
                     "tokens": tokens[kind], "w1_tokens_per_s": round(tokens[kind] / spread.median),
                     "w1_tokens_per_s_min": round(tokens[kind] / spread.max),
                     "w1_tokens_per_s_max": round(tokens[kind] / spread.min)}
    out.update(timings.ratio("hf-bpe", "sentencepiece").flat("hf_bpe_over_sentencepiece_time"))
    return out


def same_files(a: str, b: str) -> bool:
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in (".bin", ".idx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.0,
                        help="MB of standard-library source in the corpus (default 4)")
    parser.add_argument("--vocab", type=int, default=32768, help="tokenizer vocabulary")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds per figure (median and min-max reported)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    load_before = os.getloadavg()[0]
    indexed.megatron_indexed()  # import cost is not part of any figure
    indexed.freeze_gc()
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp:
        corpus = os.path.join(tmp, "train.jsonl")
        info = build_default_corpus(corpus, max_bytes=int(args.mb * 1e6))
        tok_info = train_tokenizer([corpus], os.path.join(tmp, "tok"), vocab_size=args.vocab)
        model = os.path.join(tmp, "tok.model")
        tokens = {}

        def run(name: str, fn, *extra):
            def call() -> None:
                tokens[name] = fn(corpus, model, os.path.join(tmp, name), *extra)[1]
            return call

        timings = interleave({"naive": run("naive", naive), "w1": run("w1", ours, 1),
                              "w2": run("w2", ours, 2)}, args.repeats)
        identical = (same_files(os.path.join(tmp, "naive"), os.path.join(tmp, "w1"))
                     and same_files(os.path.join(tmp, "w1"), os.path.join(tmp, "w2")))
        kinds = compare_kinds(corpus, tmp, args.vocab, args.repeats)
    assert len(set(tokens.values())) == 1, tokens
    n = tokens["naive"]
    rate = {k: n / timings.time(k).median for k in timings.samples}
    # tokens/s ratios are inverse time ratios, taken round by round
    w2_over_w1, w1_over_naive, w2_over_naive = (timings.ratio(slow, fast) for slow, fast in
                                                (("w1", "w2"), ("naive", "w1"), ("naive", "w2")))
    result = {
        "benchmark": "data_prep.preprocess",
        "corpus": "python stdlib (embedded)",
        "corpus_bytes": info["bytes"],
        "documents": info["documents"],
        "tokens": n,
        "vocab_size": tok_info["vocab_size"],
        "cpu_cores": default_workers(),
        "naive_tokens_per_s": round(rate["naive"]),
        "w1_tokens_per_s": round(rate["w1"]),
        "w2_tokens_per_s": round(rate["w2"]),
        "w1_tokens_per_s_per_worker": round(rate["w1"]),
        "w2_tokens_per_s_per_worker": round(rate["w2"] / 2),
        **timings.flat({"naive": "naive_s", "w1": "w1_s", "w2": "w2_s"}),
        **w2_over_w1.flat("scaling_w2_over_w1"),
        **w1_over_naive.flat("speedup_w1_over_naive"),
        **w2_over_naive.flat("speedup_w2_over_naive"),
        "identical_output": identical,
        "kinds": kinds,
        # Other processes on the machine skew the figures (scaling above all): check these.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(f"corpus: {info['documents']} documents, {info['bytes'] / 1e6:.1f} MB, {n:,} tokens "
          f"(vocab {tok_info['vocab_size']}), {default_workers()} cores; medians [min–max] over "
          f"{args.repeats} interleaved rounds")
    for key, label in (("naive", "naive loop"), ("w1", "preprocess, 1 worker"),
                       ("w2", "preprocess, 2 workers")):
        print(f"  {label:<24} {rate[key]:>12,.0f} tokens/s   {timings.time(key).text()} s")
    print(f"  scaling 2 vs 1 worker: {w2_over_w1.text(fmt='.2f')}x; vs naive: "
          f"{w1_over_naive.text(fmt='.2f')}x (1 worker), "
          f"{w2_over_naive.text(fmt='.2f')}x (2 workers); identical output: {identical}")
    for kind, k in ((n, v) for n, v in kinds.items() if isinstance(v, dict)):
        print(f"  {kind:<14} {k['bytes_per_token']:.3f} bytes/token   preprocess, 1 worker "
              f"{k['w1_tokens_per_s']:>12,.0f} tokens/s")
    print(json.dumps(result))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
