"""CORE / CORE-Extended on a small eval bundle the tests write themselves (all three task
types, few-shot > 0, both delimiters, a baseline file with one task missing).

Exact numbers come from a deterministic bigram model over a byte tokenizer: it has memorised
one text (each token of it predicts its successor with logit 10) and knows nothing else, so
which choice wins, which greedy continuation matches and hence every accuracy is fixed by how
the items are built. The quickstart model then runs the real CLI end to end at T = 1 and μ_rec
on items whose answer continues its training text, against random strings."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from parcae_megatron.evaluate.core import (
    TaskSpec,
    fewshot_indices,
    load_task_data,
    load_task_specs,
    pick_choice,
    prepare_item,
    read_baselines,
    render_prompts,
    score_items,
    shuffle_and_cut,
)
from parcae_megatron.evaluate.core_runner import aggregate, format_core_table, run_core
from tests.distributed import ROOT
from tests.sentencepiece_models import train_standard_spm

MEMORISED = "Lm nop"  # one space only, so every memorised token has a single successor
BOS, OFFSET, VOCAB = 1, 3, 259


class ByteTokenizer:
    """Bytes → ids (byte + 3); ⟨bos⟩ = 1."""

    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]


class BigramOracle(torch.nn.Module):
    """Logit 10 on the memorised successor of the current token, 0 elsewhere (uniform after
    a token the text does not contain). Same output at every loop count and seed."""

    def __init__(self) -> None:
        super().__init__()
        ids = ByteTokenizer().encode(MEMORISED)
        self.table = torch.zeros(VOCAB, VOCAB)
        for a, b in zip(ids, ids[1:]):
            self.table[a, b] = 10.0
        self.config = SimpleNamespace(max_position_embeddings=64, mean_recurrence=4,
                                      vocab_size=VOCAB)
        self.calls: list[tuple] = []

    def forward(self, ids, num_iterations=None, state_seed=None, use_cache=False):
        self.calls.append((num_iterations, state_seed, tuple(ids.shape)))
        return SimpleNamespace(logits=self.table[ids])


MC = [  # query, choices, gold: "nop" continues "Answer: " (space → n → o → p)
    ("Q1", ["nop", "nxq", "pon"], 0),
    ("Q2", ["xyz", "nop", "nox"], 1),
    ("Q3", ["pon", "opn", "nop"], 2),
    ("Q4", ["nop", "qrs", "tuv"], 1),  # gold is not the memorised answer: wrong by design
]
SCHEMA = [  # context_options, continuation, gold: " nop" follows "m" only
    (["Lm", "Lx"], "nop", 0),
    (["Lq", "Lm"], "nop", 1),
    (["Lm", "Lq"], "nop", 1),  # wrong by design
]
LM = [  # context, continuation: correct iff the span " nop" follows an "m"
    ("Lm", "nop"), ("zm", "nop"), ("Lm", "nox"), ("Lb", "nop"),
]
TASKS_YAML = """icl_tasks:
- label: mc_task
  dataset_uri: cat_a/mc.jsonl
  num_fewshot: 2
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
  core: true
- label: schema_task
  dataset_uri: cat_a/schema.jsonl
  num_fewshot: 1
  icl_task_type: schema
  continuation_delimiter: " "
  core: true
- label: lm_task
  dataset_uri: cat_b/lm.jsonl
  num_fewshot: 1
  icl_task_type: language_modeling
  continuation_delimiter: " "
  core: false
