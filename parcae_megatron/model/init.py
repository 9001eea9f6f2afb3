"""Parcae's "scaled-zero" orthogonal initialisation (docs/design.md §5), independent of the layout.

Matrices are truncated-normal draws orthogonalised by QR and scaled by
``std * sqrt(max(rows, cols))`` so their entries have RMS ≈ std, with
std = sqrt(2 / (5 d)). Attention-out and MLP-down projections start at zero.

Every init is an `InitMethod`, a Megatron ``init_method(tensor)`` callable for one tensor
(not the authors' ``ParcaeInit``, their whole-model init scheme). Bound to a
parameter with `keyed_init` (a key naming the parameter, its *global* shape and the dim
Megatron shards it along), its values are a pure function of (seed, key, global shape):
the full matrix is drawn from a generator keyed by (seed, key), and the tensor receives
the slice it stands for. This makes both of Megatron's init paths give the same model for
any TP/PP layout:

* ``use_cpu_initialization`` (``_initialize_affine_weight_cpu``): the init sees the full
  master weight and Megatron scatters it;
* the GPU path (``_initialize_affine_weight_gpu``, Transformer Engine's ``reset_parameters``):
  the init sees only this rank's shard, inside the model-parallel RNG fork, and nothing tells
  it where the shard lies. A tensor smaller than the global shape along the partition dim is
  this TP rank's contiguous shard (Megatron's stride-1 layout), so the init slices the full
  draw itself. The model-parallel RNG stream is deliberately not used: it differs per TP rank.

The draw itself is on the CPU (a device-independent stream); the QR runs on the tensor's
device. Unbound inits (no key) keep Megatron's plain semantics and draw from the default
generator, for callers outside the model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

INIT_KINDS = ("orthogonal", "qkv_orthogonal", "zeros", "normal", "uniform", "trunc_normal")


def keyed_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, key)."""
    digest = hashlib.sha256(key.encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _orthogonalise(draw: torch.Tensor, std: float) -> torch.Tensor:
    rows, cols = draw.shape
    tall = draw if rows >= cols else draw.T
    # LAPACK's blocked QR sums in a thread-count-dependent order: on the CPU it runs on one
    # thread, so the weight is the same bits in a 2-thread TP=1 process and in torchrun's
    # 1-thread TP=2 ranks (a torchrun launch already sets OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    if tall.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        q, r = torch.linalg.qr(tall)
    finally:
        torch.set_num_threads(threads)
    d = torch.diagonal(r)
    q = q * torch.sign(d).where(d != 0, torch.ones((), device=d.device))
    q = q if rows >= cols else q.T
    return q * (std * math.sqrt(max(rows, cols)))


@dataclass(frozen=True)
class InitMethod:
    """A Megatron ``init_method``: see the module docstring.

    ``kind``: 'orthogonal', 'qkv_orthogonal' (Q, K and V each orthogonal, Megatron's fused
    row layout: see `qkv_orthogonal_init`), 'zeros', 'normal' / 'trunc_normal' (std ``std``)
    or 'uniform' (±``std``).
    """

    kind: str
    std: float = 1.0
    seed: int | None = None
    key: str | None = None
    global_shape: tuple[int, ...] | None = None
    partition_dim: int | None = None
    head_dim: int | None = None
    query_groups: int | None = None

    def bind(self, key: str, global_shape: tuple[int, ...], partition_dim: int | None = None,
             seed: int | None = None, **changes) -> InitMethod:
        """This init tied to one parameter (see `keyed_init`)."""
        return replace(self, key=key, global_shape=tuple(global_shape),
                       partition_dim=partition_dim,
                       seed=self.seed if seed is None else seed, **changes)

    def full(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole (global) tensor this init describes, in fp32 on ``device``."""
        shape = self.global_shape
        if self.kind == "zeros":
            return torch.zeros(shape, device=device)
        gen = keyed_generator(self.seed or 0, self.key) if self.key is not None else None
        return self._draw(shape, gen).to(device)

    @torch.no_grad()
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return tensor
        if self.kind == "zeros":
            return tensor.zero_()
        if self.key is None:  # unbound: the tensor is the whole matrix, default generator
            return tensor.copy_(self._draw(tuple(tensor.shape), None, tensor.device))
        tensor.copy_(self._local_slice(self._draw(self.global_shape, keyed_generator(
            self.seed or 0, self.key), tensor.device), tuple(tensor.shape)))
        return tensor

    # ---------------------------------------------------------------------------------
    def _draw(self, shape: tuple[int, ...], gen: torch.Generator | None,
              device: torch.device | str = "cpu") -> torch.Tensor:
        kind, std = self.kind, self.std
        if kind == "normal":
            return torch.randn(shape, generator=gen).mul_(std).to(device)
        if kind == "uniform":
            return torch.empty(shape).uniform_(-std, std, generator=gen).to(device)
        if kind == "trunc_normal":
            return torch.nn.init.trunc_normal_(torch.empty(shape), std=std, a=-3 * std,
                                               b=3 * std, generator=gen).to(device)

        def orthogonal(rows: int, cols: int) -> torch.Tensor:
            draw = torch.nn.init.trunc_normal_(torch.empty(rows, cols), std=1.0, a=-2.0, b=2.0,
                                               generator=gen)
            return _orthogonalise(draw.to(device), std)

        rows, cols = shape
        if kind == "orthogonal":
            return orthogonal(rows, cols)
        return self._qkv(rows, cols, orthogonal)

    def _qkv(self, rows: int, cols: int, orthogonal) -> torch.Tensor:
        """Q, K and V drawn as three orthogonal matrices, interleaved per query group."""
        hd, groups = self.head_dim, self.query_groups
        if hd is None or groups is None or rows % hd or (rows // hd - 2 * groups) % groups \
                or rows // hd <= 2 * groups:
            raise ValueError(f"init of {self.key}: {rows} QKV rows are not (heads + 2 · "
                             f"{groups} groups) × head dim {hd}")
        per_group = (rows // hd - 2 * groups) // groups  # query heads of one group
        q = orthogonal(groups * per_group * hd, cols).view(groups, per_group * hd, cols)
        k = orthogonal(groups * hd, cols).view(groups, hd, cols)
        v = orthogonal(groups * hd, cols).view(groups, hd, cols)
        return torch.cat([q, k, v], dim=1).reshape(rows, cols)

    def _local_slice(self, full: torch.Tensor, local: tuple[int, ...]) -> torch.Tensor:
        """``full`` itself, or this TP rank's contiguous shard of it along the partition dim."""
        if local == tuple(full.shape):
            return full
        dim = self.partition_dim
        expected = list(full.shape)
        if dim is not None:
            expected[dim] = local[dim]
        if dim is None or tuple(expected) != local or full.shape[dim] % local[dim]:
            raise ValueError(f"init of {self.key}: a tensor of shape {list(local)} is not a "
                             f"shard of {list(full.shape)} along dim {dim}")
        from megatron.core import parallel_state

        parts = full.shape[dim] // local[dim]
        if parts != parallel_state.get_tensor_model_parallel_world_size():
            raise ValueError(f"init of {self.key}: {parts} shards but tensor parallel size "
                             f"{parallel_state.get_tensor_model_parallel_world_size()}")
        rank = parallel_state.get_tensor_model_parallel_rank()
        return full.narrow(dim, rank * local[dim], local[dim])


def keyed_init(init, key: str, global_shape: tuple[int, ...], partition_dim: int | None = None,
               seed: int | None = None, **changes):
    """Bind ``init`` to one parameter: ``key`` names it (a checkpoint-like path, the same on
    every layout), ``global_shape`` is its unsharded shape, ``partition_dim`` the dim tensor
    parallelism splits (None: replicated). Other init callables are returned unchanged."""
    if not isinstance(init, InitMethod):
        return init
    return init.bind(key, global_shape, partition_dim, seed, **changes)


def orthogonal_init(std: float, seed: int | None = None) -> InitMethod:
    """Megatron init_method: scaled orthogonal matrix with entry RMS ``std``."""
    return InitMethod("orthogonal", std, seed)


def qkv_orthogonal_init(head_dim: int, query_groups: int, std: float,
                        seed: int | None = None) -> InitMethod:
    """Init for Megatron's fused QKV weight: Q, K and V are each orthogonal (docs/design.md §5).

    Megatron lays the fused weight out per query group: for each group g the rows of its
    query heads, then its key head, then its value head ([q_g…, k_g, v_g]; multi-head
    attention is the case of one query head per group). Q ([heads · hd, d]), K and V
    ([groups · hd, d]) are drawn as whole orthogonal matrices and their rows placed there,
    so a TP shard of rows holds whole groups: the slice of the same three matrices.
    """
    return InitMethod("qkv_orthogonal", std, seed, head_dim=head_dim, query_groups=query_groups)


zeros_init = InitMethod("zeros")
"""Megatron init_method that zeroes the tensor (attention-out / MLP-down projections)."""

