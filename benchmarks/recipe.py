"""The authors' training recipe against the previous configs, on the CPU backend.

Trains the tiny Parcae (``parcae-tiny``, same init, same seed) for N steps twice on an embedded
byte-level corpus (paragraphs of this Python's standard library, <bos> text <eos>):

- ``previous``: the configs before this recipe: Megatron's ``muon`` (emerging-optimizers Polar
  Express coefficients, shape scaling, Nesterov 0.95, no weight decay, no variance rescale),
  Megatron's concatenating GPTDataset;
- ``recipe``: ``parcae_muon`` (momentum 0.85→0.95, NorMuon rescale, cautious wd 0.2→0) and
  BOS-aligned best-fit packing.

Both use AdamW (0.8, 0.95, 1e-10, wd 0) for the non-matrix parameters, the trapezoid LR and clip
1.0. Reported: the mean training loss of the last 10 steps and the validation loss on the same
held-out rows (concatenated, T = μ_rec), and the optimizer-step time of the recipe's Muon
against AdamW on every parameter: the two optimizers step alternately (one warm-up round,
then ``--repeats`` rounds; benchmarks/timing.py), reported as medians with their min–max and
the ratio taken round by round. One JSON line last.

Usage: python benchmarks/recipe.py [--steps N] [--repeats N] [--optimizer-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch
from timing import Timings, alternate

from parcae_megatron.platform.dist import init_distributed

BOS, EOS, PAD, OFFSET, VOCAB = 1, 2, 3, 4, 320
SEQ, MBS, SEED = 128, 8, 1234


class ByteTokenizer:
    """The tokenizer fields Megatron's datasets read (bytes shifted by OFFSET)."""

    bos, eod, pad, vocab_size = BOS, EOS, PAD, VOCAB
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": VOCAB}


def write_corpus(prefix: str, max_docs: int = 3000) -> int:
    """Paragraphs of the standard library as byte-level documents; returns the count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    count = 0
    for path in sorted(Path(json.__file__).parent.parent.glob("*.py")):
        for para in path.read_bytes().split(b"\n\n"):
            if len(para) < 16:
                continue
            doc = numpy.concatenate([[BOS], numpy.frombuffer(para[:1500], numpy.uint8)
                                     .astype(numpy.int64) + OFFSET, [EOS]])
            builder.add_document(torch.from_numpy(doc), [len(doc)])
            count += 1
            if count == max_docs:
                builder.finalize(prefix + ".idx")
                return count
    builder.finalize(prefix + ".idx")
    return count


def datasets(prefix: str, cache: str, packing: str, num_train: int, num_valid: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from parcae_megatron.data.bestfit import BestFitDatasetConfig, dataset_class

    cfg = BestFitDatasetConfig(
        random_seed=SEED, sequence_length=SEQ, tokenizer=ByteTokenizer(), blend=([prefix], None),
        split="95,5,0", reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache,
        packing_buffer=1000)
    train, _, _ = BlendedMegatronDatasetBuilder(
        dataset_class(packing, False), [num_train, 0, 0], lambda: True, cfg).build()
    _, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class("concat", False), [0, num_valid, 0], lambda: True, cfg).build()
    return train, valid


def build(recipe: bool, steps: int):
    """Model (same init every call), DDP, optimizer and scheduler for one recipe."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from parcae_megatron.model import ParcaeModel, preset_config
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from parcae_megatron.training import megatron_patches, muon_optimizer

    init_distributed(seed=SEED)
    cfg = preset_config("parcae-tiny", vocab_size=VOCAB, seq_length=SEQ,
                        use_cpu_initialization=True)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    ddp = DistributedDataParallel(config=cfg, module=model,
                                  ddp_config=DistributedDataParallelConfig(
                                      grad_reduce_in_fp32=True))
    cfg.finalize_model_grads_func = finalize_model_grads
    common = dict(lr=3e-3, min_lr=0.0, weight_decay=0.0, clip_grad=1.0, adam_beta1=0.8,
                  adam_beta2=0.95, adam_eps=1e-10, muon_nesterov=True, muon_num_ns_steps=5,
                  muon_fp32_matmul_prec="high")
    sched = dict(init_lr=0.0, max_lr=3e-3, min_lr=0.0, lr_warmup_steps=0,
                 lr_decay_steps=steps, lr_decay_style="WSD", wsd_decay_steps=steps // 2,
                 lr_wsd_decay_style="linear", start_wd=0.0, end_wd=0.0,
                 wd_incr_steps=steps, wd_incr_style="linear",
                 use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False)
    megatron_patches.register_parcae_muon()
    if recipe:
        config = OptimizerConfig(optimizer="parcae_muon", muon_tp_mode="duplicated", **common)
        config.muon_ns_dtype = "fp32"  # as --muon-ns-dtype fp32 (the CPU configs)
        overrides = muon_optimizer.recipe_overrides(get_standard_config_overrides(config),
                                                    3e-3, 0.2, 0.0)
        optimizer = get_megatron_optimizer(config, [ddp], config_overrides=overrides)
        scheduler = muon_optimizer.RecipeParamScheduler(
            optimizer, momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_iters=300,
            samples_per_iteration=1, **sched)
    else:
        config = OptimizerConfig(optimizer="muon", muon_momentum=0.95,
                                 muon_coefficient_type="polar_express",
                                 muon_scale_mode="shape_scaling", **common)
        optimizer = get_megatron_optimizer(config, [ddp])
        scheduler = OptimizerParamScheduler(optimizer, **sched)
    return model, ddp, optimizer, scheduler


