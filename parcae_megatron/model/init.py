"""Parcae's "scaled-zero" orthogonal initialisation (docs/design.md §5), independent of the layout.

Matrices are truncated-normal draws orthogonalised by QR and scaled by
``std * sqrt(max(rows, cols))`` so their entries have RMS ≈ std, with
std = sqrt(2 / (5 d)). Attention-out and MLP-down projections start at zero.

Every init is an `InitMethod`, a Megatron ``init_method(tensor)`` callable for one tensor
(not the authors' ``ParcaeInit``, their whole-model init scheme). Bound to a parameter with
`keyed_init` (a key naming the parameter, its *global* shape and the dim Megatron shards it
along), its values are a pure function of (seed, key, global shape): the full matrix is
drawn from a generator keyed by (seed, key), and the tensor receives the slice it stands
for. A tensor smaller than the global shape along the partition dim is this TP rank's
contiguous shard (Megatron's stride-1 layout; for a gated MLP's fc1, of each of its two
blocks), so the init slices the full draw itself. Neither the default nor the
model-parallel RNG stream is used (the latter differs per TP rank).

The model is initialised by one pass after it is built (`init_parameters`, run by
``ParcaeModel.init_weights``): Megatron's constructors leave the weights empty (the model
builds them with ``perform_initialization`` off) and `parameter_init` gives every
parameter its init from its key. The pass sees each rank's own shard, on whatever device it
lives (meta tensors are skipped), so every TP/PP layout, with or without
``use_cpu_initialization``, gets the same model. An init method that is not an
`InitMethod` (a plain Megatron callable in the config) is applied to the shard as is.

The draw itself is on the CPU (a device-independent stream); the QR runs on the tensor's
device. Unbound inits (no key) keep Megatron's plain semantics and draw from the default
generator, for callers outside the model.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from parcae_megatron.hf import loop_math

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
    blocks: int = 1
    """Equal blocks stacked along the partition dim, each its own matrix (a gated MLP's fc1:
    gate and up): orthogonal blocks are drawn one after the other, and a TP shard holds its
    slice of each block (Megatron's gated fc1 layout)."""

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
            return torch.randn(shape, generator=gen, device="cpu").mul_(std).to(device)
        if kind == "uniform":
            return torch.empty(shape, device="cpu").uniform_(-std, std, generator=gen).to(device)
        if kind == "trunc_normal":
            return torch.nn.init.trunc_normal_(torch.empty(shape, device="cpu"), std=std,
                                               a=-3 * std, b=3 * std, generator=gen).to(device)

        def orthogonal(rows: int, cols: int) -> torch.Tensor:
            draw = torch.nn.init.trunc_normal_(torch.empty(rows, cols, device="cpu"), std=1.0,
                                               a=-2.0, b=2.0, generator=gen)
            return _orthogonalise(draw.to(device), std)

        rows, cols = shape
        if kind == "orthogonal":
            return torch.cat([orthogonal(rows // self.blocks, cols)
                              for _ in range(self.blocks)])
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
        part = local[dim] // self.blocks
        return torch.cat([block.narrow(dim, rank * part, part)
                          for block in full.chunk(self.blocks, dim)], dim)


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


# ---------------------------------------------------------------------------------------
# The initialisation pass: every parameter's init from its key
# ---------------------------------------------------------------------------------------
Init = Callable[[torch.Tensor], torch.Tensor]
_LAYER = r"layers\.\d+\."


def _fill(value: float) -> Init:
    return lambda tensor: tensor.fill_(value)


def parameter_init(key: str, config) -> Init:
    """The init of the parameter named ``key``, a pure function of the key and ``config``.

    ``key`` is the parameter's layout-independent name (``ParcaeModel.init_keys``): layer
    parameters are ``layers.<effective layer>.…`` whatever stack and pipeline stage hold
    them, and the output layer's copy of the tied embedding is the embedding's key. Matrices
    get keyed inits with their global shape and TP partition dim (docs/design.md §5); norms
    start at one, biases at zero, and the injection's parameters by their injection type's
    rules in the registry (`_injection_init`). A key with no rule is an error, so a new
    parameter cannot go uninitialised.
    """
    d, ffn, hd = config.hidden_size, config.ffn_hidden_size, config.kv_channels
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    std, seed = config.init_method_std, config.init_seed
    base, out = config.init_method, config.output_layer_init_method

    def layer(suffix: str) -> bool:
        return re.fullmatch(_LAYER + re.escape(suffix), key) is not None

    if key.endswith(("norm.weight", "layer_norm_weight")):
        return _fill(0.0 if config.layernorm_zero_centered_gamma else 1.0)
    if key.endswith((".bias", "layer_norm_bias")):
        return _fill(0.0)
    if key == "embedding.word_embeddings.weight":
        return keyed_init(config.embedding_init_method, key, (config.vocab_size, d), 0)
    if layer("self_attention.linear_qkv.weight"):
        # Q, K and V are each orthogonal (docs/design.md §5).
        qkv = ({"kind": "qkv_orthogonal", "head_dim": hd, "query_groups": groups}
               if getattr(base, "kind", None) == "orthogonal" else {})
        return keyed_init(base, key, ((heads + 2 * groups) * hd, d), 0, **qkv)
    if layer("self_attention.linear_proj.weight"):
        return keyed_init(out, key, (d, heads * hd), 1)
    if layer("mlp.linear_fc1.weight"):
        blocks = 2 if config.gated_linear_unit else 1  # gated: [gate; up]
        return keyed_init(base, key, (blocks * ffn, d), 0, blocks=blocks)
    if layer("mlp.linear_fc2.weight"):
        return keyed_init(out, key, (d, ffn), 1)
    # Value-embedding tables and gates: PyTorch's defaults (docs/design.md §5), sharded by heads.
    if layer("self_attention.value_embedding.weight"):
        return InitMethod("normal", 1.0, seed, key, (config.vocab_size, groups * hd), 1)
    if layer("self_attention.value_embedding.gate_weight"):
        gate = config.value_embedding_gate_channels
        return InitMethod("uniform", 1.0 / math.sqrt(gate), seed, key, (groups, gate), 0)
    if key == "readout.weight":
        return InitMethod("orthogonal", std, seed, key, (d, d))
    if key.startswith("injection."):
        return _injection_init(key, config)
    raise ValueError(f"no initialisation rule for parameter {key!r} (model/init.py)")


def _injection_init(key: str, config) -> Init:
    """The init of ``injection.<name>``: the rule its injection type's registry entry gives
    (``hf/loop_math.py``, which the Hugging Face model also reads, so adding a type touches
    only the registry). The ``"normal"`` rule is a keyed truncated normal at
    ``init_method_std`` over the parameter's full shape (injection parameters are replicated)."""
    kind = loop_math.injection(config.injection_type)
    name = key.removeprefix("injection.")
    if name not in kind.init:
        raise ValueError(f"no initialisation rule for parameter {key!r}: injection type "
                         f"{kind.name!r} has no parameter {name!r} (hf/loop_math.py)")
    rule, shape = kind.init[name], kind.shapes(config.hidden_size)[name]
    normal = InitMethod("trunc_normal", config.init_method_std, config.init_seed, key, shape)

    def init(tensor: torch.Tensor) -> torch.Tensor:
        loop_math.init_injection_parameter_(rule, tensor, config.init_decay, normal)
        return tensor

    return init


@contextmanager
def deferred_initialization(config) -> Iterator[bool]:
    """Build Megatron modules from ``config`` without initialising their weights (Megatron's
    ``perform_initialization`` off meanwhile): `init_parameters` sets them afterwards. Yields
    whether the caller should run that pass (the config's own setting)."""
    initialise = config.perform_initialization
    config.perform_initialization = False
    try:
        yield initialise
    finally:
        config.perform_initialization = initialise


@torch.no_grad()
def init_parameters(keyed: Iterable[tuple[str, torch.Tensor]], config) -> None:
    """Set every (key, parameter) pair from its key (`parameter_init`), in place.

    Parameters on the meta device are skipped: materialise them (``to_empty``) and run the
    pass again. Each parameter's values depend only on its key, so the order does not matter.
    """
    for key, param in keyed:
        if param.device.type != "meta":
            parameter_init(key, config)(param.data)
