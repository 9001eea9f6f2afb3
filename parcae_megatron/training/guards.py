"""Skip optimizer steps whose gradients are not finite, and stop a run that keeps diverging.

Megatron's optimizers skip a step when ``prepare_grads()`` reports inf/nan, but only fp16
loss scaling ever reports it. The guard makes the optimizer ``pretrain`` steps report any
non-finite gradient, so bf16/fp32 runs skip such steps through Megatron's own path: the
update, the LR schedule and the optimizer state are left untouched and Megatron counts the
step as skipped. The guard is installed by ``training/megatron_patches.py``.

One decision for the whole job: every rank checks the gradients of every shard it owns, in
every part of the optimizer, and the flag is reduced once over the world. Reducing each part
over its own grad-stats group is not enough: with Muon and the distributed optimizer Megatron
builds ``ChainedOptimizer[LayerWiseDistributedOptimizer[...Muon], DistributedOptimizer[Adam]]``,
where each data-parallel rank owns whole Muon matrices but the layer-wise part's group is the
model-parallel group (one rank at TP = PP = 1). A NaN in one rank's Muon matrices then made
that rank alone skip while the others entered the next collective: the job hung until the
distributed timeout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite steps."""


def leaf_optimizers(optimizer) -> list:
    """The optimizers that own parameters: the parts of (nested) chained optimizers."""
    parts = getattr(optimizer, "chained_optimizers", None)
    if parts is None:
        return [optimizer]
    return [leaf for part in parts for leaf in leaf_optimizers(part)]


def describe(optimizer) -> str:
    """The optimizer's structure, e.g. ``ChainedOptimizer[DistributedOptimizer[Adam], ...]``."""
    parts = getattr(optimizer, "chained_optimizers", None)
    inner = ([describe(p) for p in parts] if parts is not None
             else [type(optimizer.optimizer).__name__]
             if getattr(optimizer, "optimizer", None) is not None else [])
    return type(optimizer).__name__ + (f"[{', '.join(inner)}]" if inner else "")


def param_pairs(leaf) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(main parameter the optimizer steps, model parameter) pairs of one leaf optimizer.

    The distributed optimizer steps fp32 shards of the model parameters, the float16 optimizer
    fp32 copies of its 16-bit parameters; the fp32 optimizer the model parameters themselves.
    """
    if hasattr(leaf, "model_float16_groups"):  # DistributedOptimizer
        groups = [(leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups),
                  (leaf.model_fp32_groups, leaf.shard_fp32_groups)]
    elif hasattr(leaf, "float16_groups"):  # Float16OptimizerWithFloat16Params
        groups = [(leaf.float16_groups, leaf.fp32_from_float16_groups),
                  (leaf.fp32_from_fp32_groups, leaf.fp32_from_fp32_groups)]
    else:
        params = leaf.get_parameters()
        groups = [([params], [params])]
    return [(main, model) for models, mains in groups for model_group, main_group
            in zip(models or [], mains or []) for model, main in zip(model_group, main_group)]


def model_names(model_chunks: Iterable[torch.nn.Module]) -> dict[torch.Tensor, tuple]:
    """Model parameter -> (order key, name as in the unwrapped model) of this rank's chunks.

    The key orders parameters over the job: pipeline stage, model chunk, position."""
    stage = 0
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        stage = parallel_state.get_pipeline_model_parallel_rank()
    names = {}
    for chunk_index, chunk in enumerate(model_chunks):
        for index, (name, param) in enumerate(chunk.named_parameters()):
            while name.startswith("module."):  # DDP and Float16Module wrappers
                name = name[len("module."):]
            names[param] = ((stage, chunk_index, index), name)
    return names


def _grad(param: torch.Tensor) -> torch.Tensor | None:
    grad = param.grad
    return getattr(param, "decoupled_grad", None) if grad is None else grad


class NonFiniteGuard:
    """The non-finite check of one optimizer (chained or not), reduced once over the world.

    ``culprit`` names the first parameter (in model order over the job) whose gradient was
    not finite in the last checked step, on every rank; None when the step was finite.
    """

    def __init__(self, optimizer, model_chunks: Iterable[torch.nn.Module] = ()) -> None:
        self.optimizer = optimizer
        self.model_chunks = list(model_chunks)
        self.culprit: str | None = None
        self._names: dict | None = None  # both built on the first non-finite step
        self._model_of: dict | None = None

    def check(self, found: bool) -> bool:
        """``found`` (Megatron's own inf/nan check) or any non-finite gradient on any rank."""
        self.culprit = None
        params = [(p, g) for p in self.optimizer.get_parameters() if (g := _grad(p)) is not None]
        device = params[0][1].device if params else _default_device()
        flag = torch.tensor([float(found)], dtype=torch.float32, device=device)
        bad = None
        if params:
            norms = torch.stack(torch._foreach_norm([g.float() for _, g in params]))
            bad = ~torch.isfinite(norms)
            flag = torch.maximum(flag, bad.any().float().view(1))
        # Every rank joins (also one without a shard), and all reach the same decision.
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return False
        local = [params[i][0] for i in bad.nonzero().flatten().tolist()] if bad is not None \
            else []
        self.culprit = self._first(local)
        return True

    def names(self) -> dict[torch.Tensor, tuple]:
        """:func:`model_names` of the model chunks (built once, when first needed)."""
        if self._names is None:
            self._names = model_names(self.model_chunks)
        return self._names

    def _first(self, mains: list[torch.Tensor]) -> str | None:
        """The first of the non-finite parameters of all ranks (``mains``: this rank's)."""
        if self._model_of is None:
            self._model_of = {main: model for leaf in leaf_optimizers(self.optimizer)
                              for main, model in param_pairs(leaf)}
        candidates = []
        for main in mains:
            model = self._model_of.get(main, main)
            key, name = self.names().get(model, ((1 << 30,), None))
            candidates.append((key, name or f"a parameter of shape {tuple(model.shape)}"))
        best = min(candidates, default=None)
        if dist.is_initialized() and dist.get_world_size() > 1:  # only on a skipped step
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, best)
            best = min((c for c in gathered if c is not None), default=None)
        return best[1] if best else None


def _default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() \
            and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ConsecutiveSkips:
    """Counts skipped steps in a row; raises past the limit, naming where the run of skips
    began and the first non-finite parameter there."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.first: tuple[int, str | None] = (0, None)

    def update(self, skipped: bool, iteration: int, culprit: str | None = None) -> None:
        """Record one iteration's outcome (``culprit``: its first non-finite parameter)."""
        self.count = self.count + 1 if skipped else 0
        if self.count == 1:
            self.first = (iteration, culprit)
        if self.limit and self.count > self.limit:
            start, name = self.first
            raise DivergenceError(
                f"{self.count} consecutive optimizer steps had non-finite gradients (iterations "
                f"{start}-{iteration}; the first non-finite gradient in iteration {start}: "
                f"{name or 'not identified'}); stopping. Lower the learning rate, check the "
                f"data, or resume from an earlier checkpoint (--max-consecutive-skipped sets "
                f"the limit).")
