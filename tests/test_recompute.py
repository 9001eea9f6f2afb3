"""Activation recompute: Megatron's full (uniform / block) and selective recompute
and the per-iteration loop checkpoint give the gradients of no recompute at TP=1 (DP=2),
TP=2 (with and without sequence parallelism) and PP=2 (1F1B, several micro-batches in
flight), with per-sequence depths and compaction; loop checkpointing keeps only the loop
state; invalid combinations are refused."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import torchrun

WORKER = "tests/dist/recompute_worker.py"
MODES = ("full-uniform", "full-block", "selective", "loop", "loop+full", "loop+selective")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute") / "results.json"
    torchrun(2, WORKER, "--layouts", "1,1;2,1;2,1,1;1,2", "--out", str(out), timeout=1200)
    return {(r["tp"], r["pp"], r["sp"]): r for r in json.loads(out.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 1, 0), (2, 1, 0), (2, 1, 1), (1, 2, 0)],
                         ids=["tp1-dp2", "tp2", "tp2-sp", "pp2"])
def test_recompute_modes_match_no_recompute(runs, layout):
    result = runs[layout]
    stats = result["stats"]
    # per-sequence depths with compaction: executed work is Σ T_i, and depths differ
    assert stats["executed"] == stats["sampled"] > stats["sequences"] > 0
    for mode in MODES:
        assert result[mode]["nonzero_grads"] > 0, mode
        assert result[mode]["max_rel_diff"] <= 1e-6, (mode, result[mode])


def test_loop_checkpointing_keeps_only_loop_state(megatron_single):
    """Saved bytes: no-grad iterations add nothing; loop checkpoints keep far less."""
    from parcae_megatron.model import ParcaeModel, preset_config
    from parcae_megatron.model.activation_memory import SavedTensorMeter
    from parcae_megatron.model.depth import DepthSample
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec

    def saved(total: int, **kw) -> int:
        cfg = preset_config("parcae-tiny", use_cpu_initialization=True, mean_recurrence=total,
                            mean_backprop_depth=2, **kw)
        model = ParcaeModel(cfg, get_parcae_layer_local_spec())
        model.train()
        ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
        with SavedTensorMeter(model) as meter:
            model(ids, labels=ids, depths=DepthSample.fixed(2, total, 2))
        return meter.bytes

    assert saved(8) == saved(2)  # the 6 no-grad iterations save nothing
    assert saved(4, recompute_loop_iterations=True) < 0.75 * saved(4)


@pytest.mark.parametrize("overrides, message", [
    (dict(recompute_loop_iterations=True, num_recurrent_layers=0, num_prelude_layers=4),
     "needs a recurrent block"),
    (dict(recompute_loop_iterations=True, hidden_dropout=0.1), "needs dropout 0"),
])
def test_invalid_loop_recompute_refused(overrides, message):
    from parcae_megatron.model import preset_config
    from parcae_megatron.model.config import ParcaeConfigError

    with pytest.raises(ParcaeConfigError, match=message):
        preset_config("parcae-tiny", **overrides)
