"""Depth probe benchmark: does test-time depth buy look-up accuracy, over several seeds?

Runs ``python -m parcae_megatron.probe`` once per seed (data seed and trainer ``--seed``
both set to it) and reports, per seed and averaged, Parcae's held-out exact match on the
hardest chains (k = max_k) at T = 1, μ_rec and 2·μ_rec, the equal-parameter Transformer's,
and the ratios of the probe's targets (docs/probe.md). The baseline of every ratio is measured in
the same run (Parcae at T = 1; the Transformer).

It also prints the whole k × T table (Parcae at every T, the Transformer) as mean ± std over
the seeds. ``--keep DIR`` keeps each seed's run directory (heatmaps, probe.json) under DIR.

Usage: python benchmarks/probe.py [--seeds 0 1 2] [--quick] [--keep DIR] [-- PROBE FLAGS...]
``--quick`` is a smoke run (one seed, a few steps). Last line: one JSON object.
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
    """The hardest-chain figures of one run."""
    k = str(summary["task"]["max_k"])
    out = {}
    parcae, tf = summary["models"].get("parcae"), summary["models"].get("transformer")
    if parcae:
        mu = parcae["mean_recurrence"]
        acc = parcae["accuracy"]
        for t in (1, mu, 2 * mu):
            if str(t) in acc:
                out[f"parcae_T{t}"] = acc[str(t)][k]
        out["parcae_mean_over_k_T_mu"] = sum(acc[str(mu)].values()) / len(acc[str(mu)])
    if tf:
        out["transformer"] = tf["accuracy"]["0"][k]
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
    if "transformer" in first:
        row = first["transformer"]["accuracy"]["0"]
        out["transformer"] = {k: cell([s["models"]["transformer"]["accuracy"]["0"][k]
                                       for s in summaries]) for k in row}
    return out


def table_text(table: dict) -> str:
    """The seed table as text, one row per Parcae T and one for the Transformer."""
    rows = [*(("parcae T=" + t, row) for t, row in table.get("parcae", {}).items()),
            *((("transformer", table["transformer"]),) if "transformer" in table else ())]
    ks = sorted(rows[0][1], key=int)
    lines = ["  " + " " * 14 + "".join(f"k={k:<14}" for k in ks)]
    for label, row in rows:
        lines.append(f"  {label:<14}" + "".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}   "
                                                for k in ks))
    return "\n".join(lines)


def main() -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps (smoke)")
    parser.add_argument("--keep", default=None,
                        help="keep each seed's run directory under this one (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("probe_args", nargs=argparse.REMAINDER,
                        help="after --: flags for parcae_megatron.probe")
    args = parser.parse_args()
    extra = [a for a in args.probe_args if a != "--"]
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
    print(f"held-out exact match, mean ± std over {len(rows)} seed(s):\n{table_text(table)}")
    print(f"mean over {len(rows)} seed(s): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    print(json.dumps({"benchmark": "probe", "quick": args.quick, "seeds": seeds,
                      "mean": mean, "ratios": ratios, "per_seed": rows, "table": table,
                      "wall_s": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
