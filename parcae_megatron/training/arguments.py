"""Parcae's command-line flags (Megatron's ``extra_args_provider``) and the model config a
parsed namespace gives, as Megatron-LM's ``arguments.py`` does for GPT.

A run is ``python -m parcae_megatron.train --config CONFIG.yaml [any Megatron flag ...]``; the
YAML and ``--preset`` are expanded into flags by ``config_expansion.py``, and the parsed
namespace is checked by ``validation.py``.
"""

from __future__ import annotations

import argparse
import sys

from parcae_megatron.model.config import (
    DEPTH_BALANCES,
    DEPTH_SAMPLINGS,
    INJECTION_TYPES,
    LOOP_EXECUTIONS,
    STATE_INITS,
    ParcaeConfig,
)

PACKINGS = ("concat", "bestfit")


def add_parcae_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: Parcae's own flags."""
    g = parser.add_argument_group("Parcae", "looped prelude / recurrent / coda model")
    g.add_argument("--config", type=str, default=None,
                   help="YAML run config (expanded before parsing; recorded for provenance)")
    g.add_argument("--preset", type=str, default=None, help="named model size (see describe)")
    g.add_argument("--num-prelude-layers", type=int, default=None)
    g.add_argument("--num-recurrent-layers", type=int, default=None)
    g.add_argument("--num-coda-layers", type=int, default=None)
    g.add_argument("--mean-recurrence", type=int, default=8, help="μ_rec")
    g.add_argument("--mean-backprop-depth", type=int, default=4, help="μ_bwd")
    g.add_argument("--injection-type", choices=INJECTION_TYPES, default="diagonal")
    g.add_argument("--state-init", choices=STATE_INITS, default="like_init")
    g.add_argument("--no-prelude-norm", dest="prelude_norm", action="store_false")
    g.add_argument("--depth-sampling", choices=DEPTH_SAMPLINGS, default="per_sequence")
    g.add_argument("--depth-balance", choices=DEPTH_BALANCES, default="independent",
                   help="global: draw the global batch's depths per step and deal them so "
                        "data-parallel replicas do equal loop work")
    g.add_argument("--loop-execution", choices=LOOP_EXECUTIONS, default="compact")
    g.add_argument("--recompute-loop-iterations", action="store_true",
                   help="checkpoint each gradient iteration of the loop (store only the loop "
                        "state between iterations); composes with --recompute-granularity")
    g.add_argument("--no-value-embeddings", dest="value_embeddings", action="store_false")
    g.add_argument("--qk-layernorm-epsilon", type=float, default=None,
                   help="QK-norm epsilon (default: --norm-epsilon)")
    g.add_argument("--depth-seed", type=int, default=514229,
                   help="seed of the sampled loop depths and of the initial loop state h0")
    g.add_argument("--init-seed", type=int, default=None,
                   help="seed of the initial weights (default: --seed); --seed keeps the "
                        "data order, so weights can vary with the data fixed")
    g.add_argument("--parcae-pipeline-layout", type=str, default=None,
                   help="stages separated by '|': p prelude layer, R recurrent block, "
                        "c coda layer (e.g. 'pp|R|cc')")
    g.add_argument("--eval-loop-counts", type=int, nargs="*", default=None,
                   help="validation loop counts T (default 1 2 4 μ_rec 2·μ_rec)")
    g.add_argument("--telemetry-path", type=str, default=None,
                   help="JSONL telemetry file (default: SAVE/telemetry.jsonl)")
    g.add_argument("--telemetry-interval", type=int, default=10,
                   help="steps between stability telemetry (state norms, spectra)")
    g.add_argument("--straggler-window", type=int, default=100,
                   help="steps per straggler report (time per executed FLOP per rank; 0: off)")
    g.add_argument("--straggler-factor", type=float, default=1.2,
                   help="flag a rank whose time per executed FLOP exceeds the median over "
                        "ranks by this factor")
    g.add_argument("--max-consecutive-skipped", type=int, default=10,
                   help="stop the run after this many non-finite steps in a row")
    # TransformerConfig.tp_only_amax_red has no Megatron-LM flag in 0.19; the config builder
    # copies this attribute into the model config.
    g.add_argument("--tp-only-amax-red", action="store_true",
                   help="FP8 delayed scaling: reduce amaxes within tensor parallelism only "
                        "(required for delayed scaling, see flag_policy)")
    q = parser.add_argument_group("Parcae quality while training", "CORE and greedy samples "
                                  "on the training ranks (docs/training.md)")
    q.add_argument("--eval-core-interval", type=int, default=0,
                   help="score CORE every N steps (0: off); needs --eval-core-bundle and a "
                        "text tokenizer (--tokenizer-model)")
    q.add_argument("--eval-core-bundle", type=str, default=None,
                   help="unzipped DCLM/nanochat eval bundle (eval_meta_data.csv, eval_data/)")
    q.add_argument("--eval-core-tasks-yaml", type=str, default=None,
                   help="task list (default: the 22 CORE tasks of the shipped list)")
    q.add_argument("--eval-core-loops", type=int, nargs="+", default=None,
                   help="loop counts T to score (default 1, μ_rec, 2·μ_rec)")
    q.add_argument("--eval-core-max-per-task", type=int, default=500,
                   help="records per task after the seed-1337 shuffle (0: all)")
    q.add_argument("--eval-core-seed", type=int, default=1234,
                   help="few-shot draw and h0 seed (one of evaluate core's --seeds)")
    q.add_argument("--sample-interval", type=int, default=0,
                   help="every N steps, greedy continuations of a few fixed prompts at "
                        "T = μ_rec to the log and the telemetry sinks (0: off)")
    q.add_argument("--sample-tokens", type=int, default=32,
                   help="tokens per sample (one forward each: no KV cache in training)")
    r = parser.add_argument_group("Parcae recipe", "the authors' optimizer and packing "
                                  "(docs/recipe.md)")
    r.add_argument("--muon-lr", type=float, default=None,
                   help="peak LR of the Muon group (default: --lr); same schedule shape")
    r.add_argument("--muon-start-weight-decay", type=float, default=None,
                   help="Muon group's weight decay at step 0 (default: Megatron's schedule); "
                        "follows --weight-decay-incr-style to --muon-end-weight-decay")
    r.add_argument("--muon-end-weight-decay", type=float, default=None,
                   help="Muon group's weight decay at the last step")
    r.add_argument("--muon-beta2", type=float, default=0.95,
                   help="parcae_muon: EMA rate of the factored second moment")
    r.add_argument("--muon-ns-dtype", choices=("bf16", "fp32"), default="bf16",
                   help="parcae_muon: dtype of the Polar Express (Newton-Schulz) iterations "
                        "(default bf16, the authors'); --muon-fp32-matmul-prec keeps "
                        "Megatron's meaning (torch's float32 matmul precision)")
    r.add_argument("--muon-momentum-warmup-start", type=float, default=0.85,
                   help="parcae_muon: momentum at step 0, rising linearly to --muon-momentum")
    r.add_argument("--muon-momentum-warmup-iters", type=int, default=300,
                   help="parcae_muon: optimizer steps of the momentum warm-up (0: none)")
    r.add_argument("--packing", choices=PACKINGS, default="concat",
                   help="concat: Megatron's GPT samples (documents concatenated); bestfit: "
                        "BOS-aligned best-fit packing with crop (the authors')")
    r.add_argument("--packing-buffer", type=int, default=1000,
                   help="bestfit: documents held in the best-fit buffer")
    return parser


