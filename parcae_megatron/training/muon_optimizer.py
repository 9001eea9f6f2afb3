"""``--optimizer parcae_muon`` on Megatron-Core: the optimizer class, its registry entry and
parameter groups, and the scheduler that warms up its momentum (maths: ``muon_math.py``).

Megatron specifics kept from ``TensorParallelMuon``: fused QKV is split into q, k, v and each is
treated as its own matrix (the authors have separate q/k/v projections). Under tensor
parallelism the momentum-averaged update and V are gathered along the partition dim, every rank
runs the orthogonalisation and rescale on the full matrix (Megatron's ``duplicated`` mode) and
keeps its shard, so TP does not change the update. V is stored broadcast to the parameter's
shape so that Megatron's checkpointing shards it like the parameter (normuon's reduced buffer
does not fit the ``torch_dist`` optimizer-state layout). The registry entry and the hooks into
Megatron-LM's ``pretrain`` are installed by ``training/megatron_patches.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from emerging_optimizers.utils import fp32_matmul_precision
from megatron.core.optimizer.emerging_optimizers import (
    EmergingOptimizerEntry,
    TensorParallelMuon,
    _eopt_init_state_fn,
    _muon_config_to_kwargs,
)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from parcae_megatron.training import muon_math
from parcae_megatron.training.muon_math import NS_DTYPES, POLAR_EXPRESS, momentum_at

NAME = "parcae_muon"


class ParcaeMuon(TensorParallelMuon):
    """The authors' Muon (``muon_math``) on Megatron's TP-aware Muon (see the module docstring).

    Group keys read each step: ``lr``, ``weight_decay`` (both set by Megatron's scheduler),
    ``momentum`` (set by ``RecipeParamScheduler``) and ``beta2``.
    """

    def __init__(self, params, *, beta2: float = 0.95, ns_dtype: str = "bf16",
                 **kwargs: Any) -> None:
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"--muon-ns-dtype must be one of {', '.join(NS_DTYPES)}, "
                             f"got {ns_dtype!r}")
        if kwargs.get("num_ns_steps", 5) > len(POLAR_EXPRESS):
            raise ValueError(f"parcae_muon has {len(POLAR_EXPRESS)} Polar Express coefficients; "
                             f"--muon-num-ns-steps {kwargs['num_ns_steps']} is too many")
        if kwargs.get("tp_mode", "duplicated") != "duplicated":
            raise ValueError("parcae_muon orthogonalises the full matrix under tensor "
                             "parallelism: use --muon-tp-mode duplicated")
        super().__init__(params, **kwargs)
        self.num_steps = kwargs.get("num_ns_steps", 5)
        self.ns_dtype = NS_DTYPES[ns_dtype]
        for group in self.param_groups:
            group.setdefault("beta2", beta2)
        # Mixed precision swaps these model params for fp32 copies (``param.main_param``)
        # that do not carry the QKV tags; resolve the metadata lazily from the model params.
        self._model_params = [p for g in self.param_groups for p in g["params"]]
        self._meta: dict[int, tuple] | None = None

    def _metadata(self, p: torch.Tensor) -> tuple:
        if self._meta is None:
            self._meta = {}
            for mp in self._model_params:
                meta = self._describe(mp)
                self._meta[id(mp)] = meta
                if getattr(mp, "main_param", None) is not None:
                    self._meta[id(mp.main_param)] = meta
        if id(p) not in self._meta:  # a parameter Megatron created after construction
            return self._describe(p)
        return self._meta[id(p)]

    def _describe(self, p: torch.Tensor) -> tuple:
        """(TP partition dim or -1, q/k/v row split or None) from Megatron's tags."""
        return (getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False)
                else -1,
                getattr(p, "qkv_split_shapes", None)
                if self.split_qkv and getattr(p, "is_qkv", False) else None)

    @torch.no_grad()
    def _init_group(self, group: dict, skip_non_grad_params: bool = True) -> None:
        for p in group["params"]:
            if skip_non_grad_params and p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["momentum_buffer"] = torch.zeros_like(p.data)
                state["moment2_buffer"] = torch.zeros_like(p.data)

    def _tp_group(self) -> Any:
        if self.pg_collection is None or not dist.is_initialized():
            return None
        group = self.pg_collection.tp
        return group if group is not None and group.size() > 1 else None

    @staticmethod
    def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
        shards = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(shards, x.contiguous(), group=group)
        return torch.cat(shards, dim=dim)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over all groups (no closure)."""
        if closure is not None:
            raise ValueError("closure is not supported")
        tp_group = self._tp_group()
        for group in self.param_groups:
            self._init_group(group)
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"{NAME} only updates 2-D parameters, got {tuple(p.shape)}")
                state = self.state[p]
                update = muon_math.momentum_update_(p.grad, state["momentum_buffer"], mom,
                                                    self.nesterov)
                moment2 = state["moment2_buffer"]
                partition_dim, qkv_split = self._metadata(p)
                sharded = tp_group is not None and partition_dim in (0, 1)
                if sharded:
                    update = self._gather(update, partition_dim, tp_group)
                    moment2 = self._gather(moment2, partition_dim, tp_group)
                with fp32_matmul_precision(self.fp32_matmul_prec):  # Megatron's meaning
                    x, mult = muon_math.orthogonalised_update(update, moment2, qkv_split,
                                                              group["beta2"], self.num_steps,
                                                              self.ns_dtype)
                mult = mult.expand_as(x)
                if sharded:
                    rank = tp_group.rank()
                    size = tp_group.size()
                    x = x.chunk(size, dim=partition_dim)[rank]
                    mult = mult.chunk(size, dim=partition_dim)[rank]
                    state["moment2_buffer"].copy_(moment2.chunk(size, dim=partition_dim)[rank])
                muon_math.cautious_step_(p, x, lr, mult, wd)
        return None


def _parcae_muon_config_to_kwargs(config, model_chunks, pg_collection) -> dict[str, Any]:
    kwargs = _muon_config_to_kwargs(config, model_chunks, pg_collection)
    for unused in ("coefficient_type", "scale_mode", "extra_scale_factor"):
        kwargs.pop(unused, None)  # fixed by the recipe: Polar Express, √max(1, rows/cols)
    kwargs["beta2"] = getattr(config, "muon_beta2", 0.95)
    kwargs["ns_dtype"] = getattr(config, "muon_ns_dtype", "bf16")
    return kwargs


def uses_adamw(param: torch.Tensor) -> bool:
    """The authors' routing: AdamW for embeddings (incl. value-embedding tables and the tied
    head), every non-matrix, and the Parcae injection/readout (``adamw_only``); Muon for every
    other matrix, the value-embedding gate W_g included."""
    return (param.dim() != 2 or getattr(param, "adamw_only", False)
            or getattr(param, "is_embedding_or_output_parameter", False))


ADAMW_KEY = ParamKey(predicate=ParamPredicate(name="parcae_adamw", fn=uses_adamw))
MUON_KEY = ParamKey(predicate=ParamPredicate(name="parcae_muon",
                                             fn=lambda p: not uses_adamw(p)))


def adamw_routing() -> dict:
    """Param overrides that send the AdamW parameters (``uses_adamw``) to Adam: used for
    Megatron's own ``muon`` and ``adaptive_muon`` too."""
    return {ADAMW_KEY: {"optimizer": "adam"}}


