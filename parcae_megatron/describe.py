"""`python -m parcae_megatron.describe PRESET`: resolved config, parameter counts and FLOPs.

Builds the real model on the meta device (no memory is allocated) so the counts are those of
the modules a run would train. Prints one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from parcae_megatron import cli
from parcae_megatron.model.accounting import count_parameters, flops_per_token
from parcae_megatron.model.config import ParcaeConfig, ParcaeConfigError
from parcae_megatron.model.presets import preset_config, preset_names

_SHOWN = ("num_prelude_layers", "num_recurrent_layers", "num_coda_layers", "num_layers",
          "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
          "kv_channels", "vocab_size", "seq_length", "mean_recurrence", "mean_backprop_depth",
          "injection_type", "state_init", "prelude_norm", "depth_sampling", "loop_execution",
          "value_embeddings", "rotary_base", "layernorm_epsilon", "init_method_std",
          "init_decay", "normalization")


def build_on_meta(config: ParcaeConfig) -> torch.nn.Module:
    """The full (TP=1, PP=1) model with meta tensors: shapes only, no memory."""
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from parcae_megatron.model.parcae_model import ParcaeModel
    from parcae_megatron.platform.dist import init_distributed

    init_distributed()
    config.use_cpu_initialization = True
    with torch.device("meta"):
        return ParcaeModel(config, get_parcae_layer_local_spec())


def describe(config: ParcaeConfig) -> dict:
    """Resolved configuration, parameter counts and FLOPs per token of ``config``."""
    counts = count_parameters(build_on_meta(config))
    resolved = {k: getattr(config, k) for k in _SHOWN}
    return {
        "config": resolved,
        **counts,
        "flops_per_token": flops_per_token(config, counts),
        "executed_layers_per_token": (config.num_prelude_layers + config.num_coda_layers
                                      + config.num_recurrent_layers * config.mean_recurrence
                                      if config.is_looped else config.num_layers),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(
        prog="python -m parcae_megatron.describe",
        description="Print a preset's resolved configuration, parameter counts (total, "
                    "embedding, recurrent, per stage) and training FLOPs per token as JSON.")
    parser.add_argument("preset", help=f"one of: {', '.join(preset_names())}")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set mean_recurrence=4")
    args = parser.parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(ParcaeConfig)}
    overrides = {}
    try:
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in fields:
                raise ParcaeConfigError(f"unknown config field {key!r}")
            overrides[key] = json.loads(value) if value[:1] in "-0123456789tfn[{" else value
        config = preset_config(args.preset, **overrides)
    except (ParcaeConfigError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(describe(config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
