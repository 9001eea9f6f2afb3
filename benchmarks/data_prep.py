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

Each figure is the best of ``--repeats`` runs; torch/megatron-core are imported before timing.
The 1-minute load average before and after is reported: on a busy machine the figures, the
2-worker scaling above all, say more about the other processes than about this code.
It checks that all outputs are byte-identical, prints a table, then ONE JSON object on the last
line.

    .venv/bin/python benchmarks/data_prep.py [--mb 4] [--vocab 32768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    ``preprocess`` tokens/s (best of ``repeats``), on the same corpus and vocabulary."""
    out = {}
    for kind in ("sentencepiece", "hf-bpe"):
        prefix = os.path.join(tmp, f"kind-{kind}")
        train_tokenizer([corpus], prefix, vocab_size=vocab, kind=kind)
        path = prefix + ".model" if kind == "sentencepiece" else prefix
        best, tokens = min(ours(corpus, path, prefix + "-data", 1) for _ in range(repeats))
        manifest = json.load(open(prefix + "-data.manifest.json"))
        text_tokens = tokens - 2 * manifest["documents"]  # BOS and EOS per document
        out[kind] = {"bytes_per_token": round(manifest["text_bytes"] / text_tokens, 4),
                     "tokens": tokens, "w1_tokens_per_s": round(tokens / best)}
    return out


def same_files(a: str, b: str) -> bool:
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in (".bin", ".idx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.0,
                        help="MB of standard-library source in the corpus (default 4)")
    parser.add_argument("--vocab", type=int, default=32768, help="tokenizer vocabulary")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (best kept)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    indexed.megatron_indexed()  # import cost is not part of any figure
    indexed.freeze_gc()
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp:
        corpus = os.path.join(tmp, "train.jsonl")
        info = build_default_corpus(corpus, max_bytes=int(args.mb * 1e6))
        tok_info = train_tokenizer([corpus], os.path.join(tmp, "tok"), vocab_size=args.vocab)
        model = os.path.join(tmp, "tok.model")
        runs: dict[str, list[float]] = {"naive": [], "w1": [], "w2": []}
        tokens = {}
        for _ in range(args.repeats):
            dt, tokens["naive"] = naive(corpus, model, os.path.join(tmp, "naive"))
            runs["naive"].append(dt)
            for w in (1, 2):
                dt, tokens[f"w{w}"] = ours(corpus, model, os.path.join(tmp, f"w{w}"), w)
                runs[f"w{w}"].append(dt)
        identical = (same_files(os.path.join(tmp, "naive"), os.path.join(tmp, "w1"))
                     and same_files(os.path.join(tmp, "w1"), os.path.join(tmp, "w2")))
        kinds = compare_kinds(corpus, tmp, args.vocab, args.repeats)
    assert len(set(tokens.values())) == 1, tokens
    n = tokens["naive"]
    rate = {k: n / min(v) for k, v in runs.items()}
    result = {
        "benchmark": "data_prep.preprocess",
        "corpus": "python stdlib (embedded)",
        "corpus_bytes": info["bytes"],
        "documents": info["documents"],
        "tokens": n,
        "vocab_size": tok_info["vocab_size"],
        "cpu_cores": default_workers(),
        "repeats": args.repeats,
        "naive_tokens_per_s": round(rate["naive"]),
        "w1_tokens_per_s": round(rate["w1"]),
        "w2_tokens_per_s": round(rate["w2"]),
        "w1_tokens_per_s_per_worker": round(rate["w1"]),
        "w2_tokens_per_s_per_worker": round(rate["w2"] / 2),
        "scaling_w2_over_w1": round(rate["w2"] / rate["w1"], 3),
        "speedup_w1_over_naive": round(rate["w1"] / rate["naive"], 3),
        "speedup_w2_over_naive": round(rate["w2"] / rate["naive"], 3),
        "seconds_best": {k: round(min(v), 3) for k, v in runs.items()},
        "identical_output": identical,
        "kinds": kinds,
        # Other processes on the machine skew the figures (scaling above all): check these.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(f"corpus: {info['documents']} documents, {info['bytes'] / 1e6:.1f} MB, {n:,} tokens "
          f"(vocab {tok_info['vocab_size']}), {default_workers()} cores")
    for key, label in (("naive", "naive loop"), ("w1", "preprocess, 1 worker"),
                       ("w2", "preprocess, 2 workers")):
        print(f"  {label:<24} {rate[key]:>12,.0f} tokens/s   best {min(runs[key]):.2f} s")
    print(f"  scaling 2 vs 1 worker: {result['scaling_w2_over_w1']:.2f}x; vs naive: "
          f"{result['speedup_w1_over_naive']:.2f}x (1 worker), "
          f"{result['speedup_w2_over_naive']:.2f}x (2 workers); identical output: {identical}")
    for kind, k in kinds.items():
        print(f"  {kind:<14} {k['bytes_per_token']:.3f} bytes/token   preprocess, 1 worker "
              f"{k['w1_tokens_per_s']:>12,.0f} tokens/s")
    print(json.dumps(result))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
