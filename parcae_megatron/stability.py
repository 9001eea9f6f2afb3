"""The quickstart's stability comparison (the CPU-scale analogue of the paper's Table 2).

The same tiny model is trained twice at one aggressive learning rate for the same short
budget through the real entry point (``parcae_megatron.train``, one process each, both at
once): once with a prior looped injection, ``concat_linear`` (Huginn-style, u = W[h; e], its
spectral radius unconstrained), once with Parcae's ``diagonal`` injection (ρ(Ā) < 1 by
construction). The trainer's telemetry logs the loss and the loop state's norm ‖h_T‖ every
step; ``summarize`` reduces one run to the numbers the report prints.
``benchmarks/stability.py`` sweeps more learning rates and the ``additive`` injection.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from data_prep.tokenizer import megatron_tokenizer_args
from parcae_megatron.training.telemetry import read_records

ROOT = Path(__file__).resolve().parents[1]

# What the comparison trains: the prior design first, Parcae's second.
INJECTIONS = ("concat_linear", "diagonal")
LABELS = {"concat_linear": "concat-linear (Huginn-style)",
          "diagonal": "Parcae (diagonal, ρ(Ā) < 1)", "additive": "additive"}
DEFAULT_LR = 1e-2
DEFAULT_STEPS = 150


def command(data: Path, telemetry: Path, injection: str, lr: float, steps: int,
            seed: int = 1234) -> list[str]:
    """One single-process run of the tiny CPU config with plain Adam at a constant ``lr``.

    Adam (β1 0.9) at a constant rate is the setting where looped injections are known to blow
    up; the main job's Muon recipe normalises updates and would hide the difference. The
    state norm is measured every step; a run is never stopped for skipped steps, so a blow-up
    shows in full.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            "-m", "parcae_megatron.train",
            "--config", str(ROOT / "configs" / "parcae-tiny-cpu.yaml"),
            *megatron_tokenizer_args(data / "tokenizer.model"),
            "--train-data-path", "1.0", str(data / "train"),
            "--valid-data-path", "1.0", str(data / "valid"),
            "--optimizer", "adam", "--adam-beta1", "0.9", "--lr", str(lr),
            "--lr-decay-style", "constant", "--injection-type", injection, "--seed", str(seed),
            "--train-iters", str(steps), "--eval-interval", str(steps + 1), "--eval-iters", "0",
            "--log-interval", "50", "--telemetry-interval", "1",
            "--telemetry-path", str(telemetry), "--max-consecutive-skipped", str(steps)]


def summarize(telemetry: Path, window: int = 10) -> dict:
    """Loss at the start and end (means of ``window`` steps), max and final ‖h_T‖, skipped
    steps and whether the run diverged (non-finite loss or state, or skipped steps)."""
    steps = read_records(telemetry, "train")
    losses = [r["loss"] for r in steps]
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    norms = [r.get("state_norm") for r in steps if r.get("state_norm") is not None]
    skipped = steps[-1]["skipped_total"] if steps else 0
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    nonfinite = len(finite) < len(losses) or not all(math.isfinite(x) for x in norms)
    return {"steps": len(steps), "loss_start": mean(finite[:window]),
            "loss_end": mean(finite[-window:]),
            "max_state_norm": max(norms) if norms else None,
            "final_state_norm": mean(norms[-window:]),
            "skipped_steps": skipped, "diverged": bool(nonfinite or skipped)}


