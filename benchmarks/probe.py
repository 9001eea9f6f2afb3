"""Depth probe benchmark: does test-time depth buy look-up accuracy, over several seeds?

Runs ``python -m parcae_megatron.probe`` once per seed (data seed and trainer ``--seed``
both set to it) and reports, per seed and averaged, Parcae's held-out exact match on the
hardest chains (k = max_k) at T = 1, μ_rec and 2·μ_rec, the equal-parameter Transformer's,
and the ratios of the probe's targets (docs/probe.md). The baseline of every ratio is measured in
the same run (Parcae at T = 1; the Transformer).

It also prints the whole k × T table (Parcae at every T with the loop state's norm ‖h_T‖, the
Transformer) as mean ± std over the seeds, and the loops needed per k (the first T whose mean
accuracy reaches 0.8). ``--keep DIR`` keeps each seed's run directory (heatmaps, probe.json)
under DIR; with a DIR of an earlier run, finished data and checkpoints are reused.

``--extrapolation`` is the depth-extrapolation run: training chains k ≤ 3, held-out chains
k ≤ 5 (k = 4, 5 never in training) on 11-letter cycles in the unary query form, scored up to
T = 3·μ_rec; it adds, on the means, whether k = 4 reaches 0.8 at some T ≤ 3·μ_rec with T = 1
≤ 0.3 and whether the Transformer stays below Parcae's best T on every unseen k.

Usage: python benchmarks/probe.py [--seeds 0 1 2] [--quick] [--extrapolation] [--keep DIR]
[-- PROBE FLAGS...]. ``--quick`` is a smoke run (one seed, a few steps). Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Train on k ≤ 3, test k ≤ 5: k < n_symbols / 2 needs 11 letters; the unary form has no token
# for k, so a 4-hop query uses only tokens training had; 96 tokens hold the 11-entry table and
# 12 training (8 held-out) queries; 600 held-out documents give ≈ 950 chains per k.
EXTRAPOLATION_ARGS = ["--n-symbols", "11", "--max-k", "3", "--test-max-k", "5",
                      "--query-form", "unary", "--k-weights", "2,1,1", "--seq-length", "96",
                      "--train-docs", "40000", "--test-docs", "600"]
SOLVED = 0.8


def run_seed(seed: int, run_dir: Path, extra: list[str]) -> dict:
    """One probe run; returns its probe.json."""
    cmd = [sys.executable, "-m", "parcae_megatron.probe", "--run-dir", str(run_dir),
           "--seed", str(seed), "--train-args", f"--seed {seed + 1}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: probe seed {seed} failed:\n{proc.stdout[-1500:]}"
                         f"{proc.stderr[-1500:]}")
    return json.loads((run_dir / "probe.json").read_text())


def headline(summary: dict) -> dict:
    """The hardest trained chains' figures of one run."""
    k = str(summary["task"]["max_k"])
    trained = [str(j) for j in range(1, summary["task"]["max_k"] + 1)]
    out = {}
    parcae, tf = summary["models"].get("parcae"), summary["models"].get("transformer")
    if parcae:
        mu = parcae["mean_recurrence"]
        acc = parcae["accuracy"]
        for t in (1, mu, 2 * mu):
            if str(t) in acc:
                out[f"parcae_T{t}"] = acc[str(t)][k]
        out["parcae_mean_over_k_T_mu"] = sum(acc[str(mu)][j] for j in trained) / len(trained)
    if tf:
        out["transformer"] = tf["accuracy"]["0"][k]
    return out


def loops_needed(parcae: dict) -> dict[str, int | None]:
    """Per k, the first T whose (mean) accuracy reaches ``SOLVED``; None when none does."""
    return {k: next((int(t) for t, row in parcae.items() if row[k][0] >= SOLVED), None)
            for k in next(iter(parcae.values()))}


def extrapolation(table: dict, summary: dict) -> dict:
    """The extrapolation targets on the seed means: the first unseen k reaches ``SOLVED`` at
    some T ≤ 3·μ_rec while T = 1 stays ≤ 0.3, and the Transformer is below Parcae's best T
    on every unseen k."""
    task, parcae = summary["task"], table["parcae"]
    mu = summary["models"]["parcae"]["mean_recurrence"]
    unseen = [str(k) for k in task["extrapolated_k"]]
    within = [t for t in parcae if int(t) <= 3 * mu]
    first = unseen[0]
    best_t = max(within, key=lambda t: parcae[t][first][0])
    out = {"first_unseen_k": int(first), "best_T": int(best_t),
           "best": parcae[best_t][first], "T=1": parcae["1"][first],
           "first_unseen_k_solved_within_3mu": (parcae[best_t][first][0] >= SOLVED
                                                and parcae["1"][first][0] <= 0.3)}
    if "transformer" in table:
        best = {k: max(row[k][0] for row in parcae.values()) for k in unseen}
        out["parcae_best_by_unseen_k"] = best
        out["transformer_below_parcae_best_every_unseen_k"] = all(
            table["transformer"][k][0] < best[k] for k in unseen)
    return out


