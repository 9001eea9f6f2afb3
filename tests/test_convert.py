"""Megatron ↔ Hugging Face conversion on real training checkpoints (TP=1, TP=2, PP=2):
logit parity, bit-exact round trips, cached generation, training on from a converted
checkpoint, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from parcae_megatron.convert.__main__ import main as convert_main
from tests.training_runs import TINY, train

pytestmark = pytest.mark.slow
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2"])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Three real training checkpoints, 3 optimizer steps each (a high LR so that the
    zero-initialised projections move), saved under three layouts."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, (nproc, layout) in LAYOUTS.items():
        out[name] = root / name
        train(nproc, *TINY, "--train-iters", "3", "--lr", "0.05", "--eval-interval", "100",
              "--save-interval", "100", "--save", str(out[name]), *layout)
    return out


@pytest.fixture(scope="module")
def hf_dirs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    for name, ckpt in checkpoints.items():
        assert convert_main(["to-hf", "--load", str(ckpt), "--out", str(root / name)]) == 0
    return {name: root / name for name in checkpoints}


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_logits_equal_megatron(layout, checkpoints, hf_dirs, megatron_single):
    from parcae_megatron.convert.hf_io import build_hf_model
    from parcae_megatron.convert.mapping import megatron_to_hf_state
    from parcae_megatron.convert.megatron_ckpt import load_megatron_model
    from tests.conftest import perturb_

    megatron, _, _ = load_megatron_model(checkpoints[layout])
    hf = _hf(hf_dirs[layout])
    assert hf.transformer.recurrent[0].attn.c_proj.weight.abs().max() > 1e-3  # trained
    _assert_same_logits(megatron, hf)
    # Every tensor matters: perturb all Megatron weights and convert again in memory.
    perturb_(megatron, scale=0.05, seed=3)
    state = {k: v for k, v in megatron.state_dict().items() if isinstance(v, torch.Tensor)}
    _assert_same_logits(megatron, build_hf_model(
        hf.config, megatron_to_hf_state(state, megatron.config)))


def _assert_same_logits(megatron, hf) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 511, (2, 48), generator=gen)
    for T in (1, 3, 6):
        h0 = torch.randn(48, 2, megatron.config.hidden_size, generator=gen) * 0.05
        with torch.no_grad():
            ref = megatron(ids, num_iterations=T, initial_state=h0)
            out = hf(ids, num_iterations=T, initial_state=h0.transpose(0, 1), use_cache=False)
            ref_loss = megatron(ids[:, :-1], labels=ids[:, 1:], num_iterations=T,
                                initial_state=h0[:-1]).mean()
            loss = hf(ids, labels=ids, num_iterations=T, initial_state=h0.transpose(0, 1),
                      use_cache=False).loss
        assert out.logits.shape == ref.shape == (2, 48, 512)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-4)


def test_round_trip_is_bit_exact_and_trains_at_another_layout(hf_dirs, checkpoints, tmp_path,
                                                              megatron_single):
    from safetensors.torch import load_file

    from parcae_megatron.convert.megatron_ckpt import load_megatron_model

    back = tmp_path / "back"
    assert convert_main(["from-hf", "--hf", str(hf_dirs["tp2"]), "--save", str(back),
                         "--tensor-parallel", "2"]) == 0
    assert (back / "latest_checkpointed_iteration.txt").read_text() == "release"
    again = tmp_path / "again"
    assert convert_main(["to-hf", "--load", str(back), "--out", str(again)]) == 0
    first, second = (load_file(str(d / "model.safetensors")) for d in (hf_dirs["tp2"], again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    config = [json.loads((d / "config.json").read_text()) for d in (hf_dirs["tp2"], again)]
    assert config[0] == config[1]
    # The Megatron weights themselves survive the trip bit for bit.
    original, _, _ = load_megatron_model(checkpoints["tp2"])
    returned, _, _ = load_megatron_model(back)
    a, b = original.state_dict(), returned.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # An exported model trains on in Megatron, here at TP=2 (resharded on load).
    proc = train(2, *TINY, "--train-iters", "1", "--eval-interval", "100", "--save-interval",
                 "100", "--load", str(back), "--tensor-model-parallel-size", "2")
    assert "successfully loaded checkpoint" in proc.stdout + proc.stderr


def test_authors_release_goes_to_megatron_with_the_same_logits(hf_dirs, tmp_path,
                                                              megatron_single):
    """Authors' format (interleaved RoPE, fp32-eps QK-norm) → HF (rotate-half) → Megatron."""
    from parcae_megatron.convert.hf_io import load_hf_model
    from parcae_megatron.convert.megatron_ckpt import load_megatron_model
    from parcae_megatron.convert.official import FP32_EPS, export_official, import_official

    export_official(hf_dirs["tp1"], tmp_path / "release")
    import_official(tmp_path / "release", tmp_path / "imported", rope="rotate-half")
    imported = load_hf_model(tmp_path / "imported")
    assert imported.config.qk_norm_eps == FP32_EPS and not imported.config.rope_interleaved
    assert convert_main(["from-hf", "--hf", str(tmp_path / "imported"), "--save",
                         str(tmp_path / "megatron")]) == 0
    megatron, _, _ = load_megatron_model(tmp_path / "megatron")
    assert megatron.config.qk_layernorm_epsilon == FP32_EPS
    _assert_same_logits(megatron, imported)


