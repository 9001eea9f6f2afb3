"""Run CORE / CORE-Extended at several loop counts and seeds; aggregate, tabulate, plot."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from parcae_megatron.evaluate.core import (
    DEFAULT_BASELINE,
    TaskSpec,
    bundle_fingerprint,
    centered,
    combined_digest,
    load_task_data,
    prepare_task,
    read_baselines,
    resume_records,
    score_items,
    shuffle_and_cut,
)
from parcae_megatron.evaluate.report import save_figure

# forward_for(T, seed) → (ids [b, L] → logits [b, L, V])
ForwardFactory = Callable[[int, int], Callable[[torch.Tensor], torch.Tensor]]


def fixed_depth_forward(model) -> ForwardFactory:
    """Plain forwards at loop count T with h₀ seeded by the evaluation seed."""
    def factory(t: int, seed: int):
        return lambda ids: model(ids, num_iterations=t, state_seed=seed, use_cache=False).logits
    return factory


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof = 0, as the authors report the spread over seeds)."""
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=0))


def load_bundle(bundle: str | Path, specs: list[TaskSpec], max_per_task: int | None
                ) -> tuple[dict[str, list[dict]], dict[str, float], dict[str, str]]:
    """Each task's records (shuffled, cut to ``max_per_task``), the random baselines and the
    sha256 of every file read."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"eval bundle directory not found: {bundle}")
    baselines = read_baselines(bundle)
    files = bundle_fingerprint(bundle, specs)
    data = {s.label: shuffle_and_cut(load_task_data(bundle, s), max_per_task) for s in specs}
    return data, baselines, files


def bos_encoder(tokenizer, vocab_size: int) -> Callable[[str], list[int]]:
    """Text → ⟨bos⟩ + token ids (no special tokens), the encoding of every CORE prompt;
    refused (ValueError) when the tokenizer's BOS is not a token of the model."""
    bos = tokenizer.bos_token_id
    if bos is None or not 0 <= bos < vocab_size:
        raise ValueError(f"the tokenizer's BOS id {bos} is not a token of the model "
                         f"(vocabulary {vocab_size}); CORE prompts start with BOS")

    def encode(text: str) -> list[int]:
        return [bos] + list(tokenizer.encode(text, add_special_tokens=False))
    return encode


def result_record(task: str, t: int, seed: int, correct: int, items: int,
                  prefix_mismatches: int) -> dict:
    """One (task, T, seed) result as ``aggregate`` reads it."""
    return {"task": task, "T": t, "seed": seed, "accuracy": correct / items, "items": items,
            "prefix_mismatches": prefix_mismatches}


