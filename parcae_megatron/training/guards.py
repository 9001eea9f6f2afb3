"""Skip optimizer steps whose gradients are not finite, and stop a run that keeps diverging.

Megatron's optimizers skip a step when ``prepare_grads()`` reports inf/nan, but only fp16
loss scaling ever reports it. The guard makes every optimizer report non-finite gradients
(reduced over the ranks that share the gradient norm; for a chained optimizer, over each
part's own group), so bf16/fp32 runs skip such steps
through Megatron's own path: the update, the LR schedule and the optimizer state are left
untouched and Megatron counts the step as skipped. The guard is installed on the optimizer
``pretrain`` builds by ``training/megatron_patches.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite steps."""


def report_non_finite(optimizer, found: bool) -> bool:
    """What ``prepare_grads`` reports under the guard: ``found`` (Megatron's own inf/nan check)
    or any non-finite gradient of ``optimizer``'s parameters, reduced over its grad-stats group
    so that every rank of the group reaches the same decision.

    A ``ChainedOptimizer`` (e.g. Muon + distributed AdamW) has no single grad-stats group: the
    guard applies to each part (``training/megatron_patches.py``), and the chain ORs them.
    """
    grads = [p.grad for p in optimizer.get_parameters() if p.grad is not None]
    flag = torch.tensor([float(found)], dtype=torch.float32,
                        device=grads[0].device if grads else _default_device())
    if grads:
        norms = torch.stack(torch._foreach_norm([g.float() for g in grads]))
        flag = torch.maximum(flag, (~torch.isfinite(norms)).any().float().view(1))
    # Always reduce (also when this rank has no shard): every rank of the group must
    # join the collective, and all of them must reach the same decision.
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX,
                        group=optimizer.get_grad_stats_parallel_group())
    return bool(flag.item())


def _default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() \
            and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ConsecutiveSkips:
    """Counts skipped steps in a row; raises past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def update(self, skipped: bool, iteration: int) -> None:
        """Record one iteration's outcome."""
        self.count = self.count + 1 if skipped else 0
        if self.limit and self.count > self.limit:
            raise DivergenceError(
                f"{self.count} consecutive optimizer steps had non-finite gradients (last at "
                f"iteration {iteration}); stopping. Lower the learning rate, check the data, or "
                f"resume from an earlier checkpoint (--max-consecutive-skipped sets the limit).")
