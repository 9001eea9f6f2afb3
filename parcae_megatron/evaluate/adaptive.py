"""Adaptive depth: loss (and CORE) against mean iterations per token, for a sweep of exit
thresholds, beside the fixed-T curve.

Scoring under adaptive exit is teacher-forced decoding one token at a time through the KV
cache, batched over sequences, so every token's exit is its own and later tokens see earlier
ones under the model's cache rule (an exited token's keys/values at later iterations are those
of its last computed iteration; ``ParcaeForCausalLM.forward``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from parcae_megatron.evaluate.report import save_figure


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, max_iterations: int, criterion: str,
                   threshold: float, patience: int = 2,
                   seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [b, L, V], iterations [b, L]) for ``ids`` [b, L] fed one position at a time
    through the cache under the exit rule (criterion, ε, k) with at most ``max_iterations``."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    logits, iterations = [], []
    for t in range(ids.shape[1]):
        out = model(ids[:, t: t + 1], cache=cache, use_cache=True,
                    num_iterations=max_iterations, state_seed=seed, exit_criterion=criterion,
                    exit_threshold=threshold, exit_patience=patience)
        logits.append(out.logits)
        iterations.append(out.iterations)
    return torch.cat(logits, 1), torch.cat(iterations, 1)


def adaptive_forward(model, max_iterations: int, criterion: str, threshold: float,
                     patience: int, log: list, pad_id: int):
    """A CORE ``forward_for`` factory scoring prompts by teacher-forced cached decoding under
    the exit rule; every call appends the iterations of its non-padding tokens to ``log``
    (prompts are right-padded with ``pad_id``, which otherwise only starts a prompt)."""
    def factory(_t: int, seed: int):
        def forward(ids: torch.Tensor) -> torch.Tensor:
            logits, its = teacher_forced(model, ids, max_iterations, criterion, threshold,
                                         patience, seed)
            real = ids != pad_id
            real[:, 0] = True
            log.append(its[real].cpu())
            return logits
        return forward
    return factory


def _batches(windows: list[np.ndarray], batch_size: int) -> list[torch.Tensor]:
    by_len: dict[int, list[np.ndarray]] = defaultdict(list)
    for w in windows:
        by_len[len(w)].append(w)
    return [torch.from_numpy(np.stack(g[i: i + batch_size]))
            for n in sorted(by_len, reverse=True) for g in [by_len[n]]
            for i in range(0, len(g), batch_size)]


def adaptive_loss(model, windows: list[np.ndarray], max_iterations: int, criterion: str,
                  threshold: float, patience: int = 2, seed: int = 0, batch_size: int = 8,
                  bar=None) -> dict:
    """Mean next-token NLL, mean iterations per token and their histogram under one rule."""
    device = next(model.parameters()).device
    nll = count = 0.0
    hist = torch.zeros(max_iterations + 1, dtype=torch.long)
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        logits, its = teacher_forced(model, batch[:, :-1], max_iterations, criterion,
                                     threshold, patience, seed)
        losses = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                                 reduction="none").double()
        nll += losses.sum().item()
        count += losses.numel()
        hist += torch.bincount(its.flatten().cpu(), minlength=max_iterations + 1)
        if bar is not None:
            bar.update()
    tokens = int(hist.sum())
    mean_its = float((hist * torch.arange(max_iterations + 1)).sum()) / tokens
    return {"criterion": criterion, "threshold": threshold, "patience": patience,
            "loss": nll / count, "mean_iterations": mean_its, "tokens": tokens,
            "histogram": hist.tolist()}


def best_saving(fixed: dict[int, float], adaptive: list[dict], reference_t: int,
                min_saving: float = 0.30, max_loss_increase: float = 0.005) -> dict | None:
    """The adaptive point with the largest iteration saving vs T = ``reference_t`` that keeps
    the loss within ``max_loss_increase`` (relative) and saves at least ``min_saving``."""
    ref = fixed[reference_t]
    ok = [dict(p, saving=1 - p["mean_iterations"] / reference_t,
               loss_increase=p["loss"] / ref - 1) for p in adaptive]
    ok = [p for p in ok if p["saving"] >= min_saving and p["loss_increase"] <= max_loss_increase]
    return max(ok, key=lambda p: p["saving"]) if ok else None


def plot_adaptive(report: dict, path: str) -> None:
    """Loss vs mean iterations per token: fixed T (line) and the ε sweep (points)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report.get("core") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), dpi=120, squeeze=False)
    ax = axes[0][0]
    fixed = report["fixed"]
    ax.plot([r["T"] for r in fixed], [r["loss"] for r in fixed], "o-", color="C0",
            label="fixed T")
    pts = report["adaptive"]
    ax.plot([p["mean_iterations"] for p in pts], [p["loss"] for p in pts], "s", color="C1",
            label=f"adaptive ({report['criterion']})")
    for p in pts:
        ax.annotate(f"{p['threshold']:g}", (p["mean_iterations"], p["loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean iterations per token")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        core = report["core"]
        ax2 = axes[0][1]
        ax2.plot([r["T"] for r in core["fixed"]], [r["score"] for r in core["fixed"]], "o-",
                 color="C0", label="fixed T")
        ax2.plot([p["mean_iterations"] for p in core["adaptive"]],
                 [p["score"] for p in core["adaptive"]], "s", color="C1", label="adaptive")
        ax2.set_xlabel("mean iterations per token")
        ax2.set_ylabel(f"{core['metric']} (x100)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle(f"{report.get('model', 'model')}: quality vs compute", fontsize=10)
    save_figure(fig, path)


def summarise_histogram(hist: list[int]) -> str:
    """``r:count`` pairs of a histogram (entry 0 skipped)."""
    return " ".join(f"{r}:{c}" for r, c in enumerate(hist) if r and c)