def registry_entry() -> EmergingOptimizerEntry:
    """Megatron-Core's emerging-optimizer entry of ``parcae_muon``. The AdamW group keeps
    weight decay 0 (``wd_mult`` 0) whatever the Muon schedule is."""
    return EmergingOptimizerEntry(
        optimizer_cls=ParcaeMuon, init_state_fn=_eopt_init_state_fn,
        config_to_kwargs=_parcae_muon_config_to_kwargs,
        default_param_overrides={ADAMW_KEY: {"optimizer": "adam", "wd_mult": 0.0}})


def tag_params_for_buffer_routing(model_chunks) -> None:
    """Megatron's layer-wise distributed optimizer keeps Muon matrices in their own DDP
    buffers; tag parameters by the same routing as the optimizer groups (``uses_adamw``)."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                param.is_managed_by_layer_wise_optimizer = not uses_adamw(param)


def recipe_overrides(overrides: dict | None, muon_lr: float | None = None,
                     muon_start_wd: float | None = None,
                     muon_end_wd: float | None = None) -> dict:
    """Megatron's param-group overrides plus the Muon group's peak LR and weight-decay
    schedule (per-group start/end: Megatron's global schedule may only increase)."""
    muon_group: dict[str, float] = {}
    if muon_lr is not None:
        muon_group["max_lr"] = muon_lr
    if muon_start_wd is not None:
        muon_group["start_wd"] = muon_start_wd
        muon_group["end_wd"] = muon_start_wd if muon_end_wd is None else muon_end_wd
    overrides = dict(overrides or {})
    if muon_group:
        overrides[MUON_KEY] = muon_group
    return overrides


def recipe_optimizer_config(args, config, overrides: dict | None) -> tuple[Any, dict | None]:
    """Megatron's optimizer config and overrides of ``args``, completed for ``parcae_muon``:
    β₂ and the Newton–Schulz dtype on the config, the Muon group's LR and weight-decay
    schedule (``--muon-lr``, ``--muon-{start,end}-weight-decay``) as param-group overrides."""
    if args.optimizer == NAME:
        config.muon_beta2 = args.muon_beta2
        config.muon_ns_dtype = args.muon_ns_dtype
        overrides = recipe_overrides(overrides, args.muon_lr, args.muon_start_weight_decay,
                                     args.muon_end_weight_decay)
    return config, overrides


class RecipeParamScheduler(OptimizerParamScheduler):
    """Megatron's LR / weight-decay scheduler that also warms up the Muon momentum.

    Megatron counts scheduler steps in samples; ``samples_per_iteration`` converts back to
    optimizer steps. Groups without a ``momentum`` key (AdamW) are left alone.
    """

    def __init__(self, *args: Any, momentum: float, momentum_warmup_start: float,
                 momentum_warmup_iters: int, samples_per_iteration: int, **kwargs: Any) -> None:
        self.momentum = momentum
        self.momentum_warmup_start = momentum_warmup_start
        self.momentum_warmup_iters = momentum_warmup_iters
        self.samples_per_iteration = samples_per_iteration
        super().__init__(*args, **kwargs)

    def current_momentum(self) -> float:
        """Momentum for the optimizer step about to run."""
        return momentum_at(self.num_steps / self.samples_per_iteration,
                           self.momentum_warmup_start, self.momentum,
                           self.momentum_warmup_iters)

    def step(self, increment: int) -> None:
        """Advance LR / weight decay as Megatron does, then set the Muon momentum."""
        super().step(increment)
        momentum = self.current_momentum()
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                group["momentum"] = momentum


def scheduler_for(args, *scheduler_args: Any, **kwargs: Any) -> OptimizerParamScheduler:
    """The scheduler ``pretrain`` builds: Megatron's, or with ``--optimizer parcae_muon``
    ``RecipeParamScheduler`` with the momentum warm-up of ``args``."""
    if args.optimizer != NAME:
        return OptimizerParamScheduler(*scheduler_args, **kwargs)
    return RecipeParamScheduler(
        *scheduler_args, momentum=args.muon_momentum,
        momentum_warmup_start=args.muon_momentum_warmup_start,
        momentum_warmup_iters=args.muon_momentum_warmup_iters,
        samples_per_iteration=args.global_batch_size, **kwargs)