def test_generate_with_cache_equals_without(hf_dirs):
    hf = _hf(hf_dirs["tp1"])
    prompt = torch.randint(0, 511, (2, 9), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for T in (1, 3):
        cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_iterations=T)
        plain = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_iterations=T,
                            use_cache=False)
        assert cached.shape == (2, 21)
        assert torch.equal(cached, plain)
        outputs[T] = cached
    # One KV-cache layer per executed attention layer: L_P + T·L_R + L_C.
    out = hf(prompt, num_iterations=3, use_cache=True)
    assert len(out.cache.layers) == 2 + 3 * 2 + 2
    with pytest.raises(ValueError, match="num_iterations=3"):
        hf(prompt[:, :1], cache=out.cache, num_iterations=2)


def test_initial_state_is_seedable(hf_dirs):
    hf = _hf(hf_dirs["tp1"])
    ids = torch.randint(0, 511, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seeded = [hf(ids, use_cache=False, state_seed=s).logits for s in (5, 5, 6)]
        fresh = [hf(ids, use_cache=False, state_seed=-1).logits for _ in range(2)]
        zero_a = hf(ids, use_cache=False, initial_state=torch.zeros(1, 16, 64)).logits
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    assert not torch.equal(fresh[0], fresh[1])
    hf.config.state_init = "zero"
    with torch.no_grad():
        zero_b = hf(ids, use_cache=False).logits
    torch.testing.assert_close(zero_a, zero_b, rtol=0, atol=0)


def test_bad_input_gives_clear_errors(hf_dirs, checkpoints, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert convert_main(list(argv)) == 2
        return capsys.readouterr().err

    assert "already exists; pass --overwrite" in fails("to-hf", "--load", str(checkpoints["tp1"]),
                                                "--out", str(hf_dirs["tp1"]))
    assert "not a Megatron checkpoint" in fails("to-hf", "--load", str(tmp_path), "--out",
                                                 str(tmp_path / "x"))
    broken = tmp_path / "broken_ckpt"
    shutil.copytree(checkpoints["tp1"], broken)
    for shard in broken.glob("iter_*/*.distcp"):
        shard.write_bytes(shard.read_bytes()[:1000])
    # Whichever record the truncation hits first (metadata or weights), one line names it.
    err = fails("to-hf", "--load", str(broken), "--out", str(tmp_path / "y"))
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "cannot load the" in line and str(broken) in line
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["tp1"], hf)
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:5000])
    assert "corrupt weight shard" in fails("from-hf", "--hf", str(hf), "--save",
                                           str(tmp_path / "z"))
    (hf / "model.safetensors").unlink()
    assert "no model.safetensors" in fails("from-hf", "--hf", str(hf), "--save",
                                           str(tmp_path / "z"))
    shutil.copy(hf_dirs["tp1"] / "model.safetensors", hf / "model.safetensors")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    assert "shape" in fails("from-hf", "--hf", str(hf), "--save", str(tmp_path / "z"))
    assert not (tmp_path / "z").exists() and not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory) -> Path:
    """One TP=2 launch: each injection type and the Transformer baseline, perturbed, its TP=2
    logits and its dist checkpoint (tests/dist/hf_parity_worker.py)."""
    from tests.distributed import torchrun

    out = tmp_path_factory.mktemp("every-kind")
    torchrun(2, "tests/dist/hf_parity_worker.py", "--out", str(out))
    return out


def test_hf_logits_equal_megatron_for_every_injection_type_at_tp1_and_tp2(
        every_kind, tmp_path, megatron_single):
    """Megatron at TP=2 (the launch) and at TP=1 (the same weights, resharded on load) give
    the logits of the Hugging Face export, for every registered injection type and for the
    Transformer baseline; the export runs as remote code (its loop maths ships with it)."""
    from megatron.core import dist_checkpointing

    from parcae_megatron.convert.hf_io import build_hf_model, write_hf_dir
    from parcae_megatron.convert.mapping import hf_config_from_megatron, megatron_to_hf_state
    from parcae_megatron.hf.loop_math import INJECTION_TYPES
    from parcae_megatron.model import ParcaeModel
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from tests.dist.hf_parity_worker import ITERATIONS, KINDS, inputs, kind_config

    assert set(KINDS) == {*INJECTION_TYPES, "transformer"}
    tp2_logits = torch.load(every_kind / "logits.pt")
    ids, h0 = inputs()
    for kind in KINDS:
        model = ParcaeModel(kind_config(kind), get_parcae_layer_local_spec()).eval()
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(),
                                                      str(every_kind / kind)))
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        hf = build_hf_model(hf_config_from_megatron(model.config, 32),
                            megatron_to_hf_state(state, model.config))
        write_hf_dir(hf, tmp_path / kind, None, overwrite=False)
        assert (tmp_path / kind / "loop_math.py").is_file()
        remote = _hf(tmp_path / kind)
        assert type(remote).__module__.startswith("transformers_modules")
        with torch.no_grad():
            tp1 = model(ids, num_iterations=ITERATIONS, initial_state=h0)
            out = remote(ids, num_iterations=ITERATIONS, initial_state=h0.transpose(0, 1),
                         use_cache=False).logits
        assert out.shape == tp1.shape == tp2_logits[kind].shape == (2, 16, 512), kind
        torch.testing.assert_close(out, tp1, rtol=0, atol=1e-4,
                                   msg=lambda m, kind=kind: f"{kind}: {m}")
        torch.testing.assert_close(out, tp2_logits[kind], rtol=0, atol=1e-4,
                                   msg=lambda m, kind=kind: f"{kind}: {m}")
