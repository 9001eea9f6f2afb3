"""`python -m parcae_megatron.evaluate`: windows and byte counts, the scoring against the model's
own loss, the test-time fit, the CLI's files and errors, and the quickstart's trained tiny model
(Megatron checkpoint, loaded through the converter)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep import preprocess
from data_prep.corpus import build_default_corpus
from data_prep.train_tokenizer import train_tokenizer
from parcae_megatron.evaluate import (
    build_windows,
    default_loop_counts,
    evaluate,
    fit_loop_curve,
    format_table,
    load_hf_tokenizer,
    plot,
)
from parcae_megatron.evaluate.__main__ import main
from parcae_megatron.evaluate.data import make_windows, token_byte_lengths
from parcae_megatron.hf.configuration_parcae import ParcaeConfig
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM
from tests.distributed import ROOT
from tests.training_runs import command

VOCAB = 512  # the parcae-tiny preset's vocabulary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Embedded-corpus train/valid splits, a tokenizer and their indexed datasets."""
    d = tmp_path_factory.mktemp("evaluate")
    build_default_corpus(str(d / "train.jsonl"), max_bytes=400_000)
    build_default_corpus(str(d / "valid.jsonl"), max_bytes=60_000, split="valid")
    train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=VOCAB, workers=1,
                    character_coverage=1.0)
    for split in ("train", "valid"):
        assert preprocess.main([str(d / f"{split}.jsonl"), "--tokenizer", str(d / "tok.model"),
                                "--output", str(d / split), "--workers", "1", "--quiet"]) == 0
    return d


