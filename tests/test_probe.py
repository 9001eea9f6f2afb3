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


# -- chains longer than training (extrapolation) ----------------------------------------------

EXTRAP = TaskSpec(n_symbols=11, max_k=3, test_max_k=5, query_form="unary", doc_chars=95,
                  k_weights=(2, 1, 1))


def test_held_out_chains_longer_than_any_training_chain():
    train = generate(EXTRAP, "train", 300, seed=0)
    test = generate(EXTRAP, "test", 300, seed=0)
    assert {k for d in train for k, _, _ in d.queries} == {1, 2, 3}
    assert {k for d in test for k, _, _ in d.queries} == {1, 2, 3, 4, 5}
    # a unary k-hop query is x, k hop marks, y: no training text has four marks in a row
    assert not any("++++" in d.text for d in train)
    for doc in train + test:
        assert len(doc.text) == EXTRAP.doc_chars
        assert set(doc.text) <= set(EXTRAP.alphabet)  # no held-out token training lacks
        table, queries = parse(doc.text)
        assert table == doc.table and queries == [tuple(q) for q in doc.queries]
        for (k, x, y), off in zip(queries, doc.answer_offsets):
            assert y == follow(table, x, k) == doc.text[off] != x
            assert doc.text[off - k - 1: off] == x + "+" * k  # answered at the last mark
    assert [len(d.queries) for d in test[:1]] == [EXTRAP.queries_per_document("test")]
    assert EXTRAP.queries_per_document("train") > EXTRAP.queries_per_document("test") >= 1


