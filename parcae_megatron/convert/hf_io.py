"""Hugging Face model directories: write (safetensors + config + code + tokenizer), read.

Reading never executes the directory's code and never unpickles: config.json is parsed as
JSON and weights come from safetensors files only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from parcae_megatron.convert.errors import ConversionError
from parcae_megatron.hf.configuration_parcae import ParcaeConfig as HFConfig
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM, rename_recurrent_keys

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Refuse an existing ``out`` unless ``overwrite``; return the scratch dir to write into
    (renamed to ``out`` by ``publish`` only when everything is written)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    return partial


def publish(partial: Path, out: Path) -> None:
    """Move a finished scratch directory to its final name (replacing an old one)."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    partial.rename(out)


def build_hf_model(config: HFConfig, state: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> ParcaeForCausalLM:
    """An HF model holding exactly ``state`` (strict: every key present, no extras)."""
    with torch.device("meta"):
        model = ParcaeForCausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(f"weights do not match the config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    for name, ref in model.state_dict().items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ConversionError(f"{name}: shape {tuple(state[name].shape)} in the weights, "
                                  f"{tuple(ref.shape)} expected from the config")
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               for k, v in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def write_hf_dir(model: ParcaeForCausalLM, out: Path, tokenizer_model: Path | None,
                 overwrite: bool) -> Path:
    """Save ``model`` (+ code, + tokenizer) to ``out`` atomically. A SentencePiece tokenizer
    comes with its ``tokenizer.json`` copy where one gives the same ids
    (``convert.fast_tokenizer``): ``AutoTokenizer`` is then a fast tokenizer, as for a
    ``tokenizer.json`` tokenizer."""
    from data_prep.tokenizer import HFTokenizer, load_tokenizer, resolve_tokenizer
    from parcae_megatron.convert.fast_tokenizer import save_sentencepiece
    from parcae_megatron.hf.tokenization_parcae import check_sentencepiece

    fast = None  # a tokenizer.json tokenizer, shipped as tokenizer.json + tokenizer_config.json
    if tokenizer_model is not None:
        try:  # before anything is written: a tokenizer the model cannot use is refused
            kind, tokenizer_file = resolve_tokenizer(tokenizer_model)
            if kind == HFTokenizer.kind:
                fast = load_tokenizer(tokenizer_file)
                if fast.vocab_size > model.config.vocab_size:
                    raise ValueError(f"tokenizer {tokenizer_file} has {fast.vocab_size} tokens "
                                     f"but the model's vocabulary has "
                                     f"{model.config.vocab_size} rows: wrong tokenizer?")
            else:
                check_sentencepiece(tokenizer_file, model.config.vocab_size)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConversionError(str(exc).splitlines()[0]) from exc
    partial = prepare_output(out, overwrite)
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(partial, safe_serialization=True)
    if fast is not None:
        fast.save_pretrained(str(partial))
    elif tokenizer_model is not None:  # + its verified tokenizer.json when it has one
        save_sentencepiece(Path(tokenizer_file), partial)
    publish(partial, Path(out))
    return Path(out)


def read_hf_dir(path: Path) -> tuple[HFConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an HF Parcae directory; safetensors only, checked for damage.
    The recurrent block's tensors are ``transformer.recurrent.*`` even when the directory
    stores them under their former name ``transformer.core_block.*``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ConversionError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_file} is not valid JSON: {exc}") from exc
    if raw.get("model_type") != "parcae":
        raise ConversionError(f"{path} holds a {raw.get('model_type')!r} model, not Parcae")
    try:
        config = HFConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{config_file}: {exc}") from exc
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{path} has no model.safetensors (pickled weights are not read; "
                              "convert them to safetensors first)")
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(files, desc="reading shards", unit="file", disable=len(files) < 2):
        file = path / name
        if not file.exists():
            raise ConversionError(f"missing weight shard {file}")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"corrupt weight shard {file}: {exc}") from exc
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state.get("transformer.wte.weight")
    return config, rename_recurrent_keys(state)  # exports written before the rename, too


def load_hf_model(path: Path) -> ParcaeForCausalLM:
    """One of our HF exports as a ``ParcaeForCausalLM``: our own classes (no remote code
    runs, nothing is unpickled), weights in their stored dtype."""
    if not Path(path).is_dir():
        raise ConversionError(f"HF directory not found: {path}")
    return build_hf_model(*read_hf_dir(Path(path)))
