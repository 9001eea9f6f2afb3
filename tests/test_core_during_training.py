"""CORE and samples while training (``--eval-core-interval``, ``--sample-interval``).

Two 2-rank launches of the tiny config with a standard SentencePiece tokenizer (TP = 2 and
PP = 2) score CORE on a small bundle of all three task types during training; the same step's
checkpoint, converted by ``evaluate core``, must give the same numbers. A third launch (PP = 2,
no evaluation) must train bit-identically to the PP = 2 launch that evaluated after every step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from parcae_megatron.training.validation import check_command_line
from tests.sentencepiece_models import TEXT, train_standard_spm
from tests.test_core_eval import write_bundle
from tests.training_runs import losses, records, train

TASKS = """icl_tasks:
- {label: mc_task, dataset_uri: cat_a/mc.jsonl, num_fewshot: 1, icl_task_type: multiple_choice,
   continuation_delimiter: "\\nAnswer: "}
- {label: schema_task, dataset_uri: cat_a/schema.jsonl, num_fewshot: 1, icl_task_type: schema}
- {label: lm_task, dataset_uri: cat_b/lm.jsonl, num_fewshot: 1,
   icl_task_type: language_modeling}
"""
MAX_PER_TASK = 10  # of 14 records per task: the cut is exercised too


def _bundle(root: Path) -> Path:
    """14 records per task made of the tokenizer's training text, so answers are not all
    equally (un)likely for a model trained two steps."""
    words = TEXT.split()
    rng = random.Random(0)
    phrase = lambda n: " ".join(rng.choice(words) for _ in range(n))
    mc = [(phrase(4), [phrase(2) for _ in range(3)], i % 3) for i in range(14)]
    schema = [([phrase(3), phrase(3)], phrase(3), i % 2) for i in range(14)]
    lm = [(phrase(4), rng.choice(words)) for _ in range(14)]
    root = write_bundle(root, mc, schema, lm)
    (root / "tasks.yaml").write_text(TASKS)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("core_inputs")
    return train_standard_spm(root / "spm.model"), _bundle(root / "bundle")


def _base(tokenizer: Path) -> list[str]:
    return ["--config", "configs/parcae-tiny-cpu.yaml", "--mock-data", "--tokenizer-model",
            str(tokenizer), "--lr", "0.05", "--log-interval", "1", "--eval-iters", "0",
            "--eval-interval", "100", "--save-interval", "100"]


def _quality(bundle: Path, interval: str) -> list[str]:
    return ["--eval-core-interval", interval, "--eval-core-bundle", str(bundle),
            "--eval-core-tasks-yaml", str(bundle / "tasks.yaml"), "--eval-core-max-per-task",
            str(MAX_PER_TASK)]


SAMPLES = ["--sample-interval", "2", "--sample-tokens", "3"]  # one forward per token


LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2", "--train-iters", "2"],
           "pp2": ["--pipeline-model-parallel-size", "2", "--train-iters", "2"]}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """TP = 2: CORE + samples after step 2; PP = 2: CORE after every step; PP = 2 without."""
    tokenizer, bundle = inputs
    root = tmp_path_factory.mktemp("core_runs")
    out = {}
    for name, interval in (("tp2", "2"), ("pp2", "1"), ("pp2_plain", None)):
        layout = LAYOUTS[name.removesuffix("_plain")]
        extra = _quality(bundle, interval) if interval else []
        extra += SAMPLES if name == "tp2" else []
        proc = train(2, *_base(tokenizer), *layout, *extra, "--save", str(root / name))
        out[name] = root / name, proc.stdout + proc.stderr
    return out


def _evaluate_core(ckpt: Path, bundle: Path, loops: list[int], out: Path) -> dict:
    from parcae_megatron.evaluate.__main__ import main as evaluate_main

    assert evaluate_main(["core", "--load", str(ckpt), "--bundle", str(bundle), "--tasks-yaml",
                          str(bundle / "tasks.yaml"), "--T", *map(str, loops), "--seeds",
                          "1234", "--max-per-task", str(MAX_PER_TASK), "--quiet",
                          "--device", "cpu", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_in_training_core_equals_evaluate_core_on_the_checkpoint(layout, runs, inputs,
                                                                 tmp_path):
    ckpt, log = runs[layout]
    _, bundle = inputs
    core = records(ckpt / "telemetry.jsonl", "core")
    assert [r["iteration"] for r in core] == ([2] if layout == "tp2" else [1, 2])
    rec = core[-1]
    assert rec["wall_time_s"] > 0
    loops = sorted(int(k.removeprefix("core_T")) for k in rec if k.startswith("core_T"))
    assert loops == [1, 4, 8]  # 1, μ_rec, 2·μ_rec of the tiny preset
    report = _evaluate_core(ckpt, bundle, loops, tmp_path / "core.json")
    for row in report["results"]:
        assert rec[f"core_T{row['T']}"] == pytest.approx(row["score"], abs=1e-6)
    accuracies = []
    for task in report["tasks"]:
        for t, cell in task["by_T"].items():
            assert cell["items"] == MAX_PER_TASK
            assert rec[f"{task['task']}_T{t}"] == pytest.approx(cell["accuracy"], abs=1e-6)
            accuracies.append(cell["accuracy"])
    assert len(set(accuracies)) > 1  # not a vacuous comparison of all-zero scores
    assert "CORE at iteration 2: T=1 " in log


@pytest.mark.slow
def test_samples_reach_the_log_and_the_telemetry(runs):
    ckpt, log = runs["tp2"]
    (rec,) = records(ckpt / "telemetry.jsonl", "samples")
    assert rec["iteration"] == 2 and rec["T"] == 4
    assert rec["prompt_0"] == "The capital of France is"
    assert all(isinstance(rec[f"sample_{n}"], str) for n in range(4))
    assert log.count("sample at iteration 2, T=4: ") == 4


@pytest.mark.slow
def test_evaluating_during_training_leaves_the_trajectory_bit_identical(runs):
    with_eval, plain = runs["pp2"][0], runs["pp2_plain"][0]
    assert losses(with_eval / "telemetry.jsonl") == losses(plain / "telemetry.jsonl")
    norms = lambda p: [r["grad_norm"] for r in records(p / "telemetry.jsonl", "train")]
    assert norms(with_eval) == norms(plain) and len(norms(plain)) == 2
    assert not records(plain / "telemetry.jsonl", "core")


def test_bad_quality_flags_are_refused_before_any_rank_starts(inputs, tmp_path):
    tokenizer, bundle = inputs
    base = _base(tokenizer)
    cases = [
        ([*base, "--eval-core-interval", "5"], "--eval-core-interval needs --eval-core-bundle"),
        ([*base, *_quality(bundle, "5")[:4], "--eval-core-interval", "-1"], "must be >= 0"),
        ([*base, "--eval-core-interval", "5", "--eval-core-bundle", str(tmp_path / "no")],
         "--eval-core-bundle directory not found"),
        ([*base, *_quality(bundle, "5"), "--eval-core-loops", "0"], "must be >= 1"),
        (["--config", "configs/parcae-tiny-cpu.yaml", "--mock-data", "--tokenizer-type",
          "NullTokenizer", "--vocab-size", "511", "--sample-interval", "5"],
         "--sample-interval needs a text tokenizer"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n")
    cases.append(([*base, "--eval-core-interval", "5", "--eval-core-bundle",
                   str(tmp_path / "empty")], "lacks eval_data/"))
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            check_command_line(argv, world_size=1)
    check_command_line([*base, *_quality(bundle, "5")], world_size=1)  # a good one passes
