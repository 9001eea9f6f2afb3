"""Recurrence-depth sampling (docs/design.md §4).

Per sequence i: T_i = max(1, Poisson(μ_rec)) total iterations, of which the last
k_i = min(T_i, μ_bwd) receive gradient and the first n_i = T_i - k_i run without it.

Draws are keyed by (seed, step, global micro-batch index), where the global index
``local_microbatch * dp_size + dp_rank`` follows Megatron's data sampler order. So they are
identical on every TP/PP rank of a data-parallel replica (no broadcast needed), differ across
replicas and micro-batches, do not depend on the DP layout, and resume deterministically.
The same key, on another stream, seeds the device generator that draws the initial loop
state h₀ (``next`` returns that seed).

With ``depth_balance='global'`` the depths of the whole global batch are instead drawn at once
from the generator keyed by (seed, step) and dealt to replicas so that each does the same loop
work (see ``depth_balance.py`` for why each sequence keeps the exact marginal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from parcae_megatron.model.depth_balance import deal_depths

# Generator streams of ``draw_seed``, all keyed by ``config.depth_seed``: a micro-batch's
# depths (0), the h₀ of an evaluation forward (1) and of a training micro-batch (2); with
# ``depth_balance='global'``, the global batch's depths (3) and the balance-preserving
# relabelling (4). The numbers are part of every draw: changing one changes the bits.
DEPTH_STREAM, EVAL_STATE_STREAM, STATE_STREAM = 0, 1, 2
_GLOBAL_DEPTH_STREAM, _GLOBAL_PERM_STREAM = 3, 4


@dataclass
class DepthSample:
    """Per-sequence loop depths of one micro-batch (CPU long tensors of shape [b])."""

    total: torch.Tensor
    grad: torch.Tensor

    @property
    def no_grad(self) -> torch.Tensor:
        """n_i = T_i - k_i, the leading iterations run without gradient."""
        return self.total - self.grad

    @classmethod
    def fixed(cls, batch_size: int, total: int, grad: int) -> DepthSample:
        """Every sequence runs ``total`` iterations, the last ``grad`` of them with gradient."""
        return cls(torch.full((batch_size,), total, dtype=torch.long),
                   torch.full((batch_size,), min(grad, total), dtype=torch.long))


def draw_seed(seed: int, step: int, global_microbatch: int, stream: int = DEPTH_STREAM) -> int:
    """A 64-bit seed that is a pure function of (seed, stream, step, global micro-batch)."""
    key = [seed, stream, step, global_microbatch]
    state = np.random.SeedSequence(key).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def depth_generator(seed: int, step: int, global_microbatch: int,
                    stream: int = DEPTH_STREAM) -> torch.Generator:
    """A CPU generator keyed by (seed, step, global micro-batch) on ``stream``."""
    return torch.Generator().manual_seed(draw_seed(seed, step, global_microbatch, stream))


def sample_depths(scheme: str, batch_size: int, mean_recurrence: int, mean_backprop_depth: int,
                  generator: torch.Generator, lognormal_sigma: float = 0.5) -> DepthSample:
    """Draw a micro-batch's depths with ``scheme`` in {per_sequence, per_batch, fixed}."""
    if scheme == "fixed":
        return DepthSample.fixed(batch_size, mean_recurrence, mean_backprop_depth)
    if scheme == "per_sequence":
        total = draw_per_sequence(batch_size, mean_recurrence, generator)
        return DepthSample(total, total.clamp_max(mean_backprop_depth))
    if scheme == "per_batch":
        # Huginn: τ ~ N(ln(μ_rec - μ_bwd) - σ²/2, σ), n ~ Poisson(e^τ) + 1, k = μ_bwd.
        gap = mean_recurrence - mean_backprop_depth
        n = 1
        if gap > 0:
            tau = torch.randn((), generator=generator) * lognormal_sigma + (
                math.log(gap) - lognormal_sigma**2 / 2)
            n += int(torch.poisson(torch.exp(tau).reshape(1), generator=generator).item())
        return DepthSample.fixed(batch_size, n + mean_backprop_depth, mean_backprop_depth)
    raise ValueError(f"unknown depth sampling scheme {scheme!r}")


