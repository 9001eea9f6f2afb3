"""lm-eval's Hugging Face backend runs an exported Parcae (remote code; our tokenizer as its
fast tokenizer.json) on the tiny local tasks in tests/lm_eval_tasks, offline, with the loop
count as a model argument."""

from __future__ import annotations

import math
import os

import pytest

from tests.distributed import ROOT

# No hub access: datasets' json builder and the model are local (set before lm_eval imports).
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the lm-eval HF backend imports it

TASKS = ["parcae_stdlib_next_line", "parcae_stdlib_text"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Parcae exported with our tokenizer (trained on the embedded corpus)."""
    import torch

    from data_prep.corpus import build_default_corpus
    from data_prep.train_tokenizer import train_tokenizer
    from parcae_megatron.convert.hf_io import write_hf_dir
    from parcae_megatron.hf.configuration_parcae import ParcaeConfig
    from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM

    d = tmp_path_factory.mktemp("lm_eval")
    build_default_corpus(str(d / "train.jsonl"), max_bytes=60_000)
    train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=384, workers=1,
                    character_coverage=1.0)
    cfg = ParcaeConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                       num_attention_heads=2, head_dim=32, num_prelude_layers=1,
                       num_recurrent_layers=1, num_coda_layers=1, mean_recurrence=2,
                       mean_backprop_depth=2, max_position_embeddings=256, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = ParcaeForCausalLM(cfg)
    with torch.no_grad():  # large enough weights that the loop count changes the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    write_hf_dir(model, d / "hf", d / "tok.model", overwrite=False)
    return d / "hf"


def run_tasks(hf_dir, iterations: int, monkeypatch, tasks: list[str]) -> tuple[dict, object]:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repo root
    args = (f"pretrained={hf_dir},trust_remote_code=True,num_iterations={iterations},"
            f"dtype=float32")
    lm = get_model("hf").create_from_arg_string(args, {"batch_size": 8, "device": "cpu"})
    manager = TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks"))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return out["results"], lm


def test_lm_eval_runs_local_tasks_with_loop_count(hf_dir, monkeypatch):
    bpb = {}
    for t, tasks in ((1, TASKS), (3, TASKS[1:])):
        res, lm = run_tasks(hf_dir, t, monkeypatch, tasks)
        # model_args reach the model: from_pretrained(num_iterations=t) sets the config.
        assert lm.model.config.num_iterations == t
        # The export's tokenizer.json: a fast tokenizer, the training tokenizer's ids.
        assert lm.tokenizer.is_fast and type(lm.tokenizer).__module__.startswith("transformers")
        bpb[t] = res["parcae_stdlib_text"]["bits_per_byte,none"]
        assert math.isfinite(bpb[t]) and bpb[t] > 0
        assert math.isfinite(res["parcae_stdlib_text"]["word_perplexity,none"])
        if t == 1:
            assert res["parcae_stdlib_next_line"]["sample_len"] == 20
            assert 0.0 <= res["parcae_stdlib_next_line"]["acc,none"] <= 1.0
    # Different loop counts run different computations, so the scores differ.
    assert bpb[1] != bpb[3], bpb