"""
BASELINES = "Eval Task,Random baseline\nmc_task,25.0\nschema_task,50\n"  # lm_task missing


def write_bundle(root: Path, mc=MC, schema=SCHEMA, lm=LM) -> Path:
    """eval_meta_data.csv + eval_data/<category>/<task>.jsonl, the DCLM bundle layout."""
    (root / "eval_data" / "cat_a").mkdir(parents=True)
    (root / "eval_data" / "cat_b").mkdir(parents=True)
    (root / "eval_meta_data.csv").write_text(BASELINES)
    (root / "tasks.yaml").write_text(TASKS_YAML)

    def dump(rel: str, records: list[dict]) -> None:
        (root / "eval_data" / rel).write_text("".join(json.dumps(r) + "\n" for r in records))

    dump("cat_a/mc.jsonl", [{"query": q, "choices": c, "gold": g} for q, c, g in mc])
    dump("cat_a/schema.jsonl", [{"context_options": o, "continuation": c, "gold": g}
                                for o, c, g in schema])
    dump("cat_b/lm.jsonl", [{"context": c, "continuation": x} for c, x in lm])
    return root


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle")


def test_shipped_task_list_has_46_tasks_22_core():
    core, extended = load_task_specs(), load_task_specs(extended=True)
    assert len(core) == 22 and len(extended) == 46
    by_label = {s.label: s for s in extended}
    assert by_label["jeopardy"] == TaskSpec("jeopardy", "world_knowledge/jeopardy_all.jsonl", 10,
                                            "language_modeling", "\nAnswer: ", True)
    assert by_label["mmlu_zeroshot"].delimiter == "Answer: " and not by_label["bbq"].core
    assert {s.task_type for s in core} == {"multiple_choice", "schema", "language_modeling"}


def test_bundle_parsing_shuffle_and_fewshot_draws(bundle):
    specs = load_task_specs(bundle / "tasks.yaml", extended=True)
    assert [s.label for s in load_task_specs(bundle / "tasks.yaml")] == ["mc_task", "schema_task"]
    assert read_baselines(bundle) == {"mc_task": 25.0, "schema_task": 50.0}
    mc = load_task_data(bundle, specs[0])
    # random.Random(1337).shuffle of 4 records, then the --max-per-task cut
    assert [r["query"] for r in shuffle_and_cut(mc, None)] == ["Q2", "Q1", "Q4", "Q3"]
    assert [r["query"] for r in shuffle_and_cut(mc, 2)] == ["Q2", "Q1"]
    # random.Random(seed + idx).sample(all indices but idx, k)
    assert fewshot_indices(4, 0, 2, 1234) == [2, 1]
    assert fewshot_indices(4, 1, 2, 1234) == [3, 2]
    assert fewshot_indices(4, 0, 2, 2345) == [3, 2]
    assert fewshot_indices(4, 2, 0, 1234) == []
    with pytest.raises(ValueError, match="needs choices"):
        (bundle / "eval_data" / "cat_a" / "mc.jsonl").write_text('{"query": "q", "gold": 0}\n')
        load_task_data(bundle, specs[0])


def test_prompt_rendering_by_hand():
    mc = TaskSpec("m", "x", 2, "multiple_choice", "\nAnswer: ")
    shots = [{"query": "2+2?", "choices": ["3", "4"], "gold": 1},
             {"query": "Sky?", "choices": ["blue", "red"], "gold": 0}]
    assert render_prompts(mc, {"query": "1+1?", "choices": ["2", "5"], "gold": 0}, shots) == [
        "2+2?\nAnswer: 4\n\nSky?\nAnswer: blue\n\n1+1?\nAnswer: 2",
        "2+2?\nAnswer: 4\n\nSky?\nAnswer: blue\n\n1+1?\nAnswer: 5"]
    schema = TaskSpec("s", "x", 1, "schema", " ")
    assert render_prompts(schema, {"context_options": ["The cat", "The dog"],
                                   "continuation": "barked.", "gold": 1},
                          [{"context_options": ["A", "B"], "continuation": "ran.",
                            "gold": 0}]) == ["A ran.\n\nThe cat barked.",
                                             "A ran.\n\nThe dog barked."]
    lm = TaskSpec("l", "x", 1, "language_modeling", "\nAnswer: ")
    assert render_prompts(lm, {"context": "  Capital of France? ", "continuation": "Paris"},
                          [{"context": " Capital of Italy?\n", "continuation": "Rome"}]) == [
        "Capital of Italy?\nAnswer: Rome\n\nCapital of France?\nAnswer:",
        "Capital of Italy?\nAnswer: Rome\n\nCapital of France?\nAnswer: Paris"]


def test_spans_and_left_cropping():
    tok = ByteTokenizer()

    def enc(s: str) -> list[int]:
        return [BOS] + tok.encode(s)

    mc = prepare_item(TaskSpec("m", "x", 0, "multiple_choice", " "), ["ab cd", "ab ce"], 0, enc,
                      None)
    assert mc.starts == [5, 5] and mc.ends == [6, 6]  # after the common prefix ⟨bos⟩"ab c"
    schema = prepare_item(TaskSpec("s", "x", 0, "schema", " "), ["xy z", "q z"], 1, enc, None)
    assert schema.starts == [3, 2] and schema.ends == [5, 4]  # the common suffix " z"
    lm = prepare_item(TaskSpec("l", "x", 0, "language_modeling", " "), ["ab", "ab cd"], None,
                      enc, None)
    assert lm.tokens == [enc("ab cd")] and (lm.starts, lm.ends) == ([3], [6])
    cropped = prepare_item(TaskSpec("l", "x", 0, "language_modeling", " "), ["ab", "ab cd"],
                           None, enc, 4)
    assert cropped.tokens == [tok.encode("b cd")] and (cropped.starts, cropped.ends) == ([1],
                                                                                          [4])


def test_scoring_accuracies_are_fixed_by_construction(bundle):
    model, tok = BigramOracle(), ByteTokenizer()
    specs = load_task_specs(bundle / "tasks.yaml", extended=True)
    report = run_core(model, tok, bundle, specs, [1, 4], [1234, 2345], batch_size=5,
                      progress=False, name="CORE-Extended")
    by = {r["task"]: r for r in report["tasks"]}
    expected = {"mc_task": (3 / 4, 25.0), "schema_task": (2 / 3, 50.0), "lm_task": (2 / 4, 25.0)}
    for label, (acc, base) in expected.items():
        for t in ("1", "4"):
            row = by[label]["by_T"][t]
            assert row["accuracy"] == pytest.approx(acc) and row["accuracy_std"] == 0
            assert row["centered"] == pytest.approx((acc - base / 100) / (1 - base / 100))
    assert by["lm_task"]["baseline_missing"] and not by["mc_task"]["baseline_missing"]
    # (2/3 + 1/3 + 1/3) / 3 × 100
    assert [r["score"] for r in report["results"]] == pytest.approx([100 * 4 / 9] * 2)
    # every (T, seed) scored, with h0 seeded by the seed; an item's prompts share a forward
    assert {(t, s) for t, s, _ in model.calls} == {(1, 1234), (1, 2345), (4, 1234), (4, 2345)}
    assert all(shape[0] % 3 == 0 or shape[0] <= 5 for _, _, shape in model.calls)
    table = format_core_table(report)
    assert "lm_task" in table and "25*" in table and "44.44" in table
    assert len(report["bundle_files"]) == 4 and len(report["bundle_sha256"]) == 64


def test_mean_nll_padding_and_greedy_rules():
    """Mean (not summed) NLL decides; right padding never enters a span; batching items
    together gives the same answers as one at a time."""
    tok, model = ByteTokenizer(), BigramOracle()
    spec = TaskSpec("m", "x", 0, "multiple_choice", " ")

    def enc(s: str) -> list[int]:
        return [BOS] + tok.encode(s)

    # "m nopq": 3 memorised steps + 1 miss (mean ≈ 10/4 = 2.5); "m q": one miss (≈ 10)
    # — the longer choice has the larger sum but the smaller mean, so it wins.
    item = prepare_item(spec, ["Lm nopq", "Lm q"], 0, enc, None)
    short = prepare_item(spec, ["Lm nop", "Lm nx"], 0, enc, None)
    lm = prepare_item(TaskSpec("l", "x", 0, "language_modeling", " "), ["Lm", "Lm no"], None,
                      enc, None)

    def fwd(ids):
        return model(ids).logits

    together = score_items(fwd, [item, short, lm], max_prompts=8, pad_id=BOS)
    alone = [score_items(fwd, [x], max_prompts=8, pad_id=BOS)[0] for x in (item, short, lm)]
    assert together == alone == [True, True, True]


# A bundle's own core.yaml (DCLM / nanochat format): shot counts as lists, no `core:` keys.
BUNDLE_CORE_YAML = """icl_tasks:
- label: prefix_mc
  dataset_uri: cat_a/prefix.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
