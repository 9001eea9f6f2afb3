"""Recurrence-depth sampling (spec §2.1).

Per sequence i: T_i = max(1, Poisson(μ_rec)) total iterations, of which the last
k_i = min(T_i, μ_bwd) receive gradient and the first n_i = T_i - k_i run without it.

Draws are keyed by (seed, step, global micro-batch index), where the global index
``local_microbatch * dp_size + dp_rank`` follows Megatron's data sampler order. So they are
identical on every TP/PP rank of a data-parallel replica (no broadcast needed), differ across
replicas and micro-batches, do not depend on the DP layout, and resume deterministically.
The same key, on another stream, seeds the device generator that draws the initial loop
state h₀ (``next`` returns that seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


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


DEPTH_STREAM, EVAL_STATE_STREAM, STATE_STREAM = 0, 1, 2


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
        rates = torch.full((batch_size,), float(mean_recurrence))
        total = torch.poisson(rates, generator=generator).long().clamp_min(1)
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


class DepthSampler:
    """Stateful sampler the training loop advances: ``start_step(step)`` then one ``next`` per
    micro-batch. ``state_dict`` makes it part of a checkpoint."""

    def __init__(self, config, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.scheme = config.depth_sampling
        self.mean_recurrence = config.mean_recurrence
        self.mean_backprop_depth = config.mean_backprop_depth
        self.sigma = config.per_batch_lognormal_sigma
        self.seed = config.depth_seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = 0
        self.microbatch = 0
        self.eval_draws = 0

    def start_step(self, step: int) -> None:
        """Begin optimizer step ``step`` (resets the micro-batch counter)."""
        self.step, self.microbatch = step, 0

    def next(self, batch_size: int) -> tuple[DepthSample, int]:
        """Depths for the next micro-batch (drawn on the host) and the seed of its h₀."""
        global_microbatch = self.microbatch * self.dp_size + self.dp_rank
        gen = depth_generator(self.seed, self.step, global_microbatch)
        self.microbatch += 1
        depths = sample_depths(self.scheme, batch_size, self.mean_recurrence,
                               self.mean_backprop_depth, gen, self.sigma)
        return depths, draw_seed(self.seed, self.step, global_microbatch, STATE_STREAM)

    def eval_seed(self) -> int:
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
