"""Benchmark best-fit packing at the 1.3B run's scale against the original implementation.

The 1.3B recipe packs 198364 steps x 256 rows = 50.8M rows of 2049 tokens (buffer 1000) on
rank 0 while the other ranks wait in Megatron's dataset-build barrier. Each case packs a
fraction of that row count the way ``BestFitGPTDataset`` does (endless shuffled epochs of the
split's documents, Megatron's order) from synthetic document lengths (lognormal, mean 1100
tokens, ~3.2 pieces per row; the corpus holds the case's token count, so ~1.6 epochs are
streamed). Every case runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own: it
includes the document lengths and split indices a dataset holds (~8 bytes per document), the
per-epoch shuffle, and the packing (8 bytes per part, 4 per row).

Measured in the same run: the compiled packer at each fraction; at the first fraction also the
original pure-Python implementation (tests/bestfit_reference.py, the baseline: ratio = its time
/ ours) and this package's Python fallback (for machines without a C compiler); the rows of
all three are checked identical there (sha256 of the rows). The cases run in rounds, every case
once per round in the same order (``--repeats`` rounds, no warm-up round: each case is a fresh
process and the kernel is compiled beforehand); times are medians with their min–max, the
speed-ups taken round by round (benchmarks/timing.py). Targets: the full run in <= 120 s
of one core (CPU time; wall time is reported too, and on a shared machine it is longer) and
<= 3 GB. Prints a table, then ONE JSON object on the last line.

    .venv/bin/python benchmarks/packing.py [--fractions 0.01,0.1,1] [--seed 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy  # noqa: E402
from timing import Timings, alternate  # noqa: E402

from parcae_megatron.data import packing as packing_module  # noqa: E402

RUN_ROWS = 198364 * 256
ROW_LENGTH, BUFFER, MEAN_LENGTH = 2049, 1000, 1100.0
TARGET_S, TARGET_GB = 120.0, 3.0


def rss_gb() -> float:
    """Resident set size now (GB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def ticking(stream, bar):
    """The epochs in slices of 1M ids, a bar tick per slice (the baselines are not slowed by
    progress reporting)."""
    for epoch in stream:
        for lo in range(0, len(epoch), 1 << 20):
            bar.update(min(1 << 20, len(epoch) - lo))
            yield epoch[lo:lo + (1 << 20)]


def worker(fraction: float, impl: str, seed: int) -> dict:
    """Pack ``fraction`` of the run's rows with ``impl`` in this process; the figures."""
    from tqdm import tqdm

    rows = round(RUN_ROWS * fraction)
    start = time.perf_counter()
    lengths = packing_module.synthetic_lengths(int(rows * ROW_LENGTH / MEAN_LENGTH), seed)
    indices = numpy.arange(len(lengths), dtype=numpy.int32)  # the split's documents
    prepare_s, rss_before = time.perf_counter() - start, rss_gb()
    stream = packing_module.epoch_stream(indices, seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    if impl == "compiled":
        with tqdm(total=rows, unit="row", unit_scale=True, desc=f"compiled {fraction:g}",
                  file=sys.stderr, mininterval=2) as bar:
            def progress(done: int) -> None:
                bar.update(done - bar.n)
            packing = packing_module.pack_best_fit(stream, lengths, ROW_LENGTH, BUFFER, rows,
                                                   progress=progress)
    else:
        with tqdm(unit="doc", unit_scale=True, desc=f"{impl} {fraction:g}", file=sys.stderr,
                  mininterval=2) as bar:
            if impl == "reference":  # single ids, as the original dataset fed it
                from tests.bestfit_reference import reference_pack
                ids = itertools.chain.from_iterable(ticking(stream, bar))
                packing = reference_pack(ids, lengths, ROW_LENGTH, BUFFER, rows)
            else:
                packing = packing_module._pack_python(ticking(stream, bar), lengths, ROW_LENGTH,
                                                      BUFFER, rows)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(packing.row_ptr) == rows + 1, "the stream is endless: every row is packed"
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    digest = hashlib.sha256()  # of the rows as int64, slice by slice (no copy of the packing)
    for array in (packing.row_ptr, packing.parts.reshape(-1)):
        for lo in range(0, len(array), 1 << 20):
            digest.update(numpy.asarray(array[lo:lo + (1 << 20)], numpy.int64).tobytes())
    return {"fraction": fraction, "impl": impl, "rows": rows, "documents": len(lengths),
            "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "cpu_s": round(cpu_s, 3), "rows_per_cpu_s": round(rows / max(cpu_s, 1e-3)),
            "peak_rss_gb": round(peak_gb, 3),
            "rss_before_packing_gb": round(rss_before, 3), "prepare_s": round(prepare_s, 2),
            "pieces_per_row": round(len(packing.parts) / rows, 3),
            "cropped_token_share": round(packing.cropped_tokens
                                         / (packing.cropped_tokens + rows * ROW_LENGTH), 3),
            "sha256": digest.hexdigest()[:16]}


def run_case(fraction: float, impl: str, seed: int) -> dict:
    """``worker`` in a fresh process (its own peak RSS)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", impl,
                           "--fractions", repr(fraction), "--seed", str(seed)],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {impl} case at {fraction:g} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the cases, print the table and the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0.01,0.1,1",
                        help="fractions of the 1.3B run's 50.8M rows; the first also runs "
                             "the baselines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every case")
    parser.add_argument("--worker", choices=("compiled", "reference", "python"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.worker:
        print(json.dumps(worker(fractions[0], args.worker, args.seed)))
        return
    if args.repeats < 1:
        parser.exit(2, "error: --repeats must be >= 1\n")
    packing_module.build_kernel()  # compile once, outside the timings
    compiled = [f"compiled {f:g}" for f in fractions]
    variants = {name: (lambda f=f: run_case(f, "compiled", args.seed))
                for name, f in zip(compiled, fractions)}
    variants.update({impl: (lambda impl=impl: run_case(fractions[0], impl, args.seed))
                     for impl in ("reference", "python")})
    rounds = alternate(variants, args.repeats, warmup=0)
    first = (compiled[0], "reference", "python")
    if len({r["sha256"] for name in first for r in rounds[name]}) != 1:
        sys.exit("error: the implementations packed different rows")
    wall = Timings({name: [r["seconds"] for r in rows] for name, rows in rounds.items()})
    cpu = Timings({name: [r["cpu_s"] for r in rows] for name, rows in rounds.items()})

    def summary_of(name: str) -> dict:
        """The last round's row with the wall and CPU medians and ranges, and the peak RSS
        over all rounds."""
        rows = rounds[name]
        return {**rows[-1], **wall.time(name).flat("seconds"), **cpu.time(name).flat("cpu_s"),
                "rows_per_s": round(rows[-1]["rows"] / wall.time(name).median),
                "rows_per_cpu_s": round(rows[-1]["rows"] / max(cpu.time(name).median, 1e-3)),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in rows), "repeats": args.repeats}

    cases = [summary_of(name) for name in compiled]
    baselines = [summary_of(impl) for impl in ("reference", "python")]
    print(f"{'case':>16} {'rows':>10} {'wall s [min-max]':>22} {'rows/s':>10} "
          f"{'CPU s [min-max]':>22} {'peak GB':>8} {'before GB':>9} {'pieces/row':>10}")
    for name, c in zip([*compiled, "reference", "python"], [*cases, *baselines]):
        print(f"{name:>16} {c['rows']:>10} {wall.time(name).text(fmt='.2f'):>22} "
              f"{c['rows_per_s']:>10} {cpu.time(name).text(fmt='.2f'):>22} "
              f"{c['peak_rss_gb']:>8.3f} {c['rss_before_packing_gb']:>9.3f} "
              f"{c['pieces_per_row']:>10.3f}")
    # Wall time is what a job waits; CPU time is one core's work, which is what the target
    # is about and what a shared machine cannot distort much.
    ratio = wall.ratio("reference", compiled[0])
    cpu_ratio = cpu.ratio("reference", compiled[0])
    full = [c for c in cases if c["fraction"] == 1.0]
    summary = {
        "run_rows": RUN_ROWS, "repeats": args.repeats, "cases": cases,
        "reference": baselines[0], "python_fallback": baselines[1],
        **ratio.flat("speedup_vs_reference"),
        **cpu_ratio.flat("cpu_speedup_vs_reference"),
        **wall.ratio("reference", "python").flat("python_fallback_speedup_vs_reference"),
        "identical_rows": True,
        "full_run_within_target": (full[0]["cpu_s"] <= TARGET_S
                                   and full[0]["peak_rss_gb"] <= TARGET_GB) if full else None,
        "full_run_wall_within_target": full[0]["seconds"] <= TARGET_S if full else None,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(f"compiled vs original at {fractions[0]:g}, median [min-max] over {args.repeats} "
          f"rounds: {ratio.text(fmt='.1f')}x wall, {cpu_ratio.text(fmt='.1f')}x CPU")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