- label: schema_task
  dataset_uri: cat_a/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
"""
# Choices that are token prefixes of each other (bytes are tokens): "n" is a prefix of every
# other choice, so its span is empty (mean NaN). The oracle's mean NLL of the rest: "nop" =
# hit ≈ 0.0117 (memorised "Lm nop"), "nx" = miss ≈ 10.01. The authors' pick (``pick_choice``):
PREFIX_ITEMS = [  # choices, gold (always the prefix choice "n"), the authors' pick
    (["n", "nx", "nop"], 0, 0),  # NaN first: picked
    (["nx", "n", "nop"], 1, 2),  # NaN later: never picked
    (["nop", "nx", "n"], 2, 0),
    (["nx", "nop", "n"], 2, 1),
    (["n", "nop"], 0, 0),
]


def test_pick_choice_is_pythons_min_then_index():
    """The authors' ``mean_losses.index(min(mean_losses))`` with NaN, by hand and at random."""
    nan = math.nan
    by_hand = {(nan, 1.0, 0.5): 0, (1.0, nan, 0.5): 2, (0.5, nan, 1.0): 0, (nan, nan): 0,
               (2.0, 1.0, 1.0): 1, (1.0, 2.0, nan): 0, (3.0,): 0}
    for means, want in by_hand.items():
        assert pick_choice(list(means)) == want
    rng = random.Random(0)
    for _ in range(2000):
        means = [rng.choice([nan, 0.5, rng.random()]) for _ in range(rng.randint(1, 5))]
        assert pick_choice(means) == means.index(min(means)), means


