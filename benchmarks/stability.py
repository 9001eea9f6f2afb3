"""Injection stability experiment (the CPU-scale analogue of the paper's Table 2).

Trains tiny looped models on the embedded corpus with ``additive`` (ρ(Ā) = 1),
``concat_linear`` (Huginn/RDM, ρ unconstrained) and Parcae's ``diagonal`` (ρ(Ā) < 1)
injection over a range of learning rates, through the real entry point (the quickstart's
stability runs, ``parcae_megatron/stability.py``, at more rates and injections), and reports
which runs diverge (non-finite or skipped steps, or a final loss above the initial one), the
final losses and the largest loop-state norm ‖h_T‖ (measured every step). The baseline of the
comparison is Parcae's diagonal injection in the same run.

Usage: python benchmarks/stability.py [--steps 150] [--lrs 3e-3 1e-2 3e-2]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parcae_megatron import stability  # noqa: E402
from parcae_megatron.quickstart import _env, prepare_data  # noqa: E402

INJECTIONS = ("additive", "concat_linear", "diagonal")


def run(data: Path, out: Path, injection: str, lr: float, steps: int) -> dict:
    """One short training run (the quickstart's stability setting); returns its outcome."""
    telemetry = out / f"{injection}-{lr:g}.jsonl"
    telemetry.unlink(missing_ok=True)
    proc = subprocess.run(stability.command(data, telemetry, injection, lr, steps), cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    r = stability.summarize(telemetry, window=5)
    diverged = (proc.returncode != 0 or r["diverged"] or r["loss_end"] is None
                or r["loss_end"] > r["loss_start"])
    return {"injection": injection, "lr": lr, "diverged": diverged, "returncode": proc.returncode,
            "initial_loss": r["loss_start"], "final_loss": r["loss_end"],
            "skipped_steps": r["skipped_steps"], "max_state_norm": r["max_state_norm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--run-dir", default=None, help="reuse a quickstart run's data/")
    args = parser.parse_args()
    work = Path(args.run_dir or tempfile.mkdtemp(prefix="parcae-stability-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, 4096, work / "stability.log")
    results = [run(data, work, inj, lr, args.steps) for lr in args.lrs for inj in INJECTIONS]
    print(f"{'injection':>14} {'lr':>8} {'diverged':>9} {'loss start':>11} {'loss end':>9} "
          f"{'skipped':>8} {'max ‖h_T‖':>10}")
    for r in results:
        fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)
        print(f"{r['injection']:>14} {r['lr']:>8g} {str(r['diverged']):>9} "
              f"{fmt(r['initial_loss']):>11} {fmt(r['final_loss']):>9} "
              f"{str(r['skipped_steps']):>8} {fmt(r['max_state_norm']):>10}")
    base = {r["lr"]: r["final_loss"] for r in results if r["injection"] == "diagonal"}
    for r in results:
        if r["final_loss"] is not None and base.get(r["lr"]):
            r["final_loss_over_diagonal"] = r["final_loss"] / base[r["lr"]]
    print(json.dumps({"benchmark": "stability", "steps": args.steps, "runs": results}))


if __name__ == "__main__":
    main()
