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


def hop_index(path: Path, tokenizer) -> list[list[dict[int, int]]]:
    """Per test document and query, {token id of f^j(x): j} over the whole cycle (j = 0 …
    n_symbols − 1): which hop count a predicted letter answers."""
    from parcae_megatron.probe.task import follow, parse

    out = []
    for line in path.read_text().splitlines():
        table, queries = parse(json.loads(line)["text"])
        out.append([{tokenizer.tokenize(follow(table, x, j))[0]: j for j in range(len(table))}
                    for _, x, _ in queries])
    return out


class LoopStates:
    """Loop states of each forward, caught at the output of the last recurrent block (the
    state h_t after iteration t, as the model's loop sets h = u): ``norms()`` gives the mean
    over tokens of ‖h_T‖ and of ‖h_T − h_{T−1}‖, as the trainer's telemetry defines them."""

    def __init__(self, model) -> None:
        self.states: list[torch.Tensor] = []
        self.handle = model.transformer.recurrent[-1].register_forward_hook(
            lambda _m, _in, out: self.states.append(out.float()))

    def norms(self) -> tuple[float, float | None]:
        """(‖h_T‖, ‖h_T − h_{T−1}‖ or None at T = 1) of the last forward; clears the states."""
        last = self.states[-1]
        step = ((last - self.states[-2]).norm(dim=-1).mean().item()
                if len(self.states) > 1 else None)
        self.states = []
        return last.norm(dim=-1).mean().item(), step


@torch.inference_mode()
def accuracy_by_k(model, ids: torch.Tensor, answers: list, loop_counts: list[int],
                  batch_size: int = 64, states: LoopStates | None = None,
                  candidates: list[int] | None = None,
                  hops: list[list[dict[int, int]]] | None = None) -> tuple[dict, dict, dict]:
    """{T: {k: exact-match accuracy}} (argmax at the position before the answer must be
    f^k(x), among ``candidates`` token ids when given); with ``states``,
    {T: {"state_norm", "step_norm"}}: the loop state's norms averaged over the held-out
    tokens; with ``hops`` (``hop_index``), {T: {k: {j: share}}}: the share of k-hop queries
    answered with f^j(x) — what a wrong answer did instead (stopped early, went on)."""
    out: dict[int, dict[int, float]] = {}
    norms: dict[int, dict[str, float | None]] = {}
    answered: dict[int, dict[int, dict[int, float]]] = {}
    for t in loop_counts:
        hits: dict[int, list[int]] = defaultdict(list)
        landed: dict[int, Counter] = defaultdict(Counter)
        seen: list[tuple[int, float, float | None]] = []
        for start in range(0, len(ids), batch_size):
            batch = ids[start: start + batch_size].to(next(model.parameters()).device)
            kwargs = {"num_iterations": t, "state_seed": 0} if t else {}
            logits = model(batch, use_cache=False, **kwargs).logits
            if candidates is None:
                pred = logits.argmax(-1)
            else:  # the argmax among the answer tokens only
                allowed = torch.tensor(candidates, device=logits.device)
                pred = allowed[logits[..., allowed].argmax(-1)]
            if states is not None:
                seen.append((len(batch), *states.norms()))
            for row, doc in enumerate(answers[start: start + batch_size]):
                for q, (k, pos, target) in enumerate(doc):
                    hits[k].append(int(pred[row, pos - 1].item() == target))
                    if hops is not None:  # a letter off the cycle (none with candidates): -1
                        landed[k][hops[start + row][q].get(int(pred[row, pos - 1]), -1)] += 1
        out[t] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        if hops is not None:
            answered[t] = {k: {j: n / sum(c.values()) for j, n in sorted(c.items())}
                           for k, c in sorted(landed.items())}
        if seen:
            rows = sum(n for n, _, _ in seen)
            norms[t] = {"state_norm": sum(n * h for n, h, _ in seen) / rows,
                        "step_norm": (sum(n * d for n, _, d in seen) / rows
                                      if seen[0][2] is not None else None)}
    return out, norms, answered


def score_checkpoint(ckpt: Path, test_jsonl: Path, tokenizer_model: Path,
                     loop_counts: list[int] | None = None, max_loops: int | None = None,
                     letters: str | None = None) -> dict:
    """Load a Megatron checkpoint through the converter and score it at ``loop_counts``
    (default T = 1 … ``max_loops``, itself 3·μ_rec by default); T is ignored (reported as 0)
    without a recurrent block. A looped model also reports the loop state's norms per T.
    With ``letters`` the answer is the argmax among those characters' tokens: in the unary form
    the position before an answer may also be followed by another hop mark, so the next-token
    distribution splits between the mark and the answer letter (a k = 1 query trained beside
    k = 2, 3 puts half its mass on the mark), and exact match asks which letter; the report
    then also says which hop count j each answer f^j(x) corresponds to (``answered_hop``)."""
    from data_prep.tokenizer import load_tokenizer
    from parcae_megatron.convert.megatron_hf import megatron_to_hf_model

    model, _, _ = megatron_to_hf_model(ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    looped = bool(model.config.num_recurrent_layers)
    tokenizer = load_tokenizer(str(tokenizer_model))
    ids, answers = load_test(test_jsonl, tokenizer)
    candidates = [tokenizer.tokenize(c)[0] for c in letters] if letters else None
    mu = int(model.config.mean_recurrence)
    counts = (loop_counts or list(range(1, (max_loops or 3 * mu) + 1))) if looped else [0]
    states = LoopStates(model) if looped else None
    hops = hop_index(test_jsonl, tokenizer) if letters else None
    table, norms, answered = accuracy_by_k(model, ids, answers, counts, states=states,
                                           candidates=candidates, hops=hops)
    if states is not None:
        states.handle.remove()
    params = sum(p.numel() for p in model.parameters())
    queries = Counter(k for doc in answers for k, _, _ in doc)
    return {"looped": looped, "parameters": params,
            "queries_by_k": {str(k): n for k, n in sorted(queries.items())},
            "mean_recurrence": mu if looped else None,
            "accuracy": {str(t): {str(k): a for k, a in row.items()} for t, row in table.items()},
            **({"loop_state": {str(t): v for t, v in norms.items()}} if norms else {}),
            **({"answered_hop": {str(t): {str(k): {str(j): v for j, v in row.items()}
                                         for k, row in by_k.items()}
                                 for t, by_k in answered.items()}} if answered else {})}