def test_prefix_choices_score_like_the_authors(tmp_path):
    """Empty spans stay empty (not moved onto the prompt's last token); the pick then depends
    on where the NaN choice stands: 2 of 5 correct (the old keyed-argmin rule gave 3 of 5)."""
    tok, model = ByteTokenizer(), BigramOracle()
    spec = TaskSpec("p", "x", 0, "multiple_choice", " ")

    def enc(s: str) -> list[int]:
        return [BOS] + tok.encode(s)

    item = prepare_item(spec, ["Lm n", "Lm nx", "Lm nop"], 0, enc, None)
    assert item.starts == [5, 5, 5] and item.ends == [5, 6, 7]  # "n" has the empty span [5, 5)
    items = [prepare_item(spec, [f"Lm {c}" for c in choices], gold, enc, None)
             for choices, gold, _ in PREFIX_ITEMS]
    correct = score_items(lambda ids: model(ids).logits, items, max_prompts=4, pad_id=BOS)
    assert correct == [pick == gold for _, gold, pick in PREFIX_ITEMS] == [
        True, False, False, False, True]
    # A span cropped to start at the first kept token is empty too (their slice [-1:e-1]).
    cropped = prepare_item(spec, ["ab cd", "ab ce"], 0, enc, 1)  # spans [5, 6) lose 5 tokens
    assert (cropped.tokens, cropped.starts, cropped.ends) == ([enc("d")[1:], enc("e")[1:]],
                                                              [0, 0], [1, 1])

    # The same items through run_core, with the bundle's own core.yaml as the task list.
    root = write_bundle(tmp_path / "bundle")
    (root / "core.yaml").write_text(BUNDLE_CORE_YAML)
    (root / "eval_data" / "cat_a" / "prefix.jsonl").write_text("".join(
        json.dumps({"query": "Lm", "choices": c, "gold": g}) + "\n" for c, g, _ in PREFIX_ITEMS))
    specs = load_task_specs(root / "core.yaml")  # no `core:` keys: every entry is CORE
    assert [s.label for s in specs] == ["prefix_mc", "schema_task"]
    assert specs == load_task_specs(root / "core.yaml", extended=True)
    assert (specs[0].num_fewshot, specs[0].delimiter, specs[1].delimiter) == (0, " ", " ")
    report = run_core(model, tok, root, specs, [1], [1234, 2345], progress=False)
    by = {r["task"]: r["by_T"]["1"] for r in report["tasks"]}
    assert by["prefix_mc"]["accuracy_per_seed"] == [2 / 5, 2 / 5]
    assert by["schema_task"]["accuracy"] == pytest.approx(2 / 3)
    # prefix_mc has no baseline in eval_meta_data.csv (25 %): centered (0.4 - 0.25) / 0.75
    assert report["results"][0]["score"] == pytest.approx(100 * (0.2 + 1 / 3) / 2)


def test_spread_over_seeds_is_the_population_std():
    """Per-seed accuracies 1/4, 1/2, 1 (baseline 25 %): centered 0, 1/3, 1; mean 4/9 and
    population std √14/9 (ddof = 0, as the authors; ddof = 1 would be √1.5 larger)."""
    spec = TaskSpec("t", "x", 0, "multiple_choice", " ", True)
    done = {("t", 1, seed): {"accuracy": acc, "items": 4, "prefix_mismatches": 0}
            for seed, acc in zip((1, 2, 3), (0.25, 0.5, 1.0))}
    report = aggregate(done, [spec], [1], [1, 2, 3], {"t": 25.0})
    row = report["tasks"][0]["by_T"]["1"]
    assert row["accuracy"] == pytest.approx(7 / 12)
    assert row["accuracy_std"] == pytest.approx(math.sqrt(14) / 12)
    assert row["centered"] == pytest.approx(4 / 9)
    assert row["centered_std"] == pytest.approx(math.sqrt(14) / 9)
    assert report["results"][0]["score"] == pytest.approx(400 / 9)
    assert report["results"][0]["score_std"] == pytest.approx(100 * math.sqrt(14) / 9)
    one = aggregate({("t", 1, 1): done[("t", 1, 1)]}, [spec], [1], [1], {"t": 25.0})
    assert one["results"][0]["score_std"] == 0.0


