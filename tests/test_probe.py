"""Depth probe: the generator (fast) and the command end to end at a tiny budget (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parcae_megatron.probe.task import TaskSpec, follow, generate, parse, split_of
from tests.distributed import ROOT

SPEC = TaskSpec(n_symbols=9, max_k=4, doc_chars=63)


def test_generator_is_deterministic_by_seed():
    a = [d.text for d in generate(SPEC, "train", 50, seed=3)]
    assert a == [d.text for d in generate(SPEC, "train", 50, seed=3)]
    assert a != [d.text for d in generate(SPEC, "train", 50, seed=4)]
    assert len(set(a)) == 50


def test_chains_are_correct_and_need_k_lookups():
    for doc in generate(SPEC, "train", 100, seed=0) + generate(SPEC, "test", 100, seed=0):
        assert len(doc.text) == SPEC.doc_chars
        assert set(doc.text) <= set(SPEC.alphabet)
        table, queries = parse(doc.text)
        assert table == doc.table and queries == [tuple(q) for q in doc.queries]
        assert sorted(table) == sorted(table.values()) == sorted(SPEC.symbols)
        for (k, x, y), off in zip(queries, doc.answer_offsets):
            # independent re-walk of the table parsed from the text
            z = x
            for _ in range(k):
                z = table[z]
            assert y == z == follow(doc.table, x, k) == doc.text[off] and doc.text[off - 1] == x
            # one cycle through all letters: the answer is never the query letter
            assert y != x
        assert len(queries) == SPEC.n_queries


def test_k_weights_shape_the_training_mix():
    spec = TaskSpec(n_symbols=9, max_k=4, doc_chars=63, k_weights=(1, 0, 0, 1))
    ks = {q[0] for d in generate(spec, "train", 50, seed=0) for q in d.queries}
    assert ks == {1, 4}


def test_no_chain_is_shared_between_splits():
    train = generate(SPEC, "train", 2000, seed=0)
    test = generate(SPEC, "test", 300, seed=0)
    key = lambda d: tuple(sorted(d.table.items()))  # noqa: E731
    train_tables = {key(d) for d in train}
    assert all(split_of(d.table, SPEC.test_fraction) == "test" for d in test)
    assert not train_tables & {key(d) for d in test}
    chains = lambda docs: {(key(d), x, k) for d in docs for k, x, _ in d.queries}  # noqa: E731
    assert not chains(train) & chains(test)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError):
        TaskSpec(n_symbols=6, max_k=4)  # f^4 == f^-2 on a 6-cycle: two look-ups back
    with pytest.raises(ValueError):
        TaskSpec(n_symbols=6, max_k=3)  # the antipode: 2 look-ups each way, then elimination
    with pytest.raises(ValueError):
        TaskSpec(doc_chars=20)


def test_bad_models_option_is_one_error_line():
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.probe", "--models", "rnn"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


@pytest.mark.slow
def test_probe_end_to_end_tiny_budget(tmp_path):
    run_dir = tmp_path / "probe"
    cmd = [sys.executable, "-m", "parcae_megatron.probe", "--run-dir", str(run_dir),
           "--train-iters", "3", "--train-docs", "200", "--test-docs", "20",
           "--micro-batch-size", "4", "--global-batch-size", "4", "--loop-counts", "1,4,8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((run_dir / "probe.json").read_text())
    parcae, tf = summary["models"]["parcae"], summary["models"]["transformer"]
    assert parcae["looped"] and not tf["looped"]
    assert sorted(parcae["accuracy"], key=int) == ["1", "4", "8"]
    assert sorted(tf["accuracy"]) == ["0"]
    for row in [*parcae["accuracy"].values(), tf["accuracy"]["0"]]:
        assert sorted(row) == ["1", "2", "3"] and all(0 <= a <= 1 for a in row.values())
    # equal parameter count, up to the loop's injection adapter
    assert abs(parcae["parameters"] - tf["parameters"]) / tf["parameters"] < 0.1
    assert set(summary["targets"]) >= {"hardest_T_mu_ge_2x_T_1", "trained_depth_ge_0.8_at_T_mu",
                                       "parcae_T_mu_above_transformer_hardest",
                                       "hardest_T_2mu_not_below_T_mu"}
    assert "test_time_fit" in summary
    assert (run_dir / "probe.png").stat().st_size > 5_000
    for path in ("data/train.bin", "data/test.idx", "data/tokenizer.model",
                 "parcae/checkpoints/latest_checkpointed_iteration.txt",
                 "transformer/telemetry.jsonl", "parcae/train_wall_s.txt"):
        assert (run_dir / path).exists(), path
    assert "Depth probe" in proc.stdout


def test_thin_pair_only_with_the_default_configs(tmp_path):
    from parcae_megatron.probe.__main__ import DEFAULT_CONFIGS, model_flags

    flags = model_flags("parcae", DEFAULT_CONFIGS["parcae"], ["--lr", "0.01"], "--seed 3")
    assert flags[:6] == ["--num-prelude-layers", "1", "--num-recurrent-layers", "1",
                         "--num-coda-layers", "0"]
    assert flags[-4:] == ["--lr", "0.01", "--seed", "3"]  # the user's flags come last, win
    assert model_flags("transformer", DEFAULT_CONFIGS["transformer"], [], "") == [
        "--num-prelude-layers", "2"]
    own = tmp_path / "mine.yaml"
    own.write_text("preset: parcae-tiny\n")
    assert model_flags("parcae", own, ["--lr", "0.01"], "") == ["--lr", "0.01"]


def test_not_below_allows_only_sampling_noise():
    from parcae_megatron.probe.report import not_below_margin

    # 1.000 at T = μ_rec and 0.999 at 2·μ_rec over 1,300 queries: one query, within noise
    assert 0.999 >= 1.0 - not_below_margin(1.0, 0.999, 1300)
    # 0.95 -> 0.90 over 1,300 queries is a real drop (≈ 5 standard errors)
    assert 0.90 < 0.95 - not_below_margin(0.95, 0.90, 1300)
    # hand-computed: p = 0.5, n = 200 -> 2·sqrt(2·0.25/200) = 0.1
    assert abs(not_below_margin(0.5, 0.5, 200) - 0.1) < 1e-12
    assert not_below_margin(1.0, 1.0, 500) == 0.0 and not_below_margin(0.9, 0.8, 0) == 0.0


def test_report_fits_a_step_like_sweep_and_draws_it(tmp_path):
    """A perfectly answered row is a positive (continuity-corrected) error, so a sweep that
    reaches 1.000 is still fitted; the plot gets the fit panel."""
    from parcae_megatron.probe.report import plot, summarise

    spec = TaskSpec(n_symbols=7, max_k=3, doc_chars=63)
    k3 = {1: 0.184, 2: 0.779, 3: 0.999, 4: 1.0, 5: 1.0, 6: 1.0, 7: 0.999, 8: 0.999}
    acc = {str(t): {"1": 1.0, "2": 1.0 if t > 1 else 0.26, "3": a} for t, a in k3.items()}
    results = {"parcae": {"looped": True, "mean_recurrence": 4, "accuracy": acc,
                          "queries_by_k": {"1": 1300, "2": 1300, "3": 1300},
                          "parameters": 148_096, "train_wall_s": 1.0},
               "transformer": {"looped": False, "mean_recurrence": None, "parameters": 139_712,
                               "accuracy": {"0": {"1": 1.0, "2": 0.82, "3": 0.60}},
                               "train_wall_s": 1.0}}
    summary = summarise(results, spec, {}, 1.0)
    assert summary["test_time_fit"]["3"]["determined"]
    assert 0 < summary["test_time_fit"]["3"]["L_inf"] < 0.01
    assert all(t["met"] for t in summary["targets"].values())
    plot(tmp_path / "probe.png", summary)
    assert (tmp_path / "probe.png").stat().st_size > 5_000