def expected_max_depth(mean_recurrence: float, batch_size: int) -> float:
    """E[max_i T_i] over a micro-batch of per-sequence depths (what masking executes).

    Σ_k P(max > k) = Σ_k 1 - F(k)^b, with F the CDF of max(1, Poisson(μ)).
    """
    total, cdf, pmf, k = 0.0, 0.0, math.exp(-mean_recurrence), 0
    while True:
        cdf += pmf  # P(N <= k)
        trunc_cdf = cdf if k >= 1 else 0.0  # T = max(1, N) is never 0
        tail = 1.0 - trunc_cdf**batch_size
        if k > mean_recurrence and tail < 1e-12:
            return total
        total += tail
        k += 1
        pmf *= mean_recurrence / k


def draw_per_sequence(count: int, mean_recurrence: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``count`` iid draws of T = max(1, Poisson(μ_rec))."""
    rates = torch.full((count,), float(mean_recurrence))
    return torch.poisson(rates, generator=generator).long().clamp_min(1)


def global_batch_depths(seed: int, step: int, mean_recurrence: int, replicas: int,
                        microbatches: int, batch: int) -> torch.Tensor:
    """Step ``step``'s per-sequence depths for the whole global batch, dealt to
    [replicas, micro-batches, batch] with equal loop work per replica (and per micro-batch).

    The multiset of depths depends only on (seed, step, global batch size), not on the layout.
    """
    total = draw_per_sequence(replicas * microbatches * batch, mean_recurrence,
                              depth_generator(seed, step, 0, stream=_GLOBAL_DEPTH_STREAM))
    return deal_depths(total, replicas, microbatches, batch,
                       depth_generator(seed, step, 0, stream=_GLOBAL_PERM_STREAM))


class DepthSampler:
    """Stateful sampler the training loop advances: ``start_step(step, num_microbatches)``
    then one ``next`` per micro-batch. ``state_dict`` makes it part of a checkpoint."""

    def __init__(self, config, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.scheme = config.depth_sampling
        self.mean_recurrence = config.mean_recurrence
        self.mean_backprop_depth = config.mean_backprop_depth
        self.sigma = config.per_batch_lognormal_sigma
        self.seed = config.depth_seed  # keys the depth draws and the h₀ seeds alike
        self.balance = getattr(config, "depth_balance", "independent")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = 0
        self.microbatch = 0
        self.num_microbatches = 1
        self.eval_draws = 0
        self._dealt: tuple[tuple[int, int, int], torch.Tensor] | None = None

    def start_step(self, step: int, num_microbatches: int = 1) -> None:
        """Begin optimizer step ``step`` of ``num_microbatches`` micro-batches per replica
        (resets the micro-batch counter; the count matters for ``depth_balance='global'``)."""
        self.step, self.microbatch = step, 0
        self.num_microbatches = num_microbatches

    def next(self, batch_size: int) -> tuple[DepthSample, int]:
        """Depths for the next micro-batch (drawn on the host) and the seed of its h₀."""
        global_microbatch = self.microbatch * self.dp_size + self.dp_rank
        if self.balance == "global":
            total = self._replica_depths(batch_size)[self.microbatch]
            depths = DepthSample(total, total.clamp_max(self.mean_backprop_depth))
        else:
            gen = depth_generator(self.seed, self.step, global_microbatch)
            depths = sample_depths(self.scheme, batch_size, self.mean_recurrence,
                                   self.mean_backprop_depth, gen, self.sigma)
        self.microbatch += 1
        return depths, draw_seed(self.seed, self.step, global_microbatch, STATE_STREAM)

    def _replica_depths(self, batch_size: int) -> torch.Tensor:
        """This replica's [micro-batches, batch] share of the step's dealt global batch."""
        if self.microbatch >= self.num_microbatches:
            raise RuntimeError(
                f"depth_balance='global': micro-batch {self.microbatch + 1} of step {self.step} "
                f"but start_step announced {self.num_microbatches}")
        key = (self.step, self.num_microbatches, batch_size)
        if self._dealt is None or self._dealt[0] != key:
            layout = global_batch_depths(self.seed, self.step, self.mean_recurrence,
                                         self.dp_size, self.num_microbatches, batch_size)
            self._dealt = (key, layout[self.dp_rank])
        return self._dealt[1]

    def eval_state_seed(self) -> int:
        """The h₀ seed of an evaluation forward: fresh per call, identical across the TP/PP
        ranks of a replica (they evaluate the same micro-batches in the same order)."""
        self.eval_draws += 1
        return draw_seed(self.seed, self.eval_draws, self.dp_rank, EVAL_STATE_STREAM)

    def state_dict(self) -> dict:
        """Position of the sampler (the draws themselves are a pure function of it)."""
        return {"step": self.step, "microbatch": self.microbatch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by ``state_dict``."""
        self.step, self.microbatch, self.seed = state["step"], state["microbatch"], state["seed"]