def tiny_model(**overrides) -> ParcaeForCausalLM:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=2,
               head_dim=32, num_prelude_layers=1, num_recurrent_layers=1, num_coda_layers=1,
               mean_recurrence=2, mean_backprop_depth=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = ParcaeForCausalLM(ParcaeConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_text_and_indexed_inputs_give_the_same_stream_and_bytes(data):
    tok = load_hf_tokenizer(str(data / "tok.model"))
    text = build_windows(32, text_files=[str(data / "valid.jsonl")], tokenizer=tok)
    indexed = build_windows(32, data_prefix=str(data / "valid"))
    assert len(text.windows) == len(indexed.windows) > 10
    assert all(np.array_equal(a, b) for a, b in zip(text.windows, indexed.windows))
    assert text.documents == indexed.documents
    stream = np.concatenate([text.windows[0]] + [w[1:] for w in text.windows[1:]])
    assert stream[0] == tok.bos_token_id and stream[-1] == tok.eos_token_id
    # Every token but the first is a target exactly once; the targets' bytes are the text's.
    assert text.targets == len(stream) - 1
    docs = [json.loads(line)["text"] for line in (data / "valid.jsonl").read_text().splitlines()]
    table = token_byte_lengths(tok, VOCAB)
    assert table[tok.bos_token_id] == table[tok.eos_token_id] == 0
    assert table[stream[1:]].sum() == sum(len(t.encode("utf-8")) for t in docs)
    capped = make_windows(stream, 32, max_tokens=100)
    assert sum(len(w) - 1 for w in capped) == 100 and len(capped) == 4
    assert len(make_windows(stream, 32, max_sequences=3)) == 3


def test_scores_equal_the_models_own_loss(data):
    tok = load_hf_tokenizer(str(data / "tok.model"))
    model = tiny_model()
    windows = build_windows(48, data_prefix=str(data / "valid"), max_sequences=5)
    report = evaluate(model, windows, iterations=[1, 3], seeds=[0, 7], batch_size=2,
                      tokenizer=tok, progress=False)
    batch = torch.from_numpy(np.stack(windows.windows))
    for row in report["results"]:
        for seed, loss in zip(row["seeds"], row["loss_per_seed"]):
            with torch.no_grad():
                ref = model(batch, labels=batch, num_iterations=row["T"], state_seed=seed,
                            use_cache=False).loss.item()
            assert loss == pytest.approx(ref, rel=1e-5)
        assert row["tokens"] == 5 * 48 and row["perplexity"] == pytest.approx(math.exp(
            row["loss"]))
        assert row["loss_std"] > 0 and 0 < row["bpb"] < 20
    fit = report["fit"]  # two loop counts cannot fix three constants
    assert not fit["determined"] and "three distinct" in fit["reason"] and fit["z"] is None
    assert default_loop_counts(4) == [1, 2, 4, 8] and default_loop_counts(3) == [1, 2, 3, 4, 6]


def test_fit_recovers_known_constants_and_plots(tmp_path):
    t = [1, 2, 3, 4, 6, 8, 12, 16]
    for l_inf, z_amp, z in [(2.5, 1.2, 0.7), (3.1, 0.4, 0.25)]:
        loss = [l_inf + z_amp * math.exp(-z * x) for x in t]
        fit = fit_loop_curve(t, loss, mean_recurrence=8)
        assert fit["L_inf"] == pytest.approx(l_inf, rel=1e-4)
        assert fit["Z"] == pytest.approx(z_amp, rel=1e-3)
        assert fit["z"] == pytest.approx(z, rel=1e-3)
        assert fit["rmse"] < 1e-6
        assert fit["L_inf_rel_error_vs_T_mu_rec"] == pytest.approx(
            z_amp * math.exp(-z * 8) / loss[t.index(8)], rel=1e-2)
    assert not fit_loop_curve([1, 2, 2], [3.0, 2.9, 2.9])["determined"]
    rows = [{"T": x, "loss": y, "loss_std": 0.01, "seeds": [0, 1], "perplexity": math.exp(y),
             "bpb": None, "tokens": 100} for x, y in zip(t, loss)]
    plot({"results": rows, "fit": fit, "mean_recurrence": 8, "model": "synthetic"},
         str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A flat sweep (within 3 × the seeds' noise) is reported as such, not fitted.
    flat = fit_loop_curve(t, [4.6 + 1e-4 * (x % 2) for x in t], mean_recurrence=8, noise=0.002)
    assert not flat["determined"] and "flat" in flat["reason"]
    assert "L_inf_rel_error_vs_T_mu_rec" not in flat
    report = {"results": rows, "fit": flat, "mean_recurrence": 8, "model": "synthetic"}
    plot(report, str(tmp_path / "flat.png"))
    assert "fit not determined: flat" in format_table(report)


def test_cli_on_hf_dir_and_errors(data, tmp_path, capsys):
    from parcae_megatron.convert.hf_io import write_hf_dir

    write_hf_dir(tiny_model(), tmp_path / "hf", data / "tok.model", overwrite=False)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["--hf", str(tmp_path / "hf"), "--text", str(data / "valid.jsonl"), "--seq-length",
            "32", "--max-sequences", "4", "--seeds", "0", "1", "--device", "cpu", "--quiet",
            "--out", str(out), "--plot", str(png)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["T"] for r in report["results"]] == [1, 2, 4]  # μ_rec = 2: 1, 2, 2·μ_rec
    fit = report["fit"]  # a random model: determined or not, the fit says which
    assert fit["L_inf"] > 0 if fit["determined"] else fit["reason"]
    assert report["data"]["tokens_scored"] == 128
    assert report["results"][0]["bytes"] > 128 and png.stat().st_size > 10_000
    assert "loss" in capsys.readouterr().out
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args[:2], "--data-prefix", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "indexed dataset file not found" in capsys.readouterr().err
    assert main([*args[:2], "--data-prefix", str(data / "valid"), "--seq-length", "128"]) == 2
    assert "exceeds the model's max_position_embeddings" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_checkpoint_evaluates_through_load(quickstart_run, tmp_path):
    """The README's main job (300 steps of the tiny preset on the embedded corpus, real entry
    point, 2 ranks) evaluated from its Megatron checkpoint through the converter (--load):
    every T is scored on the same held-out tokens, with bits per byte, a plot and a fit that
    is either determined or says why not.

    No loop-gain threshold here, by decision: over five initial draws of this run
    the gain L(T=1) − L(T=4) on held-out text was −0.0001 … +0.011 nats against a
    window-sampling error of 0.002–0.0035, so at this scale the gain is not a property of the
    model that any positive threshold could hold for every draw, whatever the number of
    tokens or h₀ seeds. What the loop design buys at CPU scale is stability; that is checked
    on the same quickstart run in tests/test_quickstart.py (concat-linear vs Parcae)."""
    run_dir, _ = quickstart_run
    out = tmp_path / "eval.json"
    _, env = command(1)
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.evaluate", "--load",
                           str(run_dir / "checkpoints"), "--data-prefix",
                           str(run_dir / "data" / "valid"), "--iterations", "1", "2", "4",
                           "--max-tokens", "16384", "--seeds", "0", "1", "--quiet",
                           "--out", str(out), "--plot", str(tmp_path / "e.png")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    rows = {r["T"]: r for r in report["results"]}
    assert report["mean_recurrence"] == 4 and sorted(rows) == [1, 2, 4]
    assert all(r["loss"] < 6.0 and r["bpb"] is not None and r["tokens"] == 16384
               for r in rows.values())  # it learned (uniform: ln 4096 = 8.3)
    fit = report["fit"]
    assert fit["form"] == "L(T) = L_inf + Z * exp(-z * T)"
    assert (fit["L_inf"] > 0 and fit["z"] > 0) if fit["determined"] else fit["reason"]
    assert (tmp_path / "e.png").stat().st_size > 10_000
