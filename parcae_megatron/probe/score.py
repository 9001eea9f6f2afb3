"""Exact-match accuracy of a trained checkpoint on held-out chains, by k and loop count T."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import torch


def load_test(path: Path, tokenizer) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
    """Token ids of the test documents and, per document, (k, answer position, answer id)."""
    rows, answers = [], []
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        ids = tokenizer.tokenize(doc["text"])
        if len(ids) != len(doc["text"]):
            raise ValueError("the probe tokenizer must give one token per character")
        rows.append(ids)
        answers.append([(k, off, ids[off]) for (k, _, _), off in
                        zip(doc["queries"], doc["answer_offsets"])])
    return torch.tensor(rows), answers


@torch.inference_mode()
def accuracy_by_k(model, ids: torch.Tensor, answers: list, loop_counts: list[int],
                  batch_size: int = 64) -> dict[int, dict[int, float]]:
    """{T: {k: exact-match accuracy}}: argmax at the query letter must be f^k(x)."""
    out: dict[int, dict[int, float]] = {}
    for t in loop_counts:
        hits: dict[int, list[int]] = defaultdict(list)
        for start in range(0, len(ids), batch_size):
            batch = ids[start: start + batch_size].to(next(model.parameters()).device)
            kwargs = {"num_iterations": t, "state_seed": 0} if t else {}
            pred = model(batch, use_cache=False, **kwargs).logits.argmax(-1)
            for row, doc in enumerate(answers[start: start + batch_size]):
                for k, pos, target in doc:
                    hits[k].append(int(pred[row, pos - 1].item() == target))
        out[t] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    return out


def score_checkpoint(ckpt: Path, test_jsonl: Path, tokenizer_model: Path,
                     loop_counts: list[int] | None = None) -> dict:
    """Load a Megatron checkpoint through the converter and score it at ``loop_counts``
    (default T = 1 … 2·μ_rec); T is ignored (reported as 0) without a recurrent block."""
    from data_prep.tokenizer import load_tokenizer
    from parcae_megatron.convert.megatron_hf import megatron_to_hf_model

    model, _, _ = megatron_to_hf_model(ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    looped = bool(model.config.num_recurrent_layers)
    ids, answers = load_test(test_jsonl, load_tokenizer(str(tokenizer_model)))
    mu = int(model.config.mean_recurrence)
    counts = (loop_counts or list(range(1, 2 * mu + 1))) if looped else [0]
    table = accuracy_by_k(model, ids, answers, counts)
    params = sum(p.numel() for p in model.parameters())
    queries = Counter(k for doc in answers for k, _, _ in doc)
    return {"looped": looped, "parameters": params,
            "queries_by_k": {str(k): n for k, n in sorted(queries.items())},
            "mean_recurrence": mu if looped else None,
            "accuracy": {str(t): {str(k): a for k, a in row.items()} for t, row in table.items()}}
