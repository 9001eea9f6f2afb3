"""CORE / CORE-Extended (paper App. M; DCLM / nanochat eval bundle): task specs, bundle reading,
prompt rendering, span selection and scoring.

Rules (docs/design.md §9.3): few-shot examples first, each followed by a blank line;
every prompt tokenized with ⟨bos⟩ prepended; multiple choice scores the span after the longest
common token prefix of an item's prompts, schema the longest common token suffix, language
modeling the tokens the continuation adds; multiple choice / schema pick the lowest mean NLL
with the authors' NaN rule (a choice that is a token prefix of all the others has an empty span,
mean NaN: picked when it comes first, never otherwise), language modeling needs an exact greedy
match; prompts longer than the context are cropped from the left. Records are shuffled with
``random.Random(1337)`` before ``max_per_task``; the few-shot draw of record ``idx`` under seed
``s`` is ``random.Random(s + idx).sample(others, k)`` over the (cut) task data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TASKS_YAML = Path(__file__).with_name("core_tasks.yaml")
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_BASELINE = 25.0  # percent, for a task missing from eval_meta_data.csv
SHUFFLE_SEED = 1337
PAPER_SEEDS = (1234, 2345, 3456)
_FIELDS = {"multiple_choice": ("query", "choices", "gold"),
           "schema": ("context_options", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}


@dataclass(frozen=True)
class TaskSpec:
    """One in-context task: label, file under eval_data/, shots, type, delimiter, CORE or not."""

    label: str
    dataset_uri: str
    num_fewshot: int
    task_type: str
    delimiter: str = " "
    core: bool = False


def load_task_specs(path: str | Path | None = None, extended: bool = False,
                    labels: list[str] | None = None) -> list[TaskSpec]:
    """Tasks of ``path`` (default: the shipped 46-task YAML): the CORE ones, or all with
    ``extended``; ``labels`` picks a subset by name. An entry without a ``core:`` key counts
    as CORE: a bundle's own ``core.yaml`` has none, and the authors score all its entries."""
    import yaml

    path = Path(path or TASKS_YAML)
    if not path.is_file():
        raise FileNotFoundError(f"task list not found: {path}")
    raw = (yaml.safe_load(path.read_text()) or {}).get("icl_tasks")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty 'icl_tasks' list")
    specs = []
    for t in raw:
        shots = t.get("num_fewshot", 0)
        shots = shots[0] if isinstance(shots, list) else shots  # DCLM's core.yaml uses lists
        spec = TaskSpec(str(t["label"]), str(t["dataset_uri"]), int(shots),
                        str(t["icl_task_type"]), str(t.get("continuation_delimiter", " ")),
                        bool(t.get("core", True)))
        if spec.task_type not in TASK_TYPES:
            raise ValueError(f"{path}: task {spec.label}: unknown icl_task_type "
                             f"{spec.task_type!r} (use one of {', '.join(TASK_TYPES)})")
        specs.append(spec)
    if labels:
        known = {s.label for s in specs}
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)} (not in {path})")
        return [s for s in specs if s.label in labels]
    return specs if extended else [s for s in specs if s.core]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (recorded in the report so a bundle can be pinned)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_baselines(bundle: str | Path) -> dict[str, float]:
    """``Eval Task`` → ``Random baseline`` (percent) from ``eval_meta_data.csv``."""
    path = Path(bundle) / "eval_meta_data.csv"
    if not path.is_file():
        raise FileNotFoundError(f"baseline file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(
                reader.fieldnames):
            raise ValueError(f"{path}: needs the columns 'Eval Task' and 'Random baseline'")
        return {row["Eval Task"].strip(): float(row["Random baseline"]) for row in reader}