def run(run_dir: Path, data: Path, log: Path, env: dict, lr: float = DEFAULT_LR,
        steps: int = DEFAULT_STEPS) -> dict:
    """Train both injections at once (one process each) unless already done; return
    ``{"lr", "steps", "optimizer", "runs": {injection: summarize(...)}, "state_norm_ratio"}``.

    A run whose telemetry is incomplete (interrupted) starts again from scratch: it is short
    and keeps no checkpoints.
    """
    from tqdm import tqdm

    out_dir = run_dir / "stability"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {inj: out_dir / f"{inj}-lr{lr:g}-{steps}steps.jsonl" for inj in INJECTIONS}
    todo = [inj for inj, p in paths.items() if len(read_records(p, "train")) < steps]
    if todo:
        print(f"==> stability: {' and '.join(LABELS[i] for i in todo)} at lr {lr:g}, "
              f"{steps} steps each, one process each; log: {log}", flush=True)
        procs = []
        with log.open("a") as out:
            for inj in todo:
                paths[inj].unlink(missing_ok=True)
                cmd = command(data, paths[inj], inj, lr, steps)
                out.write(f"\n$ {' '.join(cmd)}\n")
                out.flush()
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT, env=env))
            with tqdm(total=steps * len(todo), unit="step", dynamic_ncols=True,
                      mininterval=1.0, desc="stability runs") as bar:
                while any(p.poll() is None for p in procs):
                    time.sleep(1.0)
                    bar.n = sum(len(read_records(paths[i], "train")) for i in todo)
                    bar.refresh()
        failed = [inj for inj, p in zip(todo, procs) if p.returncode != 0]
        if failed:
            raise SystemExit(f"error: stability run {failed[0]} failed; see {log}\n"
                             f"{log.read_text()[-3000:]}")
    else:
        print("==> stability runs already finished; reporting", flush=True)
    runs = {inj: summarize(p) for inj, p in paths.items()}
    prior, parcae = (runs[i]["max_state_norm"] for i in INJECTIONS)
    ratio = prior / parcae if prior and parcae and math.isfinite(prior) else None
    return {"lr": lr, "steps": steps, "optimizer": "Adam (beta1 0.9), constant LR",
            "runs": runs, "state_norm_ratio": ratio,
            "telemetry": {inj: str(p) for inj, p in paths.items()}}


def report_lines(result: dict) -> list[str]:
    """The printed lines: the setting, one line per injection, the ratio of the state norms."""
    lines = [f"  stability      the same tiny model at lr {result['lr']:g}, "
             f"{result['steps']} steps each, {result['optimizer']}:"]
    for inj, r in result["runs"].items():
        fmt = lambda x: f"{x:.3f}" if x is not None else "n/a"
        norm = f"{r['max_state_norm']:.3g}" if r["max_state_norm"] is not None else "n/a"
        flag = "  (diverged: non-finite or skipped steps)" if r["diverged"] else ""
        lines.append(f"    {LABELS[inj]:<29} max loop-state norm ‖h_T‖ {norm:>9}   "
                     f"loss {fmt(r['loss_start'])} → {fmt(r['loss_end'])}{flag}")
    if result["state_norm_ratio"]:
        lines.append(f"    → the prior design's loop state grows {result['state_norm_ratio']:.2g}× "
                     "larger than Parcae's")
    return lines


def plot(loss_ax, norm_ax, result: dict) -> None:
    """Loss curves on ``loss_ax`` and ‖h_T‖ per step (log scale) on ``norm_ax``."""
    for inj, path in result["telemetry"].items():
        steps = read_records(Path(path), "train")
        it = [r["iteration"] for r in steps]
        color = "C3" if inj == "concat_linear" else "C0"
        loss_ax.plot(it, [r["loss"] if r["loss"] is not None else math.nan for r in steps],
                     lw=1, color=color, label=LABELS[inj])
        norms = [(r["iteration"], r["state_norm"]) for r in steps
                 if r.get("state_norm") is not None and math.isfinite(r["state_norm"])]
        norm_ax.plot([x for x, _ in norms], [y for _, y in norms], lw=1, color=color,
                     label=LABELS[inj])
    title = f"Stability at lr {result['lr']:g} (Adam)"
    loss_ax.set(xlabel="step", ylabel="training loss", title=f"{title}: training loss")
    norm_ax.set(xlabel="step", ylabel="loop state norm ‖h_T‖", yscale="log",
                title=f"{title}: loop state")
    for ax in (loss_ax, norm_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
