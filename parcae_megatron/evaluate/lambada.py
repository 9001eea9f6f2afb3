"""LAMBADA through lm-eval (``lambada_openai``, 0-shot) at several loop counts
(docs/design.md §9.4).

The dataset (``EleutherAI/lambada_openai``) comes from the Hugging Face Hub or its local
datasets cache; when neither is reachable the command stops with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from urllib.parse import urlparse

from parcae_megatron import cli

TASK = "lambada_openai"


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT`` if set) accepts a TCP connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_unless_reachable() -> None:
    """Without a route to the Hub, make datasets read its local cache only (set before it is
    imported), so a missing dataset fails at once instead of after network retries."""
    if os.environ.get("HF_DATASETS_OFFLINE") != "1" and not hub_reachable():
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        if "datasets" in sys.modules:  # already imported: its config read the old value
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True


class DatasetUnavailable(RuntimeError):
    """The lambada_openai data could not be loaded."""


def load_task(task_manager=None):
    """lm-eval's ``lambada_openai`` task with its data loaded, or ``DatasetUnavailable``."""
    from lm_eval.tasks import TaskManager, get_task_dict

    try:
        return get_task_dict([TASK], task_manager or TaskManager())
    except Exception as err:  # noqa: BLE001 — network, offline mode, missing cache: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise DatasetUnavailable(
            f"cannot load the {TASK} dataset (EleutherAI/lambada_openai on the Hugging Face "
            f"Hub) — no network or cache? ({type(err).__name__}: {first})") from err


def run_lambada(hf_dir: str, iterations: list[int] | None, batch_size: int = 16,
                device: str | None = None, dtype: str = "float32",
                limit: int | None = None) -> dict:
    """Perplexity and accuracy of ``lambada_openai`` (0-shot) at each loop count."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"not a Hugging Face model directory: {hf_dir}")
    _offline_unless_reachable()
    tasks = load_task()  # before the model: fail fast when the data is out of reach
    import lm_eval
    import torch
    from lm_eval.api.registry import get_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = get_model("hf").create_from_arg_string(
        f"pretrained={hf_dir},trust_remote_code=True,dtype={dtype}",
        {"batch_size": batch_size, "device": device})
    config = lm.model.config
    rows = []
    for t in iterations or [int(config.mean_recurrence)]:
        config.num_iterations = int(t)  # the forward's default loop count
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=0,
                                      limit=limit, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0)
        res = out["results"][TASK]
        rows.append({"T": int(t), "perplexity": res.get("perplexity,none"),
                     "accuracy": res.get("acc,none"),
                     "accuracy_stderr": res.get("acc_stderr,none")})
    return {"task": TASK, "num_fewshot": 0, "model": hf_dir, "limit": limit, "results": rows}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``lambada`` subcommand."""
    prog = "python -m parcae_megatron.evaluate lambada"
    p = cli.ArgumentParser(prog=prog, description="LAMBADA (lm-eval lambada_openai, "
                                "0-shot) at several loop counts; needs the dataset from the "
                                "Hugging Face Hub (or its datasets cache).")
    p.add_argument("--hf", metavar="DIR", required=True, help="Hugging Face export directory")
    p.add_argument("--T", "--iterations", dest="iterations", type=int, nargs="+",
                   help="loop counts (default: mu_rec)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="at most N documents")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", metavar="JSON")
    p.add_argument("--overwrite", action="store_true")
    return p


def run_lambada_cli(args) -> int:
    """The ``lambada`` subcommand."""
    report = run_lambada(args.hf, args.iterations, args.batch_size, args.device, args.dtype,
                         args.limit)
    print(f"{'T':>4}  {'ppl':>10}  {'acc':>7}")
    for r in report["results"]:
        print(f"{r['T']:>4}  {r['perplexity']:>10.3f}  {r['accuracy']:>7.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0
