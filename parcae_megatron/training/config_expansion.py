"""A Parcae command line expanded into Megatron's: the fixed block flags, ``--preset`` and the
``--config`` YAML turned into flags ahead of the user's own.

The YAML maps Megatron (or Parcae) flag names to values; ``preset:`` expands a named model
size first; ``base:`` names a config this one extends (config_file.py). Precedence:
Parcae's fixed block settings < preset < YAML (base < file) < command line.
"""

from __future__ import annotations

import os
from typing import Any

from parcae_megatron.config_file import flag_present, flag_value, load_config
from parcae_megatron.model.config import ParcaeConfigError
from parcae_megatron.model.presets import PRESETS

# The Parcae block (docs/design.md §2.2) expressed as Megatron flags; always applied first.
BLOCK_ARGS = [
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--disable-bias-linear",
    "--qk-layernorm", "--position-embedding-type", "rope", "--rotary-base", "50000",
    "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
    # RoPE fusion stays on (Megatron's default): TE's fused kernel is the same rotate-half
    # map; fusions.adapt_fusions turns it off where Transformer Engine is missing.
    # Non-finite steps are skipped and counted (training/guards.py) instead of aborting.
    "--no-check-for-nan-in-loss-and-grad",
]

# Preset field -> Megatron flag.
_PRESET_FLAGS = {
    "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups", "kv_channels": "--kv-channels",
    "ffn_hidden_size": "--ffn-hidden-size", "num_prelude_layers": "--num-prelude-layers",
    "num_recurrent_layers": "--num-recurrent-layers", "num_coda_layers": "--num-coda-layers",
    "mean_recurrence": "--mean-recurrence", "mean_backprop_depth": "--mean-backprop-depth",
    "seq_length": "--seq-length",
}


def _flag_items(mapping: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in mapping.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_argv(argv: list[str]) -> list[str]:
    """Turn ``[--config X.yaml] [--preset P] [flags]`` into the full Megatron argv."""
    config_path = flag_value(argv, "--config")
    from_yaml: list[str] = []
    preset = flag_value(argv, "--preset")
    if config_path is not None:
        data = load_config(config_path)  # base: chain merged (config_file.py)
        preset = preset or data.pop("preset", None)
        data.pop("preset", None)
        from_yaml = _flag_items(data)
    from_preset: list[str] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ParcaeConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        from_preset = _flag_items({_PRESET_FLAGS[k][2:]: v for k, v in PRESETS[preset].items()
                                   if k in _PRESET_FLAGS})
        from_preset += ["--max-position-embeddings", str(PRESETS[preset]["seq_length"])]
    full = BLOCK_ARGS + from_preset + from_yaml + list(argv)
    if not flag_present(full, "--num-layers"):
        counts = [flag_value(full, f) for f in ("--num-prelude-layers",
                                                "--num-recurrent-layers", "--num-coda-layers")]
        if all(c is not None for c in counts):
            full += ["--num-layers", str(sum(int(c) for c in counts))]
    return full + _tokenizer_flags(full)


# Megatron tokenizer types whose files data_prep.tokenizer reads; for these the type and the
# files follow from the tokenizer itself, so a config's type cannot contradict its file.
_OWN_TOKENIZER_TYPES = (None, "SentencePieceTokenizer", "HuggingFaceTokenizer")


def _tokenizer_flags(full: list[str]) -> list[str]:
    """``--tokenizer-type``/``--tokenizer-model`` as the ``--tokenizer-model`` file needs them
    (appended: the last occurrence wins); none without a tokenizer model."""
    path = flag_value(full, "--tokenizer-model")
    if path is None or flag_value(full, "--tokenizer-type") not in _OWN_TOKENIZER_TYPES:
        return []
    if not os.path.exists(path):
        return []  # the path check names it, with every other missing path, in one line
    from data_prep.tokenizer import megatron_tokenizer_args

    try:
        return megatron_tokenizer_args(path)
    except FileNotFoundError as err:
        raise ParcaeConfigError(str(err)) from None