def seed_table(summaries: list[dict]) -> dict:
    """Mean and population std over seeds of every accuracy cell: ``{"parcae": {T: {k: [mean,
    std]}}, "transformer": {k: [mean, std]}}``."""
    def cell(values: list[float]) -> list[float]:
        return [statistics.fmean(values), statistics.pstdev(values)]

    out = {}
    first = summaries[0]["models"]
    if "parcae" in first:
        out["parcae"] = {t: {k: cell([s["models"]["parcae"]["accuracy"][t][k] for s in summaries])
                             for k in row}
                         for t, row in sorted(first["parcae"]["accuracy"].items(),
                                              key=lambda kv: int(kv[0]))}
        if "loop_state" in first["parcae"]:
            out["loop_state"] = {t: cell([s["models"]["parcae"]["loop_state"][t]["state_norm"]
                                          for s in summaries])
                                 for t in out["parcae"]}
    if "transformer" in first:
        row = first["transformer"]["accuracy"]["0"]
        out["transformer"] = {k: cell([s["models"]["transformer"]["accuracy"]["0"][k]
                                       for s in summaries]) for k in row}
    return out


def table_text(table: dict, max_k: int | None = None) -> str:
    """The seed table as text, one row per Parcae T (with ‖h_T‖ where measured) and one for
    the Transformer; k > ``max_k`` (never in training) is starred."""
    rows = [*(("parcae T=" + t, row) for t, row in table.get("parcae", {}).items()),
            *((("transformer", table["transformer"]),) if "transformer" in table else ())]
    ks = sorted(rows[0][1], key=int)
    star = lambda k: "*" if max_k is not None and int(k) > max_k else ""  # noqa: E731
    norms = table.get("loop_state", {})
    lines = ["  " + " " * 14 + "".join(f"{'k=' + k + star(k):<16}" for k in ks)
             + ("‖h_T‖" if norms else "")]
    for label, row in rows:
        t = label.removeprefix("parcae T=")
        lines.append(f"  {label:<14}" + "".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}   "
                                                for k in ks)
                     + (f"{norms[t][0]:.2f} ± {norms[t][1]:.2f}" if t in norms else ""))
    return "\n".join(lines)


def main() -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps (smoke)")
    parser.add_argument("--keep", default=None,
                        help="keep each seed's run directory under this one (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--extrapolation", action="store_true",
                        help="train on k ≤ 3, test k ≤ 5 (" + " ".join(EXTRAPOLATION_ARGS)
                             + "); probe flags after -- still win")
    parser.add_argument("probe_args", nargs=argparse.REMAINDER,
                        help="after --: flags for parcae_megatron.probe")
    args = parser.parse_args()
    extra = [a for a in args.probe_args if a != "--"]
    if args.extrapolation:
        extra = [*EXTRAPOLATION_ARGS, *extra]
    seeds = args.seeds
    if args.quick:
        seeds = seeds[:1]
        extra = ["--train-iters", "5", "--train-docs", "300", "--test-docs", "30", *extra]
    started = time.time()
    rows, summaries = [], []
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="probe-bench-")) as tmp:
        for seed in seeds:
            summary = run_seed(seed, Path(tmp) / f"seed{seed}", extra)
            summaries.append(summary)
            row = {"seed": seed, **headline(summary),
                   "train_wall_s": {m: r["train_wall_s"] for m, r in summary["models"].items()},
                   "targets": {n: t["met"] for n, t in summary.get("targets", {}).items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    mu_key = [k for k in keys if k.startswith("parcae_T") and k != "parcae_T1"]
    ratios = {}
    if "parcae_T1" in mean and mu_key:
        t_mu = sorted(mu_key, key=lambda s: int(s[8:]))[0]
        ratios["hardest_T_mu_over_T_1"] = mean[t_mu] / max(mean["parcae_T1"], 1e-9)
        if "transformer" in mean:
            ratios["hardest_parcae_T_mu_minus_transformer"] = mean[t_mu] - mean["transformer"]
    table = seed_table(summaries)
    max_k = summaries[0]["task"]["max_k"]
    print(f"held-out exact match, mean ± std over {len(rows)} seed(s)"
          + (" (* = longer than any training chain)" if summaries[0]["task"].get(
              "extrapolated_k") else "") + f":\n{table_text(table, max_k)}")
    extra_out = {}
    if "parcae" in table:
        needed = loops_needed(table["parcae"])
        extra_out["loops_needed"] = needed
        print(f"loops needed (first T with mean ≥ {SOLVED}): " + ", ".join(
            f"k={k} " + (f"T={t}" if t else f"none up to T={max(map(int, table['parcae']))}")
            for k, t in needed.items()))
        if summaries[0]["task"].get("extrapolated_k"):
            extra_out["extrapolation"] = extrapolation(table, summaries[0])
            print("extrapolation (seed means): " + json.dumps(extra_out["extrapolation"]))
    print(f"mean over {len(rows)} seed(s): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    print(json.dumps({"benchmark": "probe", "quick": args.quick, "seeds": seeds,
                      "mean": mean, "ratios": ratios, "per_seed": rows, "table": table,
                      **extra_out,
                      "wall_s": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
