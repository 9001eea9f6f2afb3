"""Validation loss, perplexity and bits per byte of token windows at several loop counts T
and initial-state seeds: the scoring of ``evaluate loss`` and of ``adaptive``'s fixed-T curve."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F


def default_loop_counts(mean_recurrence: int) -> list[int]:
    """1, 2, 4, … (powers of two below 2·μ_rec) plus μ_rec and 2·μ_rec."""
    counts = {mean_recurrence, 2 * mean_recurrence}
    t = 1
    while t < 2 * mean_recurrence:
        counts.add(t)
        t *= 2
    return sorted(counts)


def _batches(windows: list[np.ndarray], batch_size: int) -> list[torch.Tensor]:
    """Equal-length windows stacked ``batch_size`` at a time (the short tail goes alone)."""
    by_len: dict[int, list[np.ndarray]] = defaultdict(list)
    for w in windows:
        by_len[len(w)].append(w)
    out = []
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        out += [torch.from_numpy(np.stack(group[i: i + batch_size]))
                for i in range(0, len(group), batch_size)]
    return out


@torch.inference_mode()
def score(model, windows: list[np.ndarray], iterations: list[int], seeds: list[int],
          batch_size: int = 4, byte_lengths: np.ndarray | None = None,
          progress: bool = True) -> list[dict]:
    """Per loop count T: next-token loss averaged over seeds, perplexity, bits per byte.

    ``model`` is a ``ParcaeForCausalLM`` (device and dtype already set); seed s fixes the
    initial state h0 via ``state_seed=s``. Per seed, ``loss`` is the mean NLL (nats) over all
    targets, Megatron's validation loss. ``bpb`` follows the authors' val-loss task: NLL summed
    over targets that stand for text (non-special, ``byte_lengths > 0``) divided by ln 2 × their
    UTF-8 bytes; it needs ``byte_lengths``.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    batches = _batches(windows, batch_size)
    table = None if byte_lengths is None else torch.as_tensor(byte_lengths, device=device)
    if model.config.state_init == "zero":
        seeds = seeds[:1]  # h0 = 0 does not depend on the seed
    results = []
    bar = tqdm(total=len(iterations) * len(seeds) * len(batches), unit="batch",
               disable=not progress, dynamic_ncols=True)
    try:
        for t in iterations:
            per_seed = []
            for seed in seeds:
                bar.set_description(f"T={t} seed={seed}")
                nll = count = text_nll = text_bytes = text_count = 0.0
                for batch in batches:
                    batch = batch.to(device)
                    logits = model(batch[:, :-1], num_iterations=t, state_seed=seed,
                                   use_cache=False).logits
                    targets = batch[:, 1:]
                    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             reduction="none").double()
                    nll += losses.sum().item()
                    count += losses.numel()
                    if table is not None:
                        nbytes = table[targets.flatten()]
                        is_text = nbytes > 0
                        text_nll += losses[is_text].sum().item()
                        text_bytes += nbytes.sum().item()
                        text_count += is_text.sum().item()
                    bar.update()
                per_seed.append({"seed": seed, "loss": nll / count,
                                 "bpb": (text_nll / (math.log(2) * text_bytes)
                                         if text_bytes else None),
                                 "text_loss": text_nll / text_count if text_count else None})
                bar.set_postfix(loss=f"{per_seed[-1]['loss']:.4f}")
            results.append(_summarise(t, per_seed, int(count), int(text_count),
                                      int(text_bytes)))
    finally:
        bar.close()
    return results


def _summarise(t: int, per_seed: list[dict], tokens: int, text_tokens: int,
               text_bytes: int) -> dict:
    def stats(key: str) -> tuple[float | None, float | None]:
        values = [r[key] for r in per_seed if r[key] is not None]
        if not values:
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    loss, loss_std = stats("loss")
    bpb, bpb_std = stats("bpb")
    text_loss, _ = stats("text_loss")
    return {"T": t, "loss": loss, "loss_std": loss_std, "perplexity": math.exp(loss),
            "bpb": bpb, "bpb_std": bpb_std, "text_loss": text_loss,
            "loss_per_seed": [r["loss"] for r in per_seed], "seeds": [r["seed"] for r in per_seed],
            "tokens": tokens, "text_tokens": text_tokens if text_bytes else None,
            "bytes": text_bytes or None}
