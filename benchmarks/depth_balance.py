"""Loop work per data-parallel replica: independent depths vs ``--depth-balance global``.

For DP ∈ {8, 32, 128} and micro-batch b ∈ {1, 8}, with the paper's global batch of 256
sequences (or DP·b when larger; the rest is gradient accumulation), Poisson μ_rec = 8:

- ``sum``: max over replicas / mean of the replica's Σ T_i (the compacted loop's work; the
  step waits for the heaviest replica), averaged over steps (``worst``: the worst step);
- ``serial``: the same ratio for Σ over the replica's micro-batches of max_i T_i (sequential
  block calls, what launch overhead and masked execution follow);
- ``bound``: the smallest achievable ``sum`` ratio for the step's draws (the replica holding the
  largest depth carries at least it plus the smallest others), so a balanced figure above 1.05
  shows where balancing is impossible rather than imperfect.

The dealing's CPU time per step (``deal_ms``) is the median with its min–max over the steps
after the first (a warm-up; benchmarks/timing.py's convention).

Usage: python benchmarks/depth_balance.py [--steps N]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timing import Spread

from parcae_megatron.model import preset_config
from parcae_megatron.model.depth import DepthSampler, global_batch_depths

GLOBAL_BATCH, MU_REC, TARGET = 256, 8, 1.05


def ratios(layout: torch.Tensor) -> tuple[float, float, float]:
    """(Σ T max/mean, serial max/mean, lower bound of Σ T max/mean) of a [R, m, b] layout."""
    load = layout.sum((1, 2)).double()
    serial = layout.amax(2).sum(1).double()
    per_replica = layout.shape[1] * layout.shape[2]
    flat = layout.flatten().sort().values
    bound = max(float(load.mean()), float(flat[-1] + flat[: per_replica - 1].sum()))
    return (float(load.max() / load.mean()), float(serial.max() / serial.mean()),
            bound / float(load.mean()))


def independent_layout(cfg, step: int, dp: int, micro: int, batch: int) -> torch.Tensor:
    """What each replica's own sampler draws today (``--depth-balance independent``)."""
    rows = []
    for r in range(dp):
        sampler = DepthSampler(cfg, dp_rank=r, dp_size=dp)
        sampler.start_step(step, micro)
        rows.append(torch.stack([sampler.next(batch)[0].total for _ in range(micro)]))
    return torch.stack(rows)


def main() -> None:
    """Measure and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cfg = preset_config("parcae-tiny", mean_recurrence=MU_REC, mean_backprop_depth=4)
    results = []
    for dp in (8, 32, 128):
        for batch in (1, 8):
            total = max(GLOBAL_BATCH, dp * batch)
            micro = total // (dp * batch)
            ind, bal, deal_s = [], [], []
            for step in range(args.steps):
                ind.append(ratios(independent_layout(cfg, step, dp, micro, batch)))
                start = time.perf_counter()
                layout = global_batch_depths(cfg.depth_seed, step, MU_REC, dp, micro, batch)
                deal_s.append(time.perf_counter() - start)
                bal.append(ratios(layout))

            def summary(rows):
                return {"sum": round(sum(r[0] for r in rows) / len(rows), 4),
                        "sum_worst": round(max(r[0] for r in rows), 4),
                        "serial": round(sum(r[1] for r in rows) / len(rows), 4)}
            row = {"dp": dp, "micro_batch": batch, "microbatches_per_replica": micro,
                   "global_batch": total, "independent": summary(ind), "balanced": summary(bal),
                   "bound": round(sum(r[2] for r in bal) / len(bal), 4),
                   **Spread.of([1e3 * t for t in deal_s[1:] or deal_s]).flat("deal_ms")}
            row["balanced_meets_target"] = row["balanced"]["sum"] <= TARGET
            results.append(row)
            print(f"DP={dp:4d} b={batch} m={micro:2d}: Σ T max/mean independent "
                  f"{row['independent']['sum']:.3f} -> balanced {row['balanced']['sum']:.3f} "
                  f"(worst {row['balanced']['sum_worst']:.3f}, bound {row['bound']:.3f}); "
                  f"serial {row['independent']['serial']:.3f} -> {row['balanced']['serial']:.3f}; "
                  f"deal {row['deal_ms']:.1f} [{row['deal_ms_min']:.1f}–"
                  f"{row['deal_ms_max']:.1f}] ms", flush=True)
    print(json.dumps({"benchmark": "depth_balance", "mu_rec": MU_REC, "steps": args.steps,
                      "target_sum_ratio": TARGET, "results": results}))


if __name__ == "__main__":
    main()
