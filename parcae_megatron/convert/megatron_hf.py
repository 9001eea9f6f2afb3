"""Megatron checkpoint ↔ Hugging Face model, the two directions `convert` exposes."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from parcae_megatron.convert.errors import ConversionError
from parcae_megatron.convert.hf_io import (
    DTYPES,
    build_hf_model,
    prepare_output,
    publish,
    read_hf_dir,
)
from parcae_megatron.convert.mapping import (
    hf_config_from_megatron,
    hf_to_megatron_state,
    megatron_overrides_from_hf,
    megatron_to_hf_state,
)
from parcae_megatron.convert.megatron_ckpt import (
    args_for_model,
    build_model,
    load_megatron_model,
    save_release_checkpoint,
    single_process_config,
)


class _Stages:
    """A progress bar over the few long steps of a conversion (each is one big I/O call)."""

    def __init__(self, name: str, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=name, unit="step",
                        bar_format="{desc}: {n_fmt}/{total_fmt}{postfix} [{elapsed}]")

    def next(self, what: str) -> None:
        """Close the previous step and name the next one."""
        if self.bar.postfix:
            self.bar.update()
        self.bar.set_postfix_str(what)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.set_postfix_str("done")
        self.bar.close()

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, *exc) -> None:
        self.close() if exc[0] is None else self.bar.close()


def _tokenizer_ids(args) -> dict:
    """bos/eos/pad ids of the run's tokenizer, when it has one."""
    path = getattr(args, "tokenizer_model", None)
    if not path or not Path(path).exists():
        return {}
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(str(path))
    ids = {"bos": tok.bos, "eos": tok.eos, "pad": tok.pad}
    return {f"{name}_token_id": i for name, i in ids.items() if i is not None and i >= 0}


def megatron_to_hf_model(load: Path, iteration: int | None = None,
                         dtype: str = "float32"):
    """(HF model, tokenizer model path or None, Megatron args) from a Megatron checkpoint."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}")
    model, args, _ = load_megatron_model(load, iteration)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    positions = getattr(args, "max_position_embeddings", None) or args.seq_length
    hf_config = hf_config_from_megatron(model.config, positions, **_tokenizer_ids(args))
    hf_model = build_hf_model(hf_config, megatron_to_hf_state(state, model.config),
                              DTYPES[dtype])
    tokenizer = getattr(args, "tokenizer_model", None)
    tokenizer = Path(tokenizer) if tokenizer and Path(tokenizer).exists() else None
    return hf_model, tokenizer, args


def to_hf(load: Path, out: Path, iteration: int | None = None, dtype: str = "float32",
          tokenizer_model: Path | None = None, overwrite: bool = False) -> dict:
    """Convert a Megatron checkpoint directory to an HF directory; returns a summary."""
    from parcae_megatron.convert.hf_io import write_hf_dir

    start = time.perf_counter()
    prepare_output(out, overwrite)  # fail before the (slow) load
    with _Stages("to-hf", 2) as stages:
        stages.next(f"reading {load}")
        model, tokenizer, _ = megatron_to_hf_model(load, iteration, dtype)
        tokenizer = tokenizer_model or tokenizer
        stages.next(f"writing {out}")
        write_hf_dir(model, out, tokenizer, overwrite)
    params = sum(p.numel() for p in model.parameters())
    return {"out": str(out), "parameters": params, "dtype": dtype,
            "tokenizer": str(tokenizer) if tokenizer else None,
            "seconds": round(time.perf_counter() - start, 2)}


def from_hf(hf_dir: Path, save: Path, tensor_parallel: int = 1, pipeline_parallel: int = 1,
            overwrite: bool = False) -> dict:
    """Convert an HF directory to a Megatron release checkpoint trainable at TP×PP."""
    start = time.perf_counter()
    save = Path(save)
    partial = prepare_output(save, overwrite)
    stages = _Stages("from-hf", 3)
    stages.next(f"reading {hf_dir}")
    hf_config, hf_state = read_hf_dir(hf_dir)
    overrides = megatron_overrides_from_hf(hf_config)
    has_tokenizer = any((Path(hf_dir) / name).exists()
                        for name in ("tokenizer.json", "tokenizer.model"))
    args = args_for_model(overrides, tensor_parallel, pipeline_parallel,
                          Path(hf_dir) if has_tokenizer else None, hf_config.vocab_size)
    cfg = single_process_config(args)
    mismatched = {k: (getattr(cfg, k), v) for k, v in overrides.items()
                  if getattr(cfg, k) != v}
    if mismatched:
        raise ConversionError(f"the Megatron config cannot express these HF settings "
                              f"(megatron, hf): {mismatched}")
    stages.next("building the Megatron model")
    model = build_model(cfg)
    state = hf_to_megatron_state(hf_state, cfg)
    current = model.state_dict()
    for name, tensor in state.items():
        if name not in current:
            raise ConversionError(f"Megatron model has no tensor {name}")
        if current[name].shape != tensor.shape:
            raise ConversionError(f"{name}: shape {tuple(tensor.shape)} in the HF weights, "
                                  f"{tuple(current[name].shape)} in the Megatron model")
    missing = [k for k, v in current.items() if isinstance(v, torch.Tensor) and k not in state]
    if missing:
        raise ConversionError(f"HF weights lack tensors the model needs: {missing[:8]}")
    with torch.no_grad():
        for name, tensor in state.items():
            current[name].copy_(tensor)
    stages.next(f"writing {save}")
    save_release_checkpoint(model, args, partial)
    publish(partial, save)
    stages.close()
    return {"out": str(save), "tensor_parallel": tensor_parallel,
            "pipeline_parallel": pipeline_parallel,
            "seconds": round(time.perf_counter() - start, 2)}
