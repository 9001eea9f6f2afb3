"""`python -m parcae_megatron.quickstart`: the whole pipeline on a laptop in a few minutes.

1. assembles the embedded corpus (this Python's standard library, no download),
2. trains a SentencePiece tokenizer and preprocesses train/valid into indexed datasets,
3. trains a tiny Parcae with 2 processes (data parallel, gloo on CPU) through the real entry
   point (`parcae_megatron.train`, Megatron's loop), with checkpoints and telemetry,
4. trains the same tiny model twice more at one aggressive learning rate, with a prior looped
   injection (concat-linear, Huginn-style) and with Parcae's diagonal one (``stability.py``),
5. prints a short report with a PNG figure: the training loss, the validation loss at loop
   counts T = 1 … 2·μ_rec with the test-time law L(T) = L∞ + Z·exp(−z·T) fitted where the
   sweep determines it, and the two stability runs' losses and loop-state norms.

Everything lands in the run directory; running the command again resumes training from
its newest checkpoint (or, once finished, just reports again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data_prep.tokenizer import megatron_tokenizer_args
from parcae_megatron import cli, stability
from parcae_megatron.scaling.fit import fit_test_time_curve
from parcae_megatron.scaling.plots import draw_test_time_fit, test_time_fit_label
from parcae_megatron.training.telemetry import read_records

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path, what: str) -> None:
    print(f"==> {what}", flush=True)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env=_env())
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}); see {log}\n{tail}")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def prepare_data(run_dir: Path, vocab_size: int, log: Path) -> Path:
    """Corpus → tokenizer → indexed datasets; returns the data directory. Idempotent."""
    data = run_dir / "data"
    py = sys.executable
    if not (data / "train.jsonl").exists():
        _run([py, "-m", "data_prep.corpus", "--out-dir", str(data)], log,
             "assembling the embedded corpus (Python standard library)")
    if not (data / "tokenizer.model").exists():
        _run([py, "-m", "data_prep.train_tokenizer", str(data / "train.jsonl"), "--output",
              str(data / "tokenizer"), "--vocab-size", str(vocab_size)], log,
             f"training a SentencePiece tokenizer (vocab {vocab_size})")
    for split in ("train", "valid"):
        if not (data / f"{split}.idx").exists():
            _run([py, "-m", "data_prep.preprocess", str(data / f"{split}.jsonl"),
                  "--tokenizer", str(data / "tokenizer.model"), "--output", str(data / split),
                  "--quiet"], log, f"preprocessing the {split} split")
    return data


def train_command(run_dir: Path, data: Path, iters: int, nproc: int) -> list[str]:
    """torchrun command for the tiny Parcae run."""
    ckpt = run_dir / "checkpoints"
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "parcae_megatron.train",
        "--config", str(ROOT / "configs" / "parcae-tiny-cpu.yaml"),
        *megatron_tokenizer_args(data / "tokenizer.model"),
        "--train-data-path", "1.0", str(data / "train"),
        "--valid-data-path", "1.0", str(data / "valid"),
        "--seq-length", "128", "--max-position-embeddings", "128",
        "--micro-batch-size", "8", "--global-batch-size", "16",
        "--train-iters", str(iters), "--lr-wsd-decay-iters", str(iters // 2),
        # one evaluation, Megatron's at the end of training
        "--eval-interval", str(iters + 1), "--eval-iters", "8",
        "--eval-loop-counts", *map(str, range(1, 9)),
        "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(max(1, iters // 4)),
        "--log-interval", "10", "--telemetry-interval", "10",
        "--tensorboard-dir", str(run_dir / "tensorboard"),
        "--telemetry-path", str(run_dir / "telemetry.jsonl"),
    ]


def train(run_dir: Path, data: Path, iters: int, nproc: int, log: Path) -> None:
    """Run the trainer, showing a progress bar fed by its telemetry."""
    from tqdm import tqdm

    telemetry = run_dir / "telemetry.jsonl"
    done = {r["iteration"] for r in read_records(telemetry, "train")}
    if len(done) >= iters and read_records(telemetry, "validation"):
        print("==> training already finished; reporting", flush=True)
        return
    print(f"==> training a tiny Parcae on CPU with {nproc} processes (data parallel, gloo); "
          f"log: {log}", flush=True)
    with log.open("a") as out:
        proc = subprocess.Popen(train_command(run_dir, data, iters, nproc), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=_env())
        with tqdm(total=iters, unit="step", dynamic_ncols=True, mininterval=1.0,
                  desc="starting") as bar:
            while proc.poll() is None:
                time.sleep(1.0)
                steps = read_records(telemetry, "train")
                if steps:
                    last = steps[-1]
                    if bar.n != last["iteration"]:
                        bar.set_description("training" if last["iteration"] < iters
                                            else "evaluating T=1..8, saving")
                    bar.n = last["iteration"]
                    bar.set_postfix(loss=f"{last['loss']:.3f}",
                                    tok_s=f"{last.get('tokens_per_s') or 0:.0f}",
                                    depth=f"{last.get('depth_mean', 0):.1f}")
                    bar.refresh()
    if proc.returncode != 0:
        raise SystemExit(f"error: training failed (exit {proc.returncode}); see {log}\n"
                         f"{log.read_text()[-3000:]}")


def report(run_dir: Path, stable: dict | None = None) -> dict:
    """Print loss start/end, the test-time table and fit and the stability comparison; write
    report.png and report.json."""
    telemetry = run_dir / "telemetry.jsonl"
    steps = {r["iteration"]: r for r in read_records(telemetry, "train")}
    ordered = [steps[i] for i in sorted(steps)]
    validation = read_records(telemetry, "validation")[-1]
    by_t = sorted((int(k.split("=")[1]), v) for k, v in validation.items()
                  if k.startswith("lm_loss_T="))
    window = max(1, min(10, len(ordered) // 5))
    start = sum(r["loss"] for r in ordered[:window]) / window
    end = sum(r["loss"] for r in ordered[-window:]) / window
    speeds = [r["tokens_per_s"] for r in ordered if r.get("tokens_per_s")]
    fit = fit_test_time_curve([t for t, _ in by_t], [v for _, v in by_t])
    summary = {"steps": len(ordered), "loss_start": start, "loss_end": end,
               "tokens_per_s_median": sorted(speeds)[len(speeds) // 2] if speeds else None,
               "validation_loss_by_T": dict(by_t), "test_time_fit": fit,
               "stability": stable, "run_dir": str(run_dir)}
    print("\nParcae quickstart report")
    print(f"  training loss  {start:.3f} → {end:.3f} over {len(ordered)} steps "
          f"(mean of first/last {window})")
    if summary["tokens_per_s_median"]:
        print(f"  throughput     {summary['tokens_per_s_median']:.0f} tokens/s (median)")
    print("  validation loss by loop count T (test-time depth; the gain is small at this "
          "scale):")
    print("     T   loss     ppl")
    for t, loss in by_t:
        print(f"    {t:2d}  {loss:.4f}  {2.718281828 ** loss:8.2f}")
    print(f"  test-time law  {test_time_fit_label(fit)}")
    if stable:
        print("\n".join(stability.report_lines(stable)))
    _plot(run_dir / "report.png", ordered, by_t, fit, stable)
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"  plot           {run_dir / 'report.png'}")
    print(f"  run directory  {run_dir}  (checkpoints/, telemetry.jsonl, stability/, "
          "tensorboard/)")
    print(f"  resume/extend  python -m parcae_megatron.quickstart --run-dir {run_dir} "
          "--train-iters N")
    return summary


def _plot(path: Path, steps: list[dict], by_t: list[tuple[int, float]], fit: dict,
          stable: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if stable else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    left, right = axes[0]
    left.plot([r["iteration"] for r in steps], [r["loss"] for r in steps], lw=1)
    left.set(xlabel="step", ylabel="training loss", title="Training loss (Parcae, Muon)")
    left.grid(alpha=0.3)
    t = [t for t, _ in by_t]
    right.plot(t, [v for _, v in by_t], marker="o", ls="", label="validation loss")
    draw_test_time_fit(right, fit, min(t), max(t))
    right.set(xlabel="loop iterations T", ylabel="validation loss",
              title="Test-time depth (small at this scale)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    if stable:
        stability.plot(axes[1][0], axes[1][1], stable)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(prog="python -m parcae_megatron.quickstart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/quickstart", help="where everything goes")
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--stability-steps", type=int, default=stability.DEFAULT_STEPS,
                        help="steps of each stability run (0 skips the comparison)")
    parser.add_argument("--stability-lr", type=float, default=stability.DEFAULT_LR,
                        help="the aggressive learning rate of the stability runs")
    args = parser.parse_args(argv)
    if args.stability_lr <= 0 or args.stability_steps < 0:
        parser.error("--stability-lr must be positive and --stability-steps at least 0")
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "quickstart.log"
    started = time.time()
    data = prepare_data(run_dir, args.vocab_size, log)
    train(run_dir, data, args.train_iters, args.nproc, log)
    stable = (stability.run(run_dir, data, log, _env(), args.stability_lr, args.stability_steps)
              if args.stability_steps > 0 else None)
    report(run_dir, stable)
    print(f"  total time     {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
