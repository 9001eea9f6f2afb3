"""The Muon update maths (``training/muon_math.py``) alone, against the formulas of
docs/design.md §6.1 written out here in float64: no Megatron, no optimizer object."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from parcae_megatron.training import muon_math

# Polar Express coefficients of the released MuonAdamW (docs/design.md §6.1, muon_adamw.py).
COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def spec_orthogonalize(u: torch.Tensor) -> torch.Tensor:
    x = u.double() / (u.double().norm() * 1.02 + 1e-6)
    for a, b, c in COEFFS:
        if x.shape[0] > x.shape[1]:
            gram = x.T @ x
            x = a * x + x @ (b * gram + c * gram @ gram)
        else:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def spec_step(p, grad, m, v, *, lr, wd, mom, beta2=0.95):
    """One step of the authors' Muon in float64; returns (p, m, v) with v of reduced shape."""
    m = m + (1 - mom) * (grad - m)
    u = grad + mom * (m - grad)                              # Nesterov
    x = spec_orthogonalize(u)
    rows, cols = x.shape
    dim = 1 if rows >= cols else 0                          # average along the longer axis
    v_mean = (x ** 2).mean(dim=dim, keepdim=True)
    v = beta2 * v + (1 - beta2) * v_mean
    y = x / v.clamp_min(1e-10).sqrt()
    y = y * x.norm() / y.norm()                             # overall norm restored
    step_lr = lr * math.sqrt(max(1.0, rows / cols))          # √max(1, rows/cols)
    mask = (y * p >= 0).double()                             # cautious: sign(U) = sign(p)
    return p - step_lr * (y + wd * p * mask), m, v




def test_variance_rescale_equalises_rows_and_keeps_the_norm():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.0, 0.0]])
    moment2 = torch.zeros(3, 2)
    y = muon_math.variance_rescale(x, moment2, beta2=0.95)
    # first step from V = 0: every row rescaled to the same RMS, then ‖X‖_F restored
    rms = y.square().mean(dim=1)
    torch.testing.assert_close(rms, rms[0].expand(3))
    torch.testing.assert_close(y.norm(), x.norm())
    torch.testing.assert_close(moment2[:, 0], 0.05 * x.square().mean(dim=1))


def math_step(p, grad, m, v, *, lr, wd, mom, dtype=torch.float32):
    """One step composed of ``muon_math``'s functions, as ``ParcaeMuon.step`` composes them."""
    update = muon_math.momentum_update_(grad, m, mom, nesterov=True)
    x, mult = muon_math.orthogonalised_update(update, v, None, 0.95, 5, dtype)
    muon_math.cautious_step_(p, x, lr, mult.expand_as(x), wd)


@pytest.mark.parametrize("shape", [(24, 6), (6, 24), (8, 8)], ids=["tall", "wide", "square"])
def test_two_steps_match_the_spec(shape):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=gen)
    m, v = torch.zeros(shape), torch.zeros(shape)
    ref = p.double().clone()
    ref_m = torch.zeros_like(ref)
    ref_v = torch.zeros(shape[0], 1, dtype=torch.float64) if shape[0] >= shape[1] \
        else torch.zeros(1, shape[1], dtype=torch.float64)
    for _ in range(2):  # the second step exercises the momentum and the β₂ EMA
        grad = torch.randn(shape, generator=gen)
        math_step(p, grad, m, v, lr=0.01, wd=0.2, mom=0.9)
        ref, ref_m, ref_v = spec_step(ref, grad.double(), ref_m, ref_v, lr=0.01, wd=0.2,
                                      mom=0.9)
        torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), ref_v.expand(shape), rtol=1e-4, atol=1e-7)


def test_polar_express_is_nearly_orthogonal_in_bf16_and_fp32():
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(32, 8, generator=gen)
    for dtype, tol in ((torch.float32, 0.35), (torch.bfloat16, 0.4)):
        x = muon_math.polar_express(u, 5, dtype)
        assert x.dtype == torch.float32
        # Polar Express leaves the singular values in a band around 1, not exactly 1
        s = torch.linalg.svdvals(x)
        assert (s - 1).abs().max() < tol, (dtype, s)
    torch.testing.assert_close(muon_math.polar_express(u, 5, torch.float32),
                               spec_orthogonalize(u).float(), rtol=1e-4, atol=1e-5)


def test_qkv_pieces_and_lr_multipliers():
    assert muon_math.matrix_pieces((16, 4), [4, 2, 2]) == [(8, 4), (4, 4), (4, 4)]
    assert muon_math.matrix_pieces((12, 3), None) == [(12, 3)]
    assert muon_math.lr_multiplier(3072, 768) == 2.0
    assert muon_math.lr_multiplier(768, 3072) == 1.0
    assert muon_math.reduce_dim((6, 2)) == -1 and muon_math.reduce_dim((2, 6)) == -2


def test_momentum_warmup():
    assert muon_math.momentum_at(0, 0.85, 0.95, 300) == 0.85
    assert muon_math.momentum_at(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert muon_math.momentum_at(1000, 0.85, 0.95, 300) == 0.95
    assert muon_math.momentum_at(0, 0.85, 0.95, 0) == 0.95


def test_imports_no_megatron():
    """The maths is testable without Megatron: importing it loads no ``megatron`` module."""
    code = ("import sys; import parcae_megatron.training.muon_math; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
