"""Adaptive depth vs fixed loop count: mean iterations per token and loss.

For the quickstart model (``runs/quickstart``, converted in memory from its Megatron checkpoint)
and any HF export given with ``--hf``: the loss at fixed T = 1 … max-T and, for 3–5 exit
thresholds of one criterion, the loss and mean iterations per token under per-token early exit
(teacher-forced cached decoding, ``ParcaeForCausalLM``'s exit rule), all on the same validation
tokens and h₀ seed. Reports the best point with ≥ 30 % fewer iterations than T = μ_rec at
≤ 0.5 % higher loss, or says that none exists.

Usage: python benchmarks/adaptive_depth.py [--hf DIR ...] [--load CKPT] [--data-prefix P]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the repo root first: benchmarks/data_prep.py would otherwise shadow the data_prep package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from parcae_megatron.evaluate.adaptive import adaptive_loss, best_saving  # noqa: E402
from parcae_megatron.evaluate.runner import (  # noqa: E402
    build_windows,
    load_hf_model,
    load_megatron_model,
)
from parcae_megatron.evaluate.validation_loss import score  # noqa: E402


def bench(model, windows, criterion: str, thresholds: list[float], max_t: int, seed: int,
          batch_size: int) -> dict:
    """Fixed-T losses and the threshold sweep for one model."""
    mu = int(model.config.mean_recurrence)
    start = time.perf_counter()
    fixed = {r["T"]: r["loss"] for r in score(model, windows, list(range(1, max_t + 1)),
                                               [seed], batch_size, None, progress=False)}
    points = []
    for eps in thresholds:
        k = int(eps) if criterion == "argmax" else 2
        p = adaptive_loss(model, windows, max_t, criterion, eps, k, seed, batch_size)
        p["saving_vs_mu_rec"] = 1 - p["mean_iterations"] / mu
        p["loss_increase_vs_mu_rec"] = p["loss"] / fixed[mu] - 1
        used = [r for r, c in enumerate(p["histogram"]) if c]
        # all tokens stopping at one r is fixed T = r in disguise, not per-token adaptivity
        p["same_as_fixed_T"] = used[0] if len(used) == 1 else None
        points.append(p)
        print(f"  {criterion} ε={eps:g}: mean iterations {p['mean_iterations']:.2f} "
              f"(vs μ_rec={mu}: {100 * p['saving_vs_mu_rec']:+.1f}% fewer), loss "
              f"{p['loss']:.4f} ({100 * p['loss_increase_vs_mu_rec']:+.2f}% vs T=μ_rec)",
              flush=True)
    best = best_saving(fixed, points, mu)
    verdict = ("none: no threshold saves >= 30% of the iterations of T=mu_rec within +0.5% "
               "loss at this scale")
    if best:
        verdict = "found"
        if best["same_as_fixed_T"]:
            verdict += (f", but every token stopped at r={best['same_as_fixed_T']}: the same "
                        f"as fixed T={best['same_as_fixed_T']} (no per-token spread)")
    return {"mean_recurrence": mu, "max_T": max_t, "tokens": sum(len(w) - 1 for w in windows),
            "fixed_loss": fixed, "adaptive": points,
            "best_30pct_fewer_at_0p5pct_loss": best,
            "verdict": verdict,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    """Run the benchmark; the last printed line is the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default="runs/quickstart/checkpoints",
                   help="Megatron checkpoint of the quickstart model (skipped if absent)")
    p.add_argument("--hf", nargs="*", default=[], help="extra HF export directories")
    p.add_argument("--data-prefix", default="runs/quickstart/data/valid")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--criterion", default="residual", choices=("residual", "kl", "argmax"))
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    p.add_argument("--max-T", type=int, default=None, help="default 2·μ_rec")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    models = []
    if os.path.isdir(args.load):
        models.append(("quickstart", lambda: load_megatron_model(args.load)[0]))
    models += [(d, lambda d=d: load_hf_model(d)[0]) for d in args.hf]
    if not models:
        raise SystemExit(f"error: no model: {args.load} does not exist (run python -m "
                         f"parcae_megatron.quickstart) and no --hf given")
    windows = build_windows(args.seq_length, data_prefix=args.data_prefix,
                            max_tokens=args.max_tokens).windows
    results = {}
    for name, load in models:
        model = load().eval()
        max_t = args.max_T or 2 * int(model.config.mean_recurrence)
        print(f"{name}: fixed T = 1…{max_t}, {args.criterion} thresholds {args.thresholds}",
              flush=True)
        results[name] = bench(model, windows, args.criterion, args.thresholds, max_t,
                              args.seed, args.batch_size)
        for t, loss in results[name]["fixed_loss"].items():
            print(f"  fixed T={t}: loss {loss:.4f}")
        print(f"  {results[name]['verdict']}", flush=True)
    print(json.dumps({"benchmark": "adaptive_depth", "criterion": args.criterion,
                      "data": args.data_prefix, "models": results}))


if __name__ == "__main__":
    main()
