"""YAML configs with ``base:``: the FP8 config is the 1.3B config plus FP8 keys by
construction; a missing base or a cycle is one `error:` line (exit 2)."""

from __future__ import annotations

import pytest

from parcae_megatron.config_file import ConfigFileError, load_config, standalone_text
from tests.distributed import ROOT
from tests.test_flag_policy import DATA, parse, refused

FP8_KEYS = {"transformer-impl", "fp8-format", "fp8-recipe", "no-stream-ckpt-dequant"}


def test_fp8_config_is_the_1p3b_config_plus_fp8_keys():
    base = load_config(ROOT / "configs/parcae-1.3b.yaml")
    fp8 = load_config(ROOT / "configs/parcae-1.3b-fp8.yaml")
    assert "base" not in fp8
    assert {k for k in base.keys() | fp8.keys() if base.get(k) != fp8.get(k)} == FP8_KEYS
    assert (fp8["fp8-format"], fp8["fp8-recipe"]) == ("hybrid", "tensorwise")
    assert fp8["bf16"] is True and fp8["packing"] == "bestfit"  # from the base


def test_resolved_arguments_differ_only_in_fp8(monkeypatch):
    """Both configs through the trainer's whole parse + validation: every resulting Megatron
    / Parcae argument is equal except the FP8 ones."""
    flags = [*DATA, "--global-batch-size", "8", "--micro-batch-size", "8"]
    base = vars(parse(monkeypatch, "--config", str(ROOT / "configs/parcae-1.3b.yaml"), *flags))
    fp8 = vars(parse(monkeypatch, "--config", str(ROOT / "configs/parcae-1.3b-fp8.yaml"),
                     *flags))
    differ = {k for k in base.keys() | fp8.keys() if base.get(k) != fp8.get(k)}
    # config: the file name; fp8: --fp8-format's destination; stream_ckpt_dequant: Megatron
    # turns it off for tensorwise FP8. transformer_impl is TE in both (Megatron's default
    # without the CPU backend's --transformer-impl local).
    assert differ == {"config", "fp8", "fp8_recipe", "stream_ckpt_dequant"}, differ
    assert (fp8["fp8"], fp8["fp8_recipe"], base["fp8"]) == ("hybrid", "tensorwise", None)


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_chain_overrides_in_order(tmp_path):
    _write(tmp_path, "a.yaml", "lr: 1.0\nbf16: true\ntrain-iters: 10\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\nlr: 2.0\n")
    c = _write(tmp_path, "c.yaml", "base: b.yaml\ntrain-iters: 20\nseed: 3\n")
    assert load_config(c) == {"lr": 2.0, "bf16": True, "train-iters": 20, "seed": 3}
    # a job directory keeps a self-contained copy
    assert "\nbase:" not in standalone_text(c) and "lr: 2.0" in standalone_text(c)
    assert standalone_text(tmp_path / "a.yaml") == (tmp_path / "a.yaml").read_text()


def test_base_in_the_configs_directory_from_elsewhere(tmp_path):
    own = _write(tmp_path, "mine.yaml", "base: parcae-1.3b.yaml\nlr: 0.001\n")
    resolved = load_config(own)
    assert resolved["lr"] == 0.001 and resolved["preset"] == "parcae-1.3b"


@pytest.mark.parametrize("files, message", [
    ({"x.yaml": "base: nowhere.yaml\n"}, "base config not found: nowhere.yaml"),
    ({"x.yaml": "base: y.yaml\n", "y.yaml": "base: x.yaml\n"},
     "config base cycle: x.yaml -> y.yaml -> x.yaml"),
    ({"x.yaml": "base: x.yaml\n"}, "config base cycle: x.yaml -> x.yaml"),
    ({"x.yaml": "base: [1]\n"}, "base must be a config file name"),
    ({"x.yaml": "- a\n- b\n"}, "expected a mapping of flag: value"),
])
def test_bad_base_is_one_error_line(tmp_path, monkeypatch, capsys, files, message):
    for name, text in files.items():
        _write(tmp_path, name, text)
    with pytest.raises(ConfigFileError, match=message.replace("[", r"\[")):
        load_config(tmp_path / "x.yaml")
    line = refused(monkeypatch, capsys, "--config", str(tmp_path / "x.yaml"), *DATA)
    assert message in line
