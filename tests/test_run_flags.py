"""Parcae's run flags: ``--init-seed`` varies the initial weights with the data order fixed
(without it the weights follow ``--seed`` as before); ``--muon-ns-dtype`` is parsed apart
from Megatron's ``--muon-fp32-matmul-prec``."""

from __future__ import annotations

import pytest
import torch

from parcae_megatron.training.arguments import parcae_config_from_args
from tests.test_flag_policy import CPU_FLAGS, TINY, parse


def _weights(args) -> dict[str, torch.Tensor]:
    from parcae_megatron.model import ParcaeModel
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec

    cfg = parcae_config_from_args(args, vocab_size=512)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec(), dp_rank=0, dp_size=1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _first_samples(args, n: int = 4) -> list[list[int]]:
    """The first training samples of the run's (mock) GPT dataset, in the run's order."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import MockGPTDataset
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    from parcae_megatron.training.data import gpt_dataset_config_from_args

    config = gpt_dataset_config_from_args(args, NullTokenizer(511))
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [n, 0, 0], lambda: True,
                                                config).build()
    return [train[i]["tokens"].tolist() for i in range(n)]


def test_init_seed_changes_weights_not_data_order(monkeypatch, megatron_single):
    default = parse(monkeypatch, *CPU_FLAGS, *TINY)
    other_init = parse(monkeypatch, *CPU_FLAGS, *TINY, "--init-seed", "7")
    other_data = parse(monkeypatch, *CPU_FLAGS, *TINY, "--seed", "99", "--init-seed",
                       str(default.seed))
    assert default.init_seed is None  # default: --seed
    assert parcae_config_from_args(default, vocab_size=512).init_seed == default.seed
    assert parcae_config_from_args(other_init, vocab_size=512).init_seed == 7
    assert default.init_seed is None and other_init.seed == default.seed

    base = _weights(default)
    assert _weights(default).keys() == base.keys()
    assert all(torch.equal(base[k], v) for k, v in _weights(default).items())  # deterministic
    changed = _weights(other_init)
    # Drawn weights: all but constants (zeros, norm gains) and the injection's fixed init
    # (B = I, dt_bias from the decay target: docs/design.md §5).
    random = [k for k, v in base.items()
              if v.std() > 0 and k not in ("injection.B", "injection.dt_bias")]
    assert len(random) > 10 and all(not torch.equal(base[k], changed[k]) for k in random)
    fixed = set(base) - set(random)
    assert all(torch.equal(base[k], changed[k]) for k in fixed)
    # The weights depend on --init-seed only: another --seed with the same init seed.
    assert all(torch.equal(base[k], v) for k, v in _weights(other_data).items())

    # The data order depends on --seed only.
    order = _first_samples(default)
    assert _first_samples(other_init) == order
    assert _first_samples(other_data) != order


def test_muon_ns_dtype_flag(monkeypatch, capsys):
    args = parse(monkeypatch, *CPU_FLAGS, *TINY, "--optimizer", "parcae_muon",
                 "--muon-tp-mode", "duplicated", "--muon-ns-dtype", "bf16")
    assert (args.muon_ns_dtype, args.muon_fp32_matmul_prec) == ("bf16", "high")
    assert parse(monkeypatch, *CPU_FLAGS, *TINY).muon_ns_dtype == "fp32"  # the CPU config's
    with pytest.raises(SystemExit) as exit_info:
        parse(monkeypatch, *CPU_FLAGS, *TINY, "--muon-ns-dtype", "fp16")
    assert exit_info.value.code == 2
    assert "--muon-ns-dtype: invalid choice" in capsys.readouterr().err