def parcae_config_from_args(args: argparse.Namespace,
                            vocab_size: int | None = None) -> ParcaeConfig:
    """The model config of a parsed Megatron+Parcae namespace (Megatron's padded vocabulary
    unless ``vocab_size`` is given)."""
    from megatron.training.arguments import core_transformer_config_from_args

    saved = args.vocab_size, getattr(args, "init_seed", None)
    args.vocab_size = vocab_size or args.padded_vocab_size
    # Copied into ParcaeConfig.init_seed by field name; --init-seed defaults to --seed.
    args.init_seed = args.seed if saved[1] is None else saved[1]
    try:
        return core_transformer_config_from_args(args, config_class=ParcaeConfig)
    finally:
        args.vocab_size, args.init_seed = saved


def set_megatron_argv(argv: list[str]) -> list[str]:
    """Make ``argv`` (a Parcae command line after ``--config`` / ``--preset`` expansion) the
    process's ``sys.argv``; returns the previous ``sys.argv`` for a caller that restores it.

    Megatron-LM's ``parse_args`` has no argv parameter: it reads ``sys.argv``, and a training
    run re-reads it later (e.g. for fault tolerance), so the
    trainer leaves the rewrite in place. The only writer of ``sys.argv`` in the package.
    """
    previous = sys.argv
    sys.argv = [previous[0] if previous else "parcae_megatron", *argv]
    return previous
