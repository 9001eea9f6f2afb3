"""Load a model and its tokenizer, build the evaluation data, score, fit, report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from parcae_megatron.evaluate.data import (
    TokenWindows,
    indexed_token_stream,
    make_windows,
    text_token_stream,
    token_byte_lengths,
)
from parcae_megatron.evaluate.report import fit_loop_curve
from parcae_megatron.evaluate.validation_loss import default_loop_counts, score


def load_hf_tokenizer(path: str, vocab_size: int | None = None):
    """The ``transformers`` tokenizer that evaluation calls, for the tokenizer at ``path``
    (found by ``data_prep.tokenizer.resolve_tokenizer``: a SentencePiece model becomes our
    ``ParcaeTokenizer``, a ``tokenizer.json`` a ``PreTrainedTokenizerFast``; no remote code
    runs). Refused (ValueError) without a usable BOS, or with more tokens than the model's
    ``vocab_size``."""
    from data_prep.tokenizer import SentencePieceTokenizer, load_tokenizer, resolve_tokenizer

    kind, model_file = resolve_tokenizer(path)
    if kind == SentencePieceTokenizer.kind:
        from parcae_megatron.hf.tokenization_parcae import ParcaeTokenizer, check_sentencepiece

        check_sentencepiece(model_file, vocab_size)
        return ParcaeTokenizer(vocab_file=model_file)
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(model_file)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {model_file} has {tok.vocab_size} tokens but the model's "
                         f"vocabulary has {vocab_size} rows: wrong tokenizer?")
    config = tok.hf_config()
    config.pop("tokenizer_class")
    return PreTrainedTokenizerFast(tokenizer_file=model_file, **config)


def _has_tokenizer(hf_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(hf_dir, name))
               for name in ("tokenizer.json", "tokenizer.model"))


def load_hf_model(hf_dir: str):
    """(model, tokenizer or None) from one of our HF exports (safetensors only)."""
    from parcae_megatron.convert.hf_io import load_hf_model as load_hf_dir

    model = load_hf_dir(Path(hf_dir))
    return model, (load_hf_tokenizer(hf_dir, model.config.vocab_size)
                   if _has_tokenizer(hf_dir) else None)


def load_megatron_model(load_dir: str):
    """(model, tokenizer or None) from a Megatron checkpoint directory via the converter
    (``--load``; the tokenizer is the run's ``--tokenizer-model`` when it still exists)."""
    from parcae_megatron.convert.megatron_hf import megatron_to_hf_model

    model, tokenizer_model, *_ = megatron_to_hf_model(Path(load_dir))
    tokenizer = (load_hf_tokenizer(str(tokenizer_model), model.config.vocab_size)
                 if tokenizer_model else None)
    return model.eval(), tokenizer


def build_windows(seq_length: int, *, data_prefix: str | None = None,
                  text_files: list[str] | None = None, tokenizer=None,
                  max_tokens: int | None = None, max_sequences: int | None = None,
                  text_key: str = "text") -> TokenWindows:
    """Windows from an indexed dataset or text files (which need ``tokenizer``)."""
    if (data_prefix is None) == (not text_files):
        raise ValueError("give exactly one of an indexed dataset prefix and text files")
    cap = max_tokens
    if max_sequences is not None:
        cap = min(cap or max_sequences * seq_length, max_sequences * seq_length)
    if data_prefix is not None:
        stream, docs = indexed_token_stream(data_prefix, cap)
        source = f"indexed:{data_prefix}"
    else:
        if tokenizer is None:
            raise ValueError("text inputs need a tokenizer (tokenizer.json or tokenizer.model "
                             "in the HF directory, or --tokenizer)")
        stream, docs = text_token_stream(text_files, tokenizer, cap, text_key)
        source = "text:" + ",".join(text_files)
    return TokenWindows(make_windows(stream, seq_length, max_tokens, max_sequences), source,
                        docs)


def evaluate(model, windows: TokenWindows, *, iterations: list[int] | None = None,
             seeds: list[int] = (0,), batch_size: int = 4, tokenizer=None,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             progress: bool = True, model_name: str = "model") -> dict:
    """Score ``windows`` at each loop count and seed, fit L(T); return the report dict.

    ``model`` is a ``ParcaeForCausalLM`` (moved to ``device``/``dtype`` if given); ``tokenizer``
    enables bits per byte. ``iterations`` defaults to 1, 2, 4, …, 2·μ_rec.
    """
    cfg = model.config
    mu = int(cfg.mean_recurrence)
    iterations = sorted(set(iterations or default_loop_counts(mu)))
    if iterations[0] < 1:
        raise ValueError("loop counts must be >= 1")
    longest = max(len(w) for w in windows.windows) - 1
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"seq_length {longest} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if int(max(w.max() for w in windows.windows)) >= cfg.vocab_size:
        raise ValueError(f"token ids reach beyond the model's vocabulary ({cfg.vocab_size}); "
                         f"wrong dataset or tokenizer?")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    byte_lengths = (token_byte_lengths(tokenizer, cfg.vocab_size)
                    if tokenizer is not None else None)
    start = time.time()
    rows = score(model, windows.windows, iterations, list(seeds), batch_size, byte_lengths,
                 progress)
    return {
        "model": model_name,
        "data": {"source": windows.source, "documents": windows.documents,
                 "sequences": len(windows.windows),
                 "seq_length": int(max(len(w) for w in windows.windows) - 1),
                 "tokens_scored": windows.targets},
        "mean_recurrence": mu,
        "seeds": rows[0]["seeds"],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "loss_definition": "mean next-token NLL in nats over all targets (Megatron's lm loss)",
        "bpb_definition": ("NLL over non-special targets / (ln 2 x their UTF-8 bytes)"
                           if byte_lengths is not None else "unavailable: no tokenizer"),
        "results": rows,
        # noise: the standard error over h₀ seeds of the mean loss at each T
        "fit": fit_loop_curve([r["T"] for r in rows], [r["loss"] for r in rows], mu,
                              noise=max(r["loss_std"] or 0.0 for r in rows)
                              / len(rows[0]["seeds"]) ** 0.5),
        "elapsed_s": round(time.time() - start, 3),
        "tokens_per_s": round(windows.targets * len(iterations) * len(rows[0]["seeds"])
                              / max(time.time() - start, 1e-9), 1),
    }


def parse_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` → torch dtype."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return table[name]

