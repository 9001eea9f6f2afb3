"""Evaluate a Parcae model at several loop counts: loss, perplexity, bits per byte and the
test-time law L(T) = L∞ + Z·exp(−z·T) (docs/design.md §10.3). CLI:
``python -m parcae_megatron.evaluate``; the ``loss`` subcommand scores with ``validation_loss``;
``core`` / ``core-extended`` (``core_cli`` over ``core``, ``core_runner``), ``adaptive``
(``adaptive_cli`` over ``adaptive``: per-token early exit) and ``lambada`` (``lambada``) live in
the modules named.

Programmatic use with a model object::

    from parcae_megatron.evaluate import build_windows, evaluate
    windows = build_windows(512, text_files=["valid.jsonl"], tokenizer=tok, max_tokens=65536)
    report = evaluate(model, windows, iterations=[1, 2, 4, 8], seeds=[0, 1, 2], tokenizer=tok)
"""

from parcae_megatron.evaluate.report import fit_loop_curve, format_table, plot, write_json
from parcae_megatron.evaluate.runner import (
    build_windows,
    evaluate,
    load_hf_model,
    load_hf_tokenizer,
    load_megatron_model,
)
from parcae_megatron.evaluate.validation_loss import default_loop_counts, score

__all__ = ["build_windows", "default_loop_counts", "evaluate", "fit_loop_curve", "format_table",
           "load_hf_model", "load_megatron_model", "load_hf_tokenizer", "plot", "score",
           "write_json"]