class TokenBigram(torch.nn.Module):
    """Logit 10 on every memorised successor of a token (token space of any tokenizer)."""

    def __init__(self, vocab: int, sequences: list[list[int]]) -> None:
        super().__init__()
        self.table = torch.zeros(vocab, vocab)
        for seq in sequences:
            for a, b in zip(seq, seq[1:]):
                self.table[a, b] = 10.0
        self.config = SimpleNamespace(max_position_embeddings=128, mean_recurrence=2,
                                      vocab_size=vocab)
        self.first_tokens: set[int] = set()

    def forward(self, ids, num_iterations=None, state_seed=None, use_cache=False):
        self.first_tokens |= set(ids[:, 0].tolist())
        return SimpleNamespace(logits=self.table[ids])


STD_MC = [  # query, right answer (memorised), gold index among [answer] + digits
    ("The quick brown", "fox jumps", 0), ("Pack my box", "with five", 1),
    ("How vexingly", "quick daft", 2), ("Sphinx of black", "quartz judge", 1)]


def _std_bundle(root: Path) -> Path:
    root = write_bundle(root)
    records = []
    for i, (query, answer, gold) in enumerate(STD_MC):
        wrong = ["123", "4567", "89"][: 2]
        choices = wrong[:gold] + [answer] + wrong[gold:]
        records.append({"query": query, "choices": choices,
                        "gold": gold if i < 3 else (gold + 1) % 3})  # last: wrong by design
    (root / "eval_data" / "cat_a" / "std.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    (root / "core.yaml").write_text("icl_tasks:\n- label: std_mc\n  dataset_uri: "
                                    "cat_a/std.jsonl\n  num_fewshot: [0]\n"
                                    "  icl_task_type: multiple_choice\n")
    return root