def run_core(model, tokenizer, bundle: str | Path, specs: list[TaskSpec],
             iterations: list[int], seeds: list[int], *, max_per_task: int | None = None,
             batch_size: int = 32, device=None, progress: bool = True,
             resume_path: str | None = None, forward_for: ForwardFactory | None = None,
             settings: dict | None = None, name: str = "CORE") -> dict:
    """Score every task at every T and seed; returns the report dict.

    ``model``: a ``ParcaeForCausalLM`` (device and dtype set); ``tokenizer`` encodes text (its
    ``bos_token_id`` is prepended). ``resume_path``: a JSON-lines file where each finished
    (task, T, seed) is appended and from which a rerun with the same settings resumes.
    """
    from tqdm import tqdm

    bundle = Path(bundle)
    data, baselines, files = load_bundle(bundle, specs, max_per_task)
    encode = bos_encoder(tokenizer, int(model.config.vocab_size))
    bos = tokenizer.bos_token_id
    forward_for = forward_for or fixed_depth_forward(model)
    max_len = int(model.config.max_position_embeddings)
    # A result is reused when the model settings, the cut and the task (spec + file) match.
    keys = {s.label: json.dumps({"max_per_task": max_per_task, "spec": list(s.__dict__.values()),
                                 "file": files.get(f"eval_data/{s.dataset_uri}"),
                                 **(settings or {})}, sort_keys=True) for s in specs}
    done = {}
    for s in specs:
        found = resume_records(resume_path, keys[s.label]) if resume_path else {}
        done.update({k: v for k, v in found.items() if k[0] == s.label})
    todo = [(s, t, seed) for s in specs for seed in seeds for t in iterations
            if (s.label, t, seed) not in done]
    if done and progress:
        print(f"resuming: {len(done)} (task, T, seed) results found in {resume_path}")
    bar = tqdm(total=sum(len(data[s.label]) for s, _, _ in todo), unit="item",
               disable=not progress, dynamic_ncols=True)
    start = time.time()
    prepared: dict[tuple[str, int], list] = {}
    try:
        for spec, t, seed in todo:
            bar.set_description(f"{spec.label} T={t} seed={seed}")
            items = prepared.get((spec.label, seed))
            if items is None:
                prepared.clear()  # one task's prompts at a time
                items = prepare_task(spec, data[spec.label], seed, encode, max_len)
                prepared[(spec.label, seed)] = items
            correct = score_items(forward_for(t, seed), items, batch_size,
                                  pad_id=bos, device=device, on_batch=bar.update)
            rec = {"key": keys[spec.label],
                   **result_record(spec.label, t, seed, sum(correct), len(correct),
                                   sum(i.prefix_mismatch for i in items))}
            done[(spec.label, t, seed)] = rec
            if resume_path:
                with open(resume_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    finally:
        bar.close()
    report = aggregate(done, specs, iterations, seeds, baselines, name)
    report.update(bundle=str(bundle), bundle_sha256=combined_digest(files), bundle_files=files,
                  max_per_task=max_per_task, elapsed_s=round(time.time() - start, 3),
                  mean_recurrence=int(model.config.mean_recurrence))
    return report


def aggregate(done: dict[tuple, dict], specs: list[TaskSpec], iterations: list[int],
              seeds: list[int], baselines: dict[str, float], name: str = "CORE") -> dict:
    """Per task and T: accuracy and centered accuracy (mean ± std over seeds); per T: the
    aggregate (mean of centered accuracies over tasks, per seed, then mean ± std), ×100."""
    tasks, summary = [], []
    for spec in specs:
        base = baselines.get(spec.label)
        row = {"task": spec.label, "type": spec.task_type, "num_fewshot": spec.num_fewshot,
               "core": spec.core, "baseline": DEFAULT_BASELINE if base is None else base,
               "baseline_missing": base is None, "by_T": {}}
        for t in iterations:
            recs = [done[(spec.label, t, s)] for s in seeds]
            acc = [r["accuracy"] for r in recs]
            cen = [centered(a, row["baseline"]) for a in acc]
            row["by_T"][str(t)] = {
                "accuracy": _stats(acc)[0], "accuracy_std": _stats(acc)[1],
                "centered": _stats(cen)[0], "centered_std": _stats(cen)[1],
                "accuracy_per_seed": acc, "items": recs[0]["items"],
                "prefix_mismatches": recs[0]["prefix_mismatches"]}
        tasks.append(row)
    for t in iterations:
        per_seed = [100.0 * float(np.mean([centered(done[(s.label, t, seed)]["accuracy"],
                                                   tr["baseline"])
                                           for s, tr in zip(specs, tasks)]))
                    for seed in seeds]
        mean, std = _stats(per_seed)
        summary.append({"T": t, "score": mean, "score_std": std, "per_seed": per_seed})
    return {"metric": name, "definition": "mean over tasks of centered accuracy "
            "(acc - b/100)/(1 - b/100), x100; mean ± population std (ddof=0) over seeds",
            "seeds": list(seeds), "iterations": list(iterations), "tasks": tasks,
            "results": summary}


def format_core_table(report: dict) -> str:
    """Per task (centered accuracy ×100 at each T, mean ± population std over seeds) and the
    aggregate."""
    ts = [str(t) for t in report["iterations"]]
    width = max([len(r["task"]) for r in report["tasks"]] + [len(report["metric"])]) + 2
    head = f"{'task':<{width}}{'base':>6}" + "".join(f"{'T=' + t:>16}" for t in ts)
    lines = [head]
    for r in report["tasks"]:
        base = f"{r['baseline']:.0f}" + ("*" if r["baseline_missing"] else "")
        cells = "".join(f"{100 * r['by_T'][t]['centered']:>9.2f} ± "
                        f"{100 * r['by_T'][t]['centered_std']:<4.2f}" for t in ts)
        lines.append(f"{r['task']:<{width}}{base:>6}{cells}")
    cells = "".join(f"{x['score']:>9.2f} ± {x['score_std']:<4.2f}" for x in report["results"])
    lines.append(f"{report['metric']:<{width}}{'':>6}{cells}")
    if any(r["baseline_missing"] for r in report["tasks"]):
        lines.append("* baseline missing from eval_meta_data.csv: 25% used")
    lines.append("(centered accuracy x100, mean ± population std over seeds " +
                 " ".join(map(str, report["seeds"])) + ")")
    return "\n".join(lines)


def plot_core(report: dict, path: str) -> None:
    """CORE vs T (mean ± std over seeds), μ_rec marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    t = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.errorbar(t, [r["score"] for r in rows], yerr=[r["score_std"] for r in rows], fmt="o-",
                capsize=3, label=f"{report['metric']} (mean ± std over "
                                 f"{len(report['seeds'])} seed(s))")
    mu = report.get("mean_recurrence")
    if mu:
        ax.axvline(mu, color="grey", ls="--", lw=1, label=f"μ_rec = {mu}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(t)
    ax.set_xticklabels([str(x) for x in t])
    ax.set_xlabel("loop count T")
    ax.set_ylabel(f"{report['metric']} (centered accuracy ×100)")
    ax.set_title(f"{report.get('model', 'model')}: {report['metric']} vs loop count",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