def batches(dataset, steps: int):
    for step in range(steps):
        rows = [dataset[step * MBS + i] for i in range(MBS)]
        yield (torch.stack([r["tokens"] for r in rows]), torch.stack([r["labels"] for r in rows]))


def train(recipe: bool, steps: int, train_ds, valid_ds) -> dict:
    model, ddp, optimizer, scheduler = build(recipe, steps)
    losses = []
    for step, (tokens, labels) in enumerate(batches(train_ds, steps)):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        model.depth_sampler.start_step(step)
        loss = ddp(tokens, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        optimizer.step()
        scheduler.step(1)
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        valid = [float(model(t, labels=y).float().mean()) for t, y in batches(valid_ds, 4)]
    return {"train_loss_last10": sum(losses[-10:]) / 10, "valid_loss": sum(valid) / len(valid),
            "train_loss_first": losses[0]}


def optimizer_step(recipe: bool):
    """A callable doing one training step that returns the seconds of its optimizer.step():
    the recipe's Muon + AdamW, or AdamW everywhere."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model, ddp, optimizer, _ = build(True, 10)
    if not recipe:
        ddp = DistributedDataParallel(config=model.config, module=model,
                                      ddp_config=DistributedDataParallelConfig(
                                          grad_reduce_in_fp32=True))
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=3e-3, adam_beta1=0.8, adam_beta2=0.95,
                            adam_eps=1e-10, weight_decay=0.0, clip_grad=1.0), [ddp])
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=torch.Generator().manual_seed(0))
    steps = [0]

    def step() -> float:
        ddp.zero_grad_buffer()
        model.depth_sampler.start_step(steps[0])
        steps[0] += 1
        ddp(tokens, labels=tokens).float().mean().backward()
        ddp.finish_grad_sync()
        start = time.perf_counter()  # the optimizer step alone
        optimizer.step()
        return time.perf_counter() - start
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=20,
                        help="optimizer-step rounds (Muon, AdamW alternated)")
    parser.add_argument("--optimizer-only", action="store_true",
                        help="time the optimizer steps only (skip the two training runs)")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    torch.set_num_threads(1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "stdlib")
        docs = write_corpus(prefix)
        for name, packing in (() if args.optimizer_only else
                              (("previous", "concat"), ("recipe", "bestfit"))):
            train_ds, valid_ds = datasets(prefix, str(Path(tmp) / "cache"), packing,
                                          args.steps * MBS, 4 * MBS)
            start = time.perf_counter()
            runs[name] = train(name == "recipe", args.steps, train_ds, valid_ds)
            runs[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name:9s} ({packing:7s}): train loss {runs[name]['train_loss_first']:.3f} "
                  f"→ {runs[name]['train_loss_last10']:.3f}, valid loss "
                  f"{runs[name]['valid_loss']:.3f} ({runs[name]['seconds']} s)", flush=True)
    opt = Timings(alternate({"muon": optimizer_step(True), "adam": optimizer_step(False)},
                            args.repeats))
    ratio = opt.ratio("muon", "adam")
    print(f"optimizer step, median [min–max] over {args.repeats} alternated rounds: recipe "
          f"Muon+AdamW {opt.time('muon').text(1e3, '.1f')} ms, AdamW "
          f"{opt.time('adam').text(1e3, '.1f')} ms (×{ratio.text(fmt='.2f')})")
    result = {
        "benchmark": "recipe", "steps": args.steps, "documents": docs, "seq_length": SEQ,
        "micro_batch": MBS, "previous": runs.get("previous"), "recipe": runs.get("recipe"),
        "valid_loss_ratio_recipe_over_previous": round(
            runs["recipe"]["valid_loss"] / runs["previous"]["valid_loss"], 4) if runs else None,
        **opt.time("muon").flat("muon_step_s"), **opt.time("adam").flat("adam_step_s"),
        "repeats": args.repeats, **ratio.flat("muon_over_adam_step_time"),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