def test_standard_sentencepiece_tokenizer_evaluates(tmp_path, capsys):
    """A ``<s>`` / ``</s>`` / ``<pad>`` SentencePiece model: the HF tokenizer takes BOS, EOS
    and pad from the model (no ids appended past its 300 pieces), every CORE prompt starts
    with ``<s>`` = 1, and a bigram model that memorised the right answers gets 3 of 4 (the
    4th item's gold is wrong by design); through the CLI a real model of that vocabulary
    scores without error, and a tokenizer without BOS is refused in one ``error:`` line
    (evaluation and conversion)."""
    from parcae_megatron.convert.errors import ConversionError
    from parcae_megatron.convert.hf_io import write_hf_dir
    from parcae_megatron.evaluate.__main__ import main as evaluate_main
    from parcae_megatron.evaluate.runner import load_hf_tokenizer
    from parcae_megatron.hf.configuration_parcae import ParcaeConfig
    from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM

    good = train_standard_spm(tmp_path / "std.model")
    bad = train_standard_spm(tmp_path / "nobos.model", bos=False)
    tok = load_hf_tokenizer(str(good), vocab_size=300)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 3, 300)
    assert tok("quick")["input_ids"][0] == 1
    from parcae_megatron.hf.tokenization_parcae import ParcaeTokenizer

    stale = ParcaeTokenizer(vocab_file=str(good), bos_token="<|bos|>", pad_token="<|pad|>")
    assert (stale.bos_token_id, stale.pad_token_id, len(stale)) == (1, 3, 300)  # not 300, 301

    root = _std_bundle(tmp_path / "bundle")
    seqs = [[1, *tok.encode(f"{q} {a}", add_special_tokens=False)] for q, a, _ in STD_MC]
    oracle = TokenBigram(300, seqs)
    specs = load_task_specs(root / "core.yaml")
    report = run_core(oracle, tok, root, specs, [1], [1234], progress=False)
    assert report["tasks"][0]["by_T"]["1"]["accuracy"] == 3 / 4
    assert oracle.first_tokens == {1}

    with pytest.raises(ValueError, match="has no BOS piece"):
        load_hf_tokenizer(str(bad))
    with pytest.raises(ValueError, match="300 pieces but the model's vocabulary has 256"):
        load_hf_tokenizer(str(good), vocab_size=256)

    config = ParcaeConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                          num_attention_heads=2, head_dim=32, num_prelude_layers=1,
                          num_recurrent_layers=1, num_coda_layers=1, mean_recurrence=2,
                          mean_backprop_depth=1, max_position_embeddings=64, state_seed=0)
    torch.manual_seed(0)
    model = ParcaeForCausalLM(config).eval()
    hf = write_hf_dir(model, tmp_path / "hf", good, overwrite=False)
    with pytest.raises(ConversionError, match="has no BOS piece"):
        write_hf_dir(model, tmp_path / "hf_bad", bad, overwrite=False)
    assert not (tmp_path / "hf_bad").exists()
    out = tmp_path / "core.json"
    common = ["--hf", str(hf), "--bundle", str(root), "--tasks-yaml", str(root / "core.yaml"),
              "--T", "1", "--seeds", "1", "--quiet", "--device", "cpu"]
    assert evaluate_main(["core", *common, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"][0]["by_T"]["1"]["items"] == 4
    capsys.readouterr()
    assert evaluate_main(["core", *common, "--tokenizer", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tokenizer ") and "has no BOS" in err[0]


@pytest.mark.slow
def test_cli_on_the_quickstart_model_at_T1_and_mu_rec(quickstart_run, tmp_path):
    """The real CLI (``core`` then ``core-extended``, --load through the converter) on a bundle
    whose answers continue the model's training text, against random strings: far above
    chance (4-way multiple choice, 2-way schema) at T = 1 and at μ_rec; the run resumes from
    its partial results."""
    import random
    import string

    run_dir, _ = quickstart_run
    docs = [json.loads(x)["text"] for x in
            (run_dir / "data" / "train.jsonl").read_text().splitlines()[:400]]
    docs = [d for d in docs if len(d) > 200][:12]
    rng = random.Random(0)
    chars = string.ascii_letters + string.digits + "#$%&*+<=>@^|~"
    mc = []
    for i, d in enumerate(docs):  # short enough that 2 shots fit the 128-token context
        right = d[50:80]
        wrong = ["".join(rng.choice(chars) for _ in range(len(right))) for _ in range(3)]
        mc.append((d[:50], wrong[:i % 4] + [right] + wrong[i % 4:], i % 4))
    schema = [([d[:60], "".join(rng.choice(chars) for _ in range(60))], d[60:100], 0)
              for d in docs[:6]]
    lm = [(d[:80], d[80:84]) for d in docs[:6]]
    bundle = write_bundle(tmp_path / "bundle", mc, schema, lm)
    out = tmp_path / "core.json"
    cmd = [sys.executable, "-m", "parcae_megatron.evaluate", "core", "--load",
           str(run_dir / "checkpoints"), "--bundle", str(bundle), "--tasks-yaml",
           str(bundle / "tasks.yaml"), "--T", "1", "4", "--seeds", "1234", "2345", "--quiet",
           "--out", str(out), "--plot", str(tmp_path / "core.png"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(out.read_text())
    by = {r["task"]: r for r in report["tasks"]}
    assert report["metric"] == "CORE" and set(by) == {"mc_task", "schema_task"}
    # measured: 11 of 12 and 4-5 of 6 per seed at both T (with the ±2-truncated orthogonal
    # init; 10-11 and 5-6 with the earlier ±3 draw: the toy model's schema answers vary)
    for t in ("1", "4"):
        assert min(by["mc_task"]["by_T"][t]["accuracy_per_seed"]) >= 0.75  # chance: 0.25
        assert min(by["schema_task"]["by_T"][t]["accuracy_per_seed"]) >= 4 / 6  # chance: 0.5
    assert [r["T"] for r in report["results"]] == [1, 4]
    assert all(math.isfinite(r["score"]) for r in report["results"])
    assert (tmp_path / "core.png").stat().st_size > 10_000 and "bundle sha256" in proc.stdout
    partial = Path(str(out) + ".partial.jsonl")
    assert len(partial.read_text().splitlines()) == 2 * 2 * 2  # (task, T, seed)
    # core-extended adds the non-CORE language-modeling task; CORE's results are reused
    ext = subprocess.run([*cmd[:3], "core-extended", *cmd[4:], "--overwrite"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert ext.returncode == 0, (ext.stdout + ext.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["metric"] == "CORE-Extended" and len(report["tasks"]) == 3
    bad = subprocess.run([*cmd[:7], str(tmp_path / "nope"), "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
