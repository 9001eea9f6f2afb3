"""Per-step telemetry of a Parcae run: one sink, three destinations.

Every record goes to ``telemetry.jsonl`` and, as scalars, to Megatron's TensorBoard writer and
Megatron's W&B writer (``--wandb-project``; the run's own metrics reach both through
Megatron's ``training_log``), so TensorBoard, W&B and the file show the same numbers.

Hooked into Megatron's own ``training_log`` and ``evaluate`` (called on every rank; patched in
``training/megatron_patches.py``), so the numbers Megatron prints (loss, LR, grad norm,
skipped steps) come with Parcae's: sampled and executed loop depths, executed FLOPs and MFU,
and every ``--telemetry-interval`` steps the stability signals of docs/design.md §11 (‖h_T‖,
‖h_T − h_{T−1}‖ and their ratio, Ā and Δ ranges, spectral norms of B̄ and C). Loop
statistics live on the pipeline stage that runs the loop; they are reduced over the world so
the last rank (which owns the loss) can write them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parcae_megatron.model.accounting import (
    count_parameters_from_config,
    effective_params,
    flops_per_token,
    paper_flops_per_token,
    token_embedding_params,
)
from parcae_megatron.training.guards import ConsecutiveSkips, NonFiniteGuard
from parcae_megatron.training.straggler import STRAGGLER, describe

# Peak dense bf16 FLOP/s per accelerator, for MFU (CPU runs report none).
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "GB200": 2500e12}

_PREFIX = {"train": "parcae/", "validation": "parcae-validation/",
           "straggler": "parcae-straggler/", "core": "parcae-core/",
           "samples": "parcae-samples/"}
_SUM_FIELDS = ("sequences", "sampled_iterations", "executed_iterations", "grad_iterations",
               "state_norm", "residual_norm", "state_samples")
_STABILITY_FIELDS = ("decay_min", "decay_mean", "decay_max", "delta_min", "delta_mean",
                     "delta_max", "bbar_spectral_norm", "c_spectral_norm", "present")


class Telemetry:
    """Collects, reduces and writes telemetry; one instance per process."""

    def __init__(self) -> None:
        self.model = None
        self.path: Path | None = None
        self.interval = 10
        self.skipped_total = 0
        self.last_time: float | None = None
        self.last_iteration = 0
        self.nominal = None  # (fixed FLOPs/token, per-iteration loop FLOPs: grad, no-grad)
        self.skips = ConsecutiveSkips(0)
        self.guard: NonFiniteGuard | None = None  # set when the optimizer is built
        self.local_loop = (0, 0, 0)  # this rank's sequences, executed and grad iterations

    # ------------------------------------------------------------------ setup
    def register_model(self, model) -> None:
        """Remember this rank's (unwrapped) ParcaeModel."""
        self.model = model

    def configure(self, args) -> None:
        """Read paths and intervals from the Megatron args."""
        self.interval = max(1, args.telemetry_interval)
        target = args.telemetry_path or (os.path.join(args.save, "telemetry.jsonl")
                                         if args.save else None)
        self.path = Path(target) if target else None
        self.peak_flops = _peak_flops()
        self.skips = ConsecutiveSkips(args.max_consecutive_skipped)
        STRAGGLER.configure(args)

    def record_state_now(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` measures loop-state norms."""
        return iteration % self.interval == 0

    # ------------------------------------------------------------------ hooks
    def on_training_log(self, args, loss_dict: dict, learning_rate, iteration: int,
                        skipped_iter: int, grad_norm) -> None:
        """Called on every rank after each training iteration."""
        now = time.perf_counter()
        elapsed = None if self.last_time is None else now - self.last_time
        self.last_time, self.last_iteration = now, iteration
        self.skipped_total += int(skipped_iter)
        loops = self._reduce_loop_stats()
        stability = self._reduce_stability() if self.record_state_now(iteration) else None
        # Identical on every rank (the guard's decision and culprit are the job's).
        culprit = self.guard.culprit if skipped_iter and self.guard is not None else None
        if self.model is not None:
            STRAGGLER.on_step(iteration, elapsed, self.local_loop, _dp_rank(),
                              self.executed_flops_per_token, args.seq_length,
                              self._write_straggler)
        if not _is_last_rank():
            self.skips.update(bool(skipped_iter), iteration, culprit)
            return
        tokens = args.global_batch_size * args.seq_length
        record: dict[str, Any] = {
            "type": "train", "iteration": iteration,
            "loss": _scalar(loss_dict.get("lm loss")),
            "lr": _scalar(learning_rate), "grad_norm": _scalar(grad_norm),
            "skipped": int(skipped_iter), "skipped_total": self.skipped_total,
            "tokens": tokens, "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed else None,
        }
        if loops is not None and loops["sequences"] > 0:
            seqs = loops["sequences"]
            record.update({
                "depth_mean": loops["sampled_iterations"] / seqs,
                "depth_max": loops["max_depth"],
                "grad_depth_mean": loops["grad_iterations"] / seqs,
                "executed_iterations": loops["executed_iterations"],
                "executed_over_sampled": loops["executed_iterations"]
                / max(1.0, loops["sampled_iterations"]),
            })
            flops = self.executed_flops_per_token(record["depth_mean"],
                                                  record["grad_depth_mean"]) * tokens
            record["executed_flops"] = flops
            if elapsed and self.peak_flops:
                world = dist.get_world_size() if dist.is_initialized() else 1
                record["mfu"] = flops / elapsed / (self.peak_flops * world)
            if loops["state_samples"]:
                n = loops["state_samples"]
                record["state_norm"] = loops["state_norm"] / n
                record["residual_norm"] = loops["residual_norm"] / n
                record["residual_ratio"] = record["residual_norm"] / max(record["state_norm"],
                                                                         1e-12)
        if skipped_iter:
            record["first_non_finite"] = culprit
        if stability is not None:
            record.update(stability)
        self._write(record, iteration)
        self.skips.update(bool(skipped_iter), iteration, culprit)

    def on_evaluate(self, results: dict, iteration: int) -> None:
        """Called on every rank with Megatron's averaged validation losses."""
        if not _is_last_rank():
            return
        from megatron.training import get_args

        args = get_args()
        record = {"type": "validation", "iteration": iteration,
                  # what the scaling-law fits need to place this run
                  "tokens_seen": iteration * args.global_batch_size * args.seq_length,
                  "mean_recurrence": args.mean_recurrence,
                  "mean_backprop_depth": args.mean_backprop_depth}
        if self.model is not None:
            counts = count_parameters_from_config(self.model.config)
            record["flops_per_token"] = flops_per_token(self.model.config, counts)
            record["paper_flops_per_token"] = paper_flops_per_token(self.model.config, counts)
            record["effective_params"] = effective_params(self.model.config, counts)
        for key, value in results.items():
            record[key.replace(" ", "_")] = _scalar(value)
        self._write(record, iteration)

    # ------------------------------------------------------------------ internals
    def executed_flops_per_token(self, depth_mean: float, grad_depth_mean: float) -> float:
        """docs/design.md §8.1's formula with the realised mean depths instead of μ_rec / μ_bwd."""
        cfg = self.model.config
        if self.nominal is None:
            counts = count_parameters_from_config(cfg)
            attn = 4 * cfg.hidden_size * cfg.seq_length
            n_rec = counts["recurrent_params"]
            n_nc = counts["total_params"] - token_embedding_params(cfg) - n_rec
            base = 6 * n_nc + 3 * attn * (cfg.num_prelude_layers + cfg.num_coda_layers)
            per_iter = 2 * n_rec + attn * cfg.num_recurrent_layers
            per_grad = 4 * n_rec + 2 * attn * cfg.num_recurrent_layers
            self.nominal = (base, per_iter, per_grad)
        base, per_iter, per_grad = self.nominal
        return float(base + per_iter * depth_mean + per_grad * grad_depth_mean)

    def _reduce_loop_stats(self) -> dict | None:
        model = self.model
        owner = model is not None and model.has_loop and _tp_rank() == 0
        stats = model.pop_loop_stats() if model is not None else None
        sums = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64)
        peak = torch.zeros(1, dtype=torch.float64)
        if owner:
            sums = torch.tensor([stats.sequences, stats.sampled_iterations,
                                 stats.executed_iterations, stats.grad_iterations,
                                 sum(stats.state_norm), sum(stats.residual_norm),
                                 len(stats.state_norm)], dtype=torch.float64)
            peak[0] = stats.max_depth
        self.local_loop = ((stats.sequences, stats.executed_iterations, stats.grad_iterations)
                           if owner else (0, 0, 0))
        if dist.is_initialized():
            sums, peak = _on_comm_device(sums), _on_comm_device(peak)
            dist.all_reduce(sums)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out = dict(zip(_SUM_FIELDS, sums.cpu().tolist(), strict=True))
        out["max_depth"] = int(peak.item())
        return out

    def _reduce_stability(self) -> dict | None:
        model = self.model
        vec = torch.zeros(len(_STABILITY_FIELDS), dtype=torch.float64)
        if (model is not None and model.has_loop and _tp_rank() == 0 and _dp_rank() == 0
                and model.injection.kind.diagonal):
            vec = torch.tensor(stability_signals(model), dtype=torch.float64)
        if dist.is_initialized():
            vec = _on_comm_device(vec)
            dist.all_reduce(vec)
        values = vec.cpu().tolist()
        if values[-1] == 0:  # no diagonal injection on any rank
            return None
        return dict(zip(_STABILITY_FIELDS[:-1], values[:-1], strict=True))

    def write(self, record: dict, iteration: int) -> None:
        """Write ``record`` (a ``type`` of ``_PREFIX``) from the last rank; other ranks skip."""
        if _is_last_rank():
            self._write(record, iteration)

    def _write_straggler(self, record: dict, iteration: int) -> None:
        for line in describe(record):
            print(line, flush=True)
        self._write(record, iteration)

    def _write(self, record: dict, iteration: int) -> None:
        """The one sink: ``telemetry.jsonl``, TensorBoard and W&B (scalars)."""
        record["time"] = time.time()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        prefix = _PREFIX[record["type"]]
        scalars = {prefix + key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)
                   and key not in ("iteration", "first_iteration", "time")}
        texts = ({prefix + key: value for key, value in record.items()
                  if isinstance(value, str) and key != "type"}
                 if record["type"] == "samples" else {})
        writer = get_tensorboard_writer()
        if writer is not None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, iteration)
            for key, value in texts.items():
                writer.add_text(key, value, iteration)
        wandb_writer = get_wandb_writer()
        if wandb_writer is not None:
            wandb_writer.log({**scalars, **texts}, iteration)


@torch.no_grad()
def stability_signals(model) -> list[float]:
    """Ā and Δ ranges and the spectral norms of B̄ = diag(Δ)·B and C (docs/design.md §11)."""
    inj = model.injection
    decay, delta = inj.decay(), inj.delta()
    bbar = delta[:, None] * inj.B
    spectral = lambda m: float(torch.linalg.matrix_norm(m.float(), ord=2))
    return [float(decay.min()), float(decay.mean()), float(decay.max()), float(delta.min()),
            float(delta.mean()), float(delta.max()), spectral(bbar),
            spectral(model.readout.weight), 1.0]


def _scalar(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        value = value[0] / value[1] if value.numel() == 2 else value.mean()
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN/inf


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in _PEAK_FLOPS.items() if key in name), None)


def _on_comm_device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda() if torch.cuda.is_available() else t


def _is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def _tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def _dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


TELEMETRY = Telemetry()


def read_records(path: Path, kind: str) -> list[dict]:
    """The records of one type (``train`` / ``validation``) of a telemetry file, in order.

    Tolerates a file being written (a partial last line) and a missing file.
    """
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == kind:
            out.append(rec)
    return out
