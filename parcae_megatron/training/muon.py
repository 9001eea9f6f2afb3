"""The authors' Muon (spec §2.2) as a Megatron-Core emerging optimizer: ``--optimizer parcae_muon``.

One step on a 2-D matrix W (rows × cols) with gradient G, as in the released MuonAdamW:

1. Nesterov momentum: M ← lerp(M, G, 1−μ); U ← lerp(G, M, μ). μ is warmed up linearly from
   0.85 to 0.95 over the first 300 optimizer steps (``RecipeParamScheduler``).
2. Polar Express: X = U / (1.02·‖U‖_F + 1e-6), then 5 fixed-coefficient quintic iterations
   in ``--muon-ns-dtype`` (bf16, the default, as the authors; or fp32, whose matmuls then
   follow Megatron's ``--muon-fp32-matmul-prec``, torch's float32 matmul precision).
3. Factored variance reduction (NorMuon style): with d the longer axis (cols if rows ≥ cols),
   m = mean_d(X²); V ← lerp(V, m, 1−β₂); X ← X·rsqrt(max(V, 1e-10)), rescaled so that
   ‖X‖_F is unchanged.
4. Cautious decoupled weight decay with the per-matrix LR multiplier s = √max(1, rows/cols):
   W ← W − lr·s·(X + wd·W·[X·W ≥ 0]).

Megatron specifics kept from ``TensorParallelMuon``: fused QKV is split into q, k, v and each is
treated as its own matrix (the authors have separate q/k/v projections). Under tensor
parallelism the momentum-averaged update and V are gathered along the partition dim, every rank
runs steps 2-3 on the full matrix (Megatron's ``duplicated`` mode) and keeps its shard, so TP
does not change the update. V is stored broadcast to the parameter's shape so that Megatron's
checkpointing shards it like the parameter (normuon's reduced buffer does not fit the
``torch_dist`` optimizer-state layout).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from emerging_optimizers.utils import fp32_matmul_precision
from megatron.core.optimizer.emerging_optimizers import (
    _EMERGING_OPTIMIZERS,
    EmergingOptimizerEntry,
    TensorParallelMuon,
    _eopt_init_state_fn,
    _muon_config_to_kwargs,
)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

NAME = "parcae_muon"

# Polar Express coefficients of the released MuonAdamW (5 iterations).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
VARIANCE_EPS = 1e-10
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --muon-ns-dtype


def polar_express(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximate orthogonal polar factor of a 2-D matrix (returned in fp32)."""
    x = update.to(dtype)
    x = x / (x.norm() * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.float()


def reduce_dim(shape: torch.Size | tuple[int, ...]) -> int:
    """Axis the second moment averages over: the columns unless the matrix is wide."""
    return -1 if shape[-2] >= shape[-1] else -2


def variance_rescale(x: torch.Tensor, moment2: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon-style rescale of the orthogonalised ``x``; updates ``moment2`` in place.

    ``moment2`` has ``x``'s shape with the reduced statistic broadcast along ``reduce_dim``.
    """
    dim = reduce_dim(x.shape)
    v_mean = x.square().mean(dim=dim, keepdim=True)
    norm = (v_mean.sum() * x.size(dim)).sqrt()
    v = moment2.narrow(dim, 0, 1).lerp(v_mean, 1 - beta2)
    moment2.copy_(v.expand_as(moment2))
    scale = v.clamp_min(VARIANCE_EPS).rsqrt()
    new_norm = ((v_mean * x.size(dim)) * scale.square()).sum().sqrt()
    return x * (scale * (norm / new_norm.clamp_min(VARIANCE_EPS)))


def matrix_pieces(shape: tuple[int, int], qkv_split) -> list[tuple[int, int]]:
    """Shapes of the matrices Muon treats separately in a (global) parameter: q, k, v of a
    fused QKV (Megatron interleaves them per query group), else the parameter itself."""
    rows, cols = shape
    if qkv_split is None:
        return [(rows, cols)]
    groups = rows // sum(qkv_split)
    return [(groups * n, cols) for n in qkv_split]


def lr_multiplier(rows: int, cols: int) -> float:
    """√max(1, rows/cols): the authors' per-matrix LR scale (×2 for the 4d×d up-projection)."""
    return math.sqrt(max(1.0, rows / cols))


class ParcaeMuon(TensorParallelMuon):
    """The authors' Muon on Megatron's TP-aware Muon (see the module docstring).

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

    def _full_update(self, update: torch.Tensor, moment2: torch.Tensor, qkv_split,
                     beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-3 on a full (unsharded) matrix; returns (X, lr-multiplier tensor)."""
        rows, cols = update.shape
        if qkv_split is None:
            x = variance_rescale(polar_express(update, self.num_steps, self.ns_dtype),
                                 moment2, beta2)
            return x, torch.full((rows, 1), lr_multiplier(rows, cols), dtype=x.dtype,
                                 device=x.device)
        total = sum(qkv_split)
        groups = rows // total
        u_parts = update.view(groups, total, cols).split(list(qkv_split), dim=1)
        m_parts = moment2.view(groups, total, cols).split(list(qkv_split), dim=1)
        xs, mults = [], []
        for u, m in zip(u_parts, m_parts, strict=True):
            m_flat = m.reshape(-1, cols)
            x = variance_rescale(polar_express(u.reshape(-1, cols), self.num_steps,
                                               self.ns_dtype), m_flat, beta2)
            m.copy_(m_flat.view_as(m))
            xs.append(x.view(groups, -1, cols))
            mults.append(torch.full((groups, u.shape[1], 1), lr_multiplier(*m_flat.shape),
                                    dtype=x.dtype, device=x.device))
        return (torch.cat(xs, dim=1).view(rows, cols),
                torch.cat(mults, dim=1).view(rows, 1))

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
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom) if self.nesterov else buf.clone()
                moment2 = state["moment2_buffer"]
                partition_dim, qkv_split = self._metadata(p)
                sharded = tp_group is not None and partition_dim in (0, 1)
                if sharded:
                    update = self._gather(update, partition_dim, tp_group)
                    moment2 = self._gather(moment2, partition_dim, tp_group)
                with fp32_matmul_precision(self.fp32_matmul_prec):  # Megatron's meaning
                    x, mult = self._full_update(update, moment2, qkv_split, group["beta2"])
                mult = mult.expand_as(x)
                if sharded:
                    rank = tp_group.rank()
                    size = tp_group.size()
                    x = x.chunk(size, dim=partition_dim)[rank]
                    mult = mult.chunk(size, dim=partition_dim)[rank]
                    state["moment2_buffer"].copy_(moment2.chunk(size, dim=partition_dim)[rank])
                step_lr = lr * mult
                mask = (x * p) >= 0
                p.sub_(step_lr * x + step_lr * wd * p * mask)
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


def tag_params_for_buffer_routing(model_chunks) -> None:
    """Megatron's layer-wise distributed optimizer keeps Muon matrices in their own DDP
    buffers; tag parameters by the same routing as the optimizer groups (``uses_adamw``)."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                param.is_managed_by_layer_wise_optimizer = not uses_adamw(param)


def register() -> None:
    """Make ``--optimizer parcae_muon`` known to Megatron-Core's emerging-optimizer registry,
    and route parameters the authors' way for Megatron's own Muons too.

    The AdamW group keeps weight decay 0 (``wd_mult`` 0) whatever the Muon schedule is.
    """
    for name in ("muon", "adaptive_muon"):  # Megatron's own Muons: same routing
        if name in _EMERGING_OPTIMIZERS:
            _EMERGING_OPTIMIZERS[name].default_param_overrides = {ADAMW_KEY: {"optimizer": "adam"}}
    import megatron.core.optimizer.layer_wise_optimizer as layer_wise
    import megatron.training.training as mtrain

    layer_wise.tag_params_for_buffer_routing = tag_params_for_buffer_routing
    mtrain.tag_params_for_buffer_routing = tag_params_for_buffer_routing
    _EMERGING_OPTIMIZERS[NAME] = EmergingOptimizerEntry(
        optimizer_cls=ParcaeMuon, init_state_fn=_eopt_init_state_fn,
        config_to_kwargs=_parcae_muon_config_to_kwargs,
        default_param_overrides={ADAMW_KEY: {"optimizer": "adam", "wd_mult": 0.0}})


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


def momentum_at(step: float, start: float, end: float, warmup_iters: int) -> float:
    """Linear warm-up of the Muon momentum over ``warmup_iters`` optimizer steps."""
    if warmup_iters <= 0:
        return end
    frac = min(step / warmup_iters, 1.0)
    return start + frac * (end - start)


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


def install() -> None:
    """Hook the recipe into Megatron-LM's ``pretrain`` when ``--optimizer parcae_muon``.

    Adds the Muon group's LR and weight-decay schedule (``--muon-lr``,
    ``--muon-{start,end}-weight-decay``) as param-group overrides and replaces the
    scheduler class with ``RecipeParamScheduler`` (momentum warm-up).
    """
    import megatron.training.training as mtrain
    from megatron.training import get_args

    register()
    build_config = mtrain.get_megatron_optimizer_config

    def get_megatron_optimizer_config(args):
        config, overrides = build_config(args)
        if args.optimizer == NAME:
            config.muon_beta2 = args.muon_beta2
            config.muon_ns_dtype = args.muon_ns_dtype
            overrides = recipe_overrides(overrides, args.muon_lr, args.muon_start_weight_decay,
                                         args.muon_end_weight_decay)
        return config, overrides

    def scheduler_class(*a: Any, **kw: Any) -> OptimizerParamScheduler:
        args = get_args()
        if args.optimizer != NAME:
            return OptimizerParamScheduler(*a, **kw)
        return RecipeParamScheduler(
            *a, momentum=args.muon_momentum,
            momentum_warmup_start=args.muon_momentum_warmup_start,
            momentum_warmup_iters=args.muon_momentum_warmup_iters,
            samples_per_iteration=args.global_batch_size, **kw)

    mtrain.get_megatron_optimizer_config = get_megatron_optimizer_config
    mtrain.OptimizerParamScheduler = scheduler_class