def load_task_data(bundle: str | Path, spec: TaskSpec) -> list[dict]:
    """Records of ``eval_data/<dataset_uri>``, checked for the fields their type needs."""
    path = Path(bundle) / "eval_data" / spec.dataset_uri
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path} (task {spec.label})")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
            missing = [k for k in _FIELDS[spec.task_type] if k not in rec]
            if missing:
                raise ValueError(f"{path}:{n}: a {spec.task_type} record needs "
                                 f"{', '.join(missing)}")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def shuffle_and_cut(records: list[dict], max_per_task: int | None) -> list[dict]:
    """The records in ``random.Random(1337)`` order, cut to ``max_per_task`` (None/0 = all)."""
    records = list(records)
    random.Random(SHUFFLE_SEED).shuffle(records)
    return records[:max_per_task] if max_per_task else records


def fewshot_indices(n: int, idx: int, k: int, seed: int) -> list[int]:
    """The few-shot draw for record ``idx`` under ``seed``: ``k`` of the other records."""
    if k <= 0:
        return []
    others = [i for i in range(n) if i != idx]
    return random.Random(seed + idx).sample(others, min(k, len(others)))


def render_prompts(spec: TaskSpec, item: dict, shots: list[dict]) -> list[str]:
    """The prompts of one item: one per choice (multiple choice), one per context option
    (schema), or [without, with] the continuation (language modeling)."""
    d = spec.delimiter
    if spec.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if spec.task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n"
                       for s in shots)
        return [f"{head}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    base = f"{head}{item['context'].strip()}{d}"
    return [base.rstrip(), base + item["continuation"]]


@dataclass
class PreparedItem:
    """Token ids of an item's prompts, the scored span [start, end) of each, and the answer."""

    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None  # None: language modeling (greedy match)
    prefix_mismatch: bool = False


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def prepare_item(spec: TaskSpec, prompts: list[str], gold: int | None,
                 encode: Callable[[str], list[int]], max_len: int | None) -> PreparedItem:
    """Tokenize the prompts (``encode`` prepends ⟨bos⟩), pick the spans, crop from the left."""
    tokens = [encode(p) for p in prompts]
    mismatch = False
    if spec.task_type == "multiple_choice":
        start = _common_prefix(tokens)
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif spec.task_type == "schema":
        suffix = _common_suffix(tokens)
        starts, ends = [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    else:
        without, with_ = tokens
        start = len(without)
        if with_[:start] != without:  # tokenizer merged across the boundary
            mismatch, start = True, _common_prefix([without, with_])
        tokens, starts, ends = [with_], [start], [len(with_)]
    # A choice whose tokens are a prefix of every other choice's keeps its empty span
    # (start == end): the authors score it as NaN (see ``pick_choice``).
    if max_len is not None:
        for i, t in enumerate(tokens):
            crop = len(t) - max_len
            if crop > 0:
                tokens[i] = t[crop:]
                start = starts[i] - crop
                # Theirs: a span cropped to start at token 0 is empty (NaN) for multiple
                # choice / schema; further (their assertion fails) we score from token 1.
                empty = start == 0 and gold is not None
                starts[i], ends[i] = (0 if empty else max(1, start)), ends[i] - crop
    return PreparedItem(tokens, starts, ends, gold, mismatch)


def prepare_task(spec: TaskSpec, records: list[dict], seed: int,
                 encode: Callable[[str], list[int]], max_len: int | None) -> list[PreparedItem]:
    """Every record of a (shuffled, cut) task rendered with its few-shot draw under ``seed``."""
    items = []
    for idx, rec in enumerate(records):
        shots = [records[i] for i in fewshot_indices(len(records), idx, spec.num_fewshot, seed)]
        gold = None if spec.task_type == "language_modeling" else int(rec["gold"])
        items.append(prepare_item(spec, render_prompts(spec, rec, shots), gold, encode, max_len))
    return items


def pick_choice(means: list[float]) -> int:
    """The authors' pick among an item's mean NLLs: ``means.index(min(means))`` on Python
    floats, spelled out. ``min`` starts from the first value and moves only to a strictly
    smaller one; every comparison with NaN (an empty span) is false. So a NaN first choice is
    picked, a NaN anywhere else never is, and ties go to the earliest choice."""
    best = 0
    for i in range(1, len(means)):
        if means[i] < means[best]:
            best = i
    return best


def _batches(items: list[PreparedItem], max_prompts: int) -> list[list[int]]:
    """Item indices grouped so all prompts of an item share a forward (several items per
    batch up to ``max_prompts`` prompts; an item with more prompts goes alone)."""
    out, cur, size = [], [], 0
    for i, item in enumerate(items):
        n = len(item.tokens)
        if cur and size + n > max_prompts:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        out.append(cur)
    return out


# no_grad, not inference_mode: in training the forward fills caches (RoPE tables) that
# the next training step reuses, and an inference tensor cannot be saved for backward.
@torch.no_grad()
def score_items(forward: Callable[[torch.Tensor], torch.Tensor | None],
                items: list[PreparedItem], max_prompts: int = 32, pad_id: int = 0, device=None,
                on_batch: Callable[[int], None] | None = None, pad_to: int = 1) -> list[bool]:
    """Correct / wrong per item. ``forward(ids [b, L]) → logits [b, L, V]``; prompts are padded
    on the right, so causal attention keeps padding out of every span. A ``forward`` that
    returns None (a pipeline stage without the output layer, in training) leaves its items
    False: that rank only helps compute the logits another rank scores. ``pad_to`` rounds
    the padded width up to a multiple (sequence-parallel shards need equal lengths)."""
    correct: list[bool] = [False] * len(items)
    for group in _batches(items, max_prompts):
        rows = [(i, p) for i in group for p in range(len(items[i].tokens))]
        width = max(len(items[i].tokens[p]) for i, p in rows)
        width = -(-width // pad_to) * pad_to
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, (i, p) in enumerate(rows):
            t = items[i].tokens[p]
            ids[r, : len(t)] = torch.tensor(t)
        ids = ids.to(device) if device is not None else ids
        logits = forward(ids)
        if logits is None:
            if on_batch is not None:
                on_batch(len(group))
            continue
        logits = logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        greedy = logits[:, :-1].argmax(-1)
        r = 0
        for i in group:
            item = items[i]
            spans = []
            for s, e in zip(item.starts, item.ends):
                spans.append((r, s, e))
                r += 1
            if item.gold is None:  # an empty span matches (their torch.all of nothing)
                row, s, e = spans[0]
                correct[i] = e <= s or bool(torch.equal(greedy[row, s - 1: e - 1],
                                                        ids[row, s:e]))
            else:
                means = [nll[row, s - 1: e - 1].mean().item() if 1 <= s < e else math.nan
                         for row, s, e in spans]
                correct[i] = pick_choice(means) == item.gold
        if on_batch is not None:
            on_batch(len(group))
    return correct


def centered(accuracy: float, baseline_percent: float) -> float:
    """(acc − b/100) / (1 − b/100)."""
    b = baseline_percent / 100.0
    return (accuracy - b) / (1.0 - b)


def bundle_fingerprint(bundle: str | Path, specs: list[TaskSpec]) -> dict[str, str]:
    """sha256 of eval_meta_data.csv and every task file the run reads (relative paths)."""
    bundle = Path(bundle)
    files = ["eval_meta_data.csv"] + sorted({f"eval_data/{s.dataset_uri}" for s in specs})
    return {f: sha256_file(bundle / f) for f in files if (bundle / f).is_file()}


def combined_digest(files: dict[str, str]) -> str:
    """One sha256 over the per-file digests (sorted by path)."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()
                          ).hexdigest()


def resume_records(path: str | os.PathLike, key: str) -> dict[tuple, dict]:
    """Finished (task, T, seed) results of an earlier run with the same settings ``key``."""
    done = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted write
                if rec.get("key") == key:
                    done[(rec["task"], rec["T"], rec["seed"])] = rec
    return done