@pytest.mark.parametrize("flags", [
    ["--n-symbols", "11", "--max-k", "3", "--test-max-k", "6", "--query-form", "unary"],
    ["--n-symbols", "9", "--max-k", "3", "--test-max-k", "5", "--query-form", "unary"],
    ["--n-symbols", "11", "--max-k", "3", "--test-max-k", "5"],  # digit k=4: unseen token
    ["--n-symbols", "11", "--max-k", "3", "--test-max-k", "2", "--query-form", "unary"],
    ["--max-loops", "0"],
    ["--loop-counts", "1,x"],
])
def test_bad_test_range_is_one_error_line(flags, capsys, monkeypatch, tmp_path):
    from parcae_megatron.probe import pipeline
    from parcae_megatron.probe.__main__ import main

    def not_refused(*_args):  # a regression must fail here, not start a training run
        raise AssertionError(f"{flags} was not refused")

    monkeypatch.setattr(pipeline, "prepare_data", not_refused)
    with pytest.raises(SystemExit) as exit_:
        main(["--run-dir", str(tmp_path / "probe"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err


def test_no_shortcut_rule_names_the_longest_allowed_k():
    with pytest.raises(ValueError, match=r"max_k\.\.5 for 11 letters"):
        TaskSpec(n_symbols=11, max_k=3, test_max_k=6, query_form="unary", doc_chars=95)
    # the digit form's queries and documents are as before: the default probe is unchanged
    assert TaskSpec().n_queries == 13 and TaskSpec().test_max_k == 3


def test_report_records_loops_needed_and_the_extrapolated_range(tmp_path):
    from parcae_megatron.probe.report import plot, summarise

    # one look-up per iteration: k is solved from T = k + 1, k = 5 never within T ≤ 12
    acc = {str(t): {str(k): (0.95 if t > k and k < 5 else 0.2) for k in range(1, 6)}
           for t in range(1, 13)}
    states = {str(t): {"state_norm": 10.0 + 0.1 * t, "step_norm": None if t == 1 else 1 / t}
              for t in range(1, 13)}
    results = {"parcae": {"looped": True, "mean_recurrence": 4, "accuracy": acc,
                          "loop_state": states, "parameters": 148_000, "train_wall_s": 1.0,
                          "queries_by_k": {str(k): 900 for k in range(1, 6)},
                          "answered_hop": {"12": {"5": {"3": 0.1, "4": 0.7, "5": 0.2}}}},
               "transformer": {"looped": False, "mean_recurrence": None, "parameters": 140_000,
                               "accuracy": {"0": {"1": 1.0, "2": 0.9, "3": 0.5, "4": 0.3,
                                                  "5": 0.25}}, "train_wall_s": 1.0}}
    summary = summarise(results, EXTRAP, {}, 1.0)
    assert summary["task"]["trained_k"] == [1, 2, 3]
    assert summary["task"]["extrapolated_k"] == [4, 5]
    assert summary["loops_needed"] == {"threshold": 0.8, "max_T": 12,
                                       "by_k": {"1": 2, "2": 3, "3": 4, "4": 5, "5": None}}
    first = summary["targets"]["first_unseen_k_solved_within_3mu"]
    assert first["met"] and first["best_T"] == 5 and first["T=1"] == 0.2
    beside = summary["targets"]["transformer_below_parcae_best_every_unseen_k"]
    assert not beside["met"]  # k = 5: Parcae's best 0.2 is not above the Transformer's 0.25
    # the trained-depth target looks at k ≤ max_k only
    assert summary["targets"]["trained_depth_ge_0.8_at_T_mu"]["met"]
    assert "k=4*" in summary["text"] and "k=5 none up to T=12" in summary["text"]
    assert "10.40" in summary["text"]  # ‖h_T‖ at T = 4 beside the accuracies
    # where the unseen chains' answers land: f^4(x) for most 5-hop chains, by share
    assert "k=5* answered at T=12 with f^j(x): j=4 0.70, j=5 0.20, j=3 0.10" in summary["text"]
    plot(tmp_path / "probe.png", summary)
    assert (tmp_path / "probe.png").stat().st_size > 5_000


def test_loop_states_catch_the_final_state():
    """The hooked state after the last iteration is the h_T the logits are read from."""
    import torch

    from parcae_megatron.hf.configuration_parcae import ParcaeConfig
    from parcae_megatron.hf.loop_math import readout
    from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM
    from parcae_megatron.probe.score import LoopStates, accuracy_by_k

    cfg = ParcaeConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, head_dim=16, num_prelude_layers=1,
                       num_recurrent_layers=1, num_coda_layers=0, mean_recurrence=2,
                       max_position_embeddings=16)
    torch.manual_seed(0)
    model = ParcaeForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (3, 12))
    states = LoopStates(model)
    with torch.no_grad():
        logits = model(ids, use_cache=False, num_iterations=5, state_seed=0).logits
        assert len(states.states) == 5
        h = states.states[-1]
        again = model.lm_head(model.transformer.ln_f(readout(h, model.transformer.C.weight)))
    assert torch.allclose(logits, again, atol=1e-5)
    norm, step = states.norms()
    assert norm == pytest.approx(h.norm(dim=-1).mean().item()) and step > 0
    answers = [[(1, 3, int(ids[r, 3]))] for r in range(3)]
    acc, norms, answered = accuracy_by_k(model, ids, answers, [1, 3], states=states)
    assert set(acc) == set(norms) == {1, 3} and norms[1]["step_norm"] is None
    assert norms[3]["state_norm"] > 0 and norms[3]["step_norm"] > 0 and answered == {}
    # with candidates, the answer is the argmax among those tokens: one candidate is always hit
    only, _, landed = accuracy_by_k(model, ids, answers, [2], candidates=[int(ids[0, 3])],
                                    hops=[[{int(ids[0, 3]): 4}]] * 3)
    assert only[2][1] == pytest.approx(sum(int(ids[r, 3] == ids[0, 3]) for r in range(3)) / 3)
    assert landed == {2: {1: {4: 1.0}}}  # T = 2, k = 1: every answer is that token, j = 4


def test_hop_index_names_the_hop_count_of_every_letter(tmp_path):
    """Per query, each letter of the cycle is f^j(x) for exactly one j; j = k is the answer."""
    from parcae_megatron.probe.score import hop_index

    class Chars:  # one token per character, as the probe's tokenizer
        def tokenize(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    docs = generate(EXTRAP, "test", 3, seed=0)
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(d.to_json()) + "\n" for d in docs))
    index = hop_index(path, Chars())
    for doc, per_query in zip(docs, index, strict=True):
        assert len(per_query) == len(doc.queries)
        for (k, x, y), hops in zip(doc.queries, per_query, strict=True):
            assert sorted(hops.values()) == list(range(EXTRAP.n_symbols))
            assert hops[ord(x)] == 0 and hops[ord(y)] == k
