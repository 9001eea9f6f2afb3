"""The authors' checkpoint format (parcae_megatron.convert.official): export → import is
bit-exact, the files follow the documented layout, logits are preserved, bad input fails
clearly."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from parcae_megatron.convert.errors import ConversionError
from parcae_megatron.convert.official import (
    FP32_EPS,
    OfficialFormatError,
    add_official_subcommands,
    check_value_embedding_rules,
    export_official,
    freqs_cis,
    import_official,
)
from parcae_megatron.hf.configuration_parcae import ParcaeConfig
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM


class Payload:
    """An arbitrary class: a weights_only load must refuse to rebuild it."""


METADATA = {"architectures", "_name_or_path", "dtype", "auto_map", "transformers_version"}


def tiny_config(**overrides) -> ParcaeConfig:
    """Even stages, value embeddings on, settings the authors' format can express."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                head_dim=32, num_prelude_layers=2, num_recurrent_layers=2, num_coda_layers=2,
                mean_recurrence=3, mean_backprop_depth=2, max_position_embeddings=32,
                rope_interleaved=True, qk_norm_eps=FP32_EPS, state_seed=0)
    return ParcaeConfig(**{**base, **overrides})


def random_model(seed: int = 0, **overrides) -> ParcaeForCausalLM:
    torch.manual_seed(seed)
    model = ParcaeForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # move norms/adapter off their init values so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def config_fields(model: ParcaeForCausalLM) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in METADATA}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    model = random_model()
    export_official(model, d / "official")
    import_official(d / "official", d / "hf")
    return model, d


def test_export_import_is_bit_exact(exported):
    model, d = exported
    back = ParcaeForCausalLM.from_pretrained(d / "hf").eval()
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert config_fields(back) == config_fields(model)
    assert back.config.rope_interleaved and back.config.mean_backprop_depth == 2


def test_files_follow_the_authors_layout(exported):
    model, d = exported
    cfg = json.loads((d / "official" / "config.json").read_text())
    assert cfg["_class_name"] == "ParcaeConfig"
    assert (cfg["n_embd"], cfg["n_layers_in_recurrent_block"], cfg["mean_recurrence"],
            cfg["mean_backprop_depth"], cfg["block_size"]) == (64, 2, 3, 2, 32)
    assert cfg["injection_type"] == "diagonal" and cfg["rope_settings"]["rope_base"] == 50000
    state = torch.load(d / "official" / "pytorch_model.bin", weights_only=True)
    keys = list(state)
    assert keys[0] == "freqs_cis" and keys[1] == "transformer.wte.weight"
    assert keys[-1] == "lm_head.weight"
    assert [k for k in keys if k.startswith("value_embeds.")] == [
        "value_embeds.1.weight", "value_embeds.3.weight", "value_embeds.5.weight"]
    assert keys.index("transformer.adapter.A_log") < keys.index("transformer.core_block.0."
                                                                "norm_1.weight")
    gates = sorted(k for k in keys if k.endswith("ve_gate.weight"))
    assert gates == [f"transformer.{s}.1.attn.ve_gate.weight"
                     for s in ("coda", "core_block", "prelude")]
    assert state["transformer.prelude.1.attn.ve_gate.weight"].shape == (2, 32)
    assert state["freqs_cis"].shape == (1, 32, 1, 16, 2)
    angle = 5 * 50000 ** (-2 * 3 / 32)  # position 5, frequency 3
    assert state["freqs_cis"][0, 5, 0, 3].tolist() == pytest.approx(
        [torch.cos(torch.tensor(angle)).item(), torch.sin(torch.tensor(angle)).item()], abs=1e-6)
    # The tied head is one storage, as torch.save of the authors' model writes it.
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    assert len(keys) == 9 + 8 * 6 + 3 + 3


@pytest.mark.parametrize("iterations", [1, 3])
def test_imported_logits_equal_original(exported, iterations):
    model, d = exported
    back = ParcaeForCausalLM.from_pretrained(d / "hf").eval()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    h0 = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    with torch.no_grad():
        want = model(ids, num_iterations=iterations, initial_state=h0, use_cache=False).logits
        got = back(ids, num_iterations=iterations, initial_state=h0, use_cache=False).logits
    assert torch.equal(want, got)


def test_rotate_half_models_convert_exactly(tmp_path):
    """A Megatron-convention (rotate-half) model: export permutes c_q/c_k rows to the
    authors' interleaved order; importing back either way preserves the function."""
    model = random_model(seed=3, rope_interleaved=False)
    export_official(model, tmp_path / "official")
    import_official(tmp_path / "official", tmp_path / "rh", rope="rotate-half")
    import_official(tmp_path / "official", tmp_path / "il")
    rh = ParcaeForCausalLM.from_pretrained(tmp_path / "rh").eval()
    il = ParcaeForCausalLM.from_pretrained(tmp_path / "il").eval()
    assert all(torch.equal(v, rh.state_dict()[k]) for k, v in model.state_dict().items())
    assert not torch.equal(il.transformer.prelude[0].attn.c_q.weight,
                           model.transformer.prelude[0].attn.c_q.weight)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids, num_iterations=2, use_cache=False).logits
        got = il(ids, num_iterations=2, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save(edit(dict(state)), dst / "pytorch_model.bin")
    return dst


def test_wrapper_prefixes_and_safetensors_are_accepted(exported, tmp_path):
    model, d = exported
    src = d / "official"
    prefixed = _edit_checkpoint(src, tmp_path / "prefixed", lambda s: {
        f"_orig_mod.module.{k}": v.clone() for k, v in s.items()})
    import_official(prefixed, tmp_path / "hf1")
    from safetensors.torch import save_file

    st_dir = tmp_path / "st"
    st_dir.mkdir()
    (st_dir / "config.json").write_text((src / "config.json").read_text())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    save_file({k: v.clone() for k, v in state.items()}, str(st_dir / "model.safetensors"))
    import_official(st_dir / "model.safetensors", tmp_path / "hf2")
    for out in ("hf1", "hf2"):
        back = ParcaeForCausalLM.from_pretrained(tmp_path / out)
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("edit, message", [
    (lambda s: {k: v for k, v in s.items() if k != "transformer.C.weight"},
     "missing keys: transformer.C.weight"),
    (lambda s: {**s, "transformer.extra.weight": torch.zeros(2)},
     "unexpected keys: transformer.extra.weight"),
    (lambda s: {**s, "transformer.coda.0.mlp.fc.weight": torch.zeros(64, 64)},
     "shape mismatch: transformer.coda.0.mlp.fc.weight: file (64, 64), config (128, 64)"),
    (lambda s: {**s, "lm_head.weight": s["lm_head.weight"] + 1},
     "lm_head.weight differs from transformer.wte.weight"),
    (lambda s: {**s, "freqs_cis": freqs_cis(32, 32, 10000.0)}, "freqs_cis differs"),
])
def test_bad_weights_fail_clearly(exported, tmp_path, edit, message):
    bad = _edit_checkpoint(exported[1] / "official", tmp_path / "bad", edit)
    with pytest.raises(OfficialFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_official(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_files_and_existing_output_fail_clearly(exported, tmp_path):
    src = exported[1] / "official"
    with pytest.raises(FileNotFoundError, match="no weights file"):
        import_official(tmp_path, tmp_path / "out")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((src / "config.json").read_text())
    (corrupt / "pytorch_model.bin").write_bytes((src / "pytorch_model.bin").read_bytes()[:5000])
    with pytest.raises(OfficialFormatError, match="cannot read weights"):
        import_official(corrupt, tmp_path / "out")
    evil = _edit_checkpoint(src, tmp_path / "evil", lambda s: {**s, "x": Payload()})
    with pytest.raises(OfficialFormatError, match="cannot read weights"):  # weights_only
        import_official(evil, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        import_official(src, tmp_path / "taken")
    import_official(src, tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists()
    assert (tmp_path / "taken" / "model.safetensors").is_file()
    with pytest.raises(ConversionError, match="--overwrite"):
        export_official(exported[0], tmp_path / "taken")


def test_config_checks(exported, tmp_path):
    # 1/1/1 layers: the authors' table rule and gate rule pick different layers.
    with pytest.raises(OfficialFormatError, match="different layers"):
        check_value_embedding_rules(1, 1, 1, 8, 4)
    check_value_embedding_rules(4, 4, 4, 8, 4)
    with pytest.raises(OfficialFormatError, match="injection_type"):
        export_official(random_model(injection_type="diagonal_exact_zoh"), tmp_path / "x")
    raw = json.loads((exported[1] / "official" / "config.json").read_text())
    bad = tmp_path / "cfg"
    bad.mkdir()
    (bad / "pytorch_model.bin").symlink_to(exported[1] / "official" / "pytorch_model.bin")
    for change, message in [({"n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 1,
                              "n_layers_in_coda": 1},
                             "different layers"),
                            ({"_class_name": "GPTConfig"}, "not a Parcae checkpoint"),
                            ({"nonlin_name": "GELU"}, "nonlin_name"),
                            ({"mean_backprop_depth": None}, "mean_backprop_depth")]:
        (bad / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(OfficialFormatError, match=message):
            import_official(bad, tmp_path / "out")


def test_cli_handlers(exported, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_official_subcommands(parser.add_subparsers(dest="command", required=True))
    src = exported[1] / "official"
    args = parser.parse_args(["official-import", str(src), "--out", str(tmp_path / "hf"),
                              "--state-seed", "none"])
    assert args.handler(args) == 0
    assert ParcaeForCausalLM.from_pretrained(tmp_path / "hf").config.state_seed is None
    args = parser.parse_args(["official-export", str(tmp_path / "hf"), "--out",
                              str(tmp_path / "again"), "--name", "tiny"])
    assert args.handler(args) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["name"] == "tiny"
    a = torch.load(src / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "again" / "pytorch_model.bin", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert args.handler(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_import_refuses_a_tokenizer_without_usable_bos(exported, tmp_path, capsys):
    """A SentencePiece model without BOS (or with more pieces than the model's vocabulary)
    is refused in one ``error:`` line, before anything is written."""
    from tests.sentencepiece_models import train_standard_spm

    parser = argparse.ArgumentParser()
    add_official_subcommands(parser.add_subparsers(dest="command", required=True))
    src = exported[1] / "official"
    cases = [(train_standard_spm(tmp_path / "nobos.model", bos=False), "has no BOS piece"),
             (train_standard_spm(tmp_path / "std.model"),  # 300 pieces, 128-row model
              "300 pieces but the model's vocabulary has 128 rows")]
    for model_file, message in cases:
        args = parser.parse_args(["official-import", str(src), "--out", str(tmp_path / "hf"),
                                  "--tokenizer", str(model_file)])
        assert args.handler(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: tokenizer ") and message in err[0]
        assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("injection_type, official_name, adapter", [
    ("diagonal", "diagonal", {"A_log": (64,), "dt_bias": (64,), "B": (64, 64)}),
    ("concat_linear", "linear", {"adapter.weight": (64, 128)}),
    ("additive", "add", {})])
def test_every_authors_injection_type_goes_megatron_official_hf(
        megatron_single, tmp_path, injection_type, official_name, adapter):
    """Megatron → HF → official-export → official-import → HF: the authors' files name the
    type and hold its adapter as they do, and the logits stay the Megatron model's."""
    from parcae_megatron.convert.hf_io import build_hf_model
    from parcae_megatron.convert.mapping import hf_config_from_megatron, megatron_to_hf_state
    from parcae_megatron.model import ParcaeModel, preset_config
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from tests.conftest import perturb_

    megatron = ParcaeModel(preset_config("parcae-tiny", injection_type=injection_type),
                           get_parcae_layer_local_spec()).eval()
    perturb_(megatron, seed=5)
    state = {k: v for k, v in megatron.state_dict().items() if isinstance(v, torch.Tensor)}
    hf = build_hf_model(hf_config_from_megatron(megatron.config, 32),
                        megatron_to_hf_state(state, megatron.config))
    export_official(hf, tmp_path / "release")
    raw = json.loads((tmp_path / "release" / "config.json").read_text())
    assert raw["injection_type"] == official_name
    weights = torch.load(tmp_path / "release" / "pytorch_model.bin", weights_only=True)
    prefix = "transformer.adapter."
    assert {k[len(prefix):]: tuple(v.shape) for k, v in weights.items()
            if k.startswith(prefix)} == adapter
    import_official(tmp_path / "release", tmp_path / "hf", rope="rotate-half", qk_norm_eps=1e-5)
    back = ParcaeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.injection_type == injection_type
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in hf.state_dict().items())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 16), generator=gen)
    h0 = torch.randn(16, 2, 64, generator=gen) * 0.05
    with torch.no_grad():
        ref = megatron(ids, num_iterations=3, initial_state=h0)
        out = back(ids, num_iterations=3, initial_state=h0.transpose(0, 1), use_cache=False)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)


def test_authors_adapters_act_on_state_then_input():
    """The authors' ``linear`` is one matrix on cat([h, e]) and ``add`` is h + e: our types
    compute exactly that with the same tensor."""
    from parcae_megatron.hf.loop_math import INJECTIONS

    gen = torch.Generator().manual_seed(0)
    w, h, e = (torch.randn(*shape, generator=gen) for shape in ((8, 16), (3, 8), (3, 8)))
    linear, add = INJECTIONS["concat_linear"], INJECTIONS["additive"]
    u = linear.step({"weight": w}, h, linear.prepare({"weight": w}, e, 1e-6))
    torch.testing.assert_close(u, torch.nn.functional.linear(torch.cat([h, e], -1), w))
    assert torch.equal(add.step({}, h, add.prepare({}, e, 1e-6)), h + e)


def _document_of(tok, texts: list[str], length: int) -> str:
    """A text whose ids are exactly ``length`` tokens and re-encode to themselves."""
    for text in texts:
        ids = tok.tokenize(text)[:length]
        piece = tok.detokenize(ids)
        if len(ids) == length and tok.tokenize(piece) == ids:
            return piece
    raise AssertionError(f"no corpus text gives {length} stable tokens")


@pytest.mark.slow
def test_authors_release_with_its_tokenizer_json_end_to_end(tmp_path):
    """The authors' release with an hf-bpe ``tokenizer.json``: official-import gives a fast
    ``AutoTokenizer`` (no remote code) with the training tokenizer's ids; evaluation scores
    text with it; from-hf → ``train --load`` on data preprocessed with the same tokenizer
    starts at the HF model's loss on the same batch. Every document is the same 32 tokens
    (BOS text EOS), so every 64-token training sample, whatever the shuffle, is known."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from data_prep import preprocess
    from data_prep.corpus import build_default_corpus
    from data_prep.tokenizer import load_tokenizer
    from data_prep.train_tokenizer import train_tokenizer
    from parcae_megatron.convert.__main__ import main as convert_main
    from parcae_megatron.convert.hf_io import load_hf_model
    from parcae_megatron.evaluate.__main__ import main as evaluate_main
    from tests.test_core_eval import _std_bundle
    from tests.training_runs import losses, train

    build_default_corpus(str(tmp_path / "corpus.jsonl"), max_bytes=200_000)
    train_tokenizer([str(tmp_path / "corpus.jsonl")], str(tmp_path / "bpe"), vocab_size=512,
                    workers=1, kind="hf-bpe")
    released = tmp_path / "release"
    # The parcae-tiny preset's shape, so the trainer's config matches the checkpoint.
    export_official(random_model(seed=5, vocab_size=512, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                 mean_recurrence=4, max_position_embeddings=64), released)
    # As the authors ship it: a bare tokenizer.json beside the weights.
    shutil.copy(tmp_path / "bpe" / "tokenizer.json", released / "tokenizer.json")
    tok = load_tokenizer(released / "tokenizer.json")
    hf_dir = tmp_path / "hf"
    parser = argparse.ArgumentParser()
    add_official_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["official-import", str(released), "--out", str(hf_dir),
                              "--rope", "rotate-half", "--qk-norm-eps", "1e-5",
                              "--tokenizer", str(released / "tokenizer.json")])
    assert args.handler(args) == 0

    # A fast tokenizer without remote code, the training tokenizer's ids. (transformers 5
    # reads config.json first and would ask about the model's code; the tokenizer needs none.)
    fast = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    assert isinstance(fast, PreTrainedTokenizerFast) and fast.is_fast
    assert "auto_map" not in json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert "AutoTokenizer" not in json.loads((hf_dir / "config.json").read_text())["auto_map"]
    texts = [json.loads(x)["text"] for x in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    for text in texts[:20] + ["digits 1234567 and  spaces\n\tüñí 🤖"]:
        assert fast.encode(text, add_special_tokens=False) == tok.tokenize(text)
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (tok.bos, tok.eos, tok.pad)

    # Evaluation scores text through the export's tokenizer, bits per byte included.
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                  for t in texts[:4]))
    assert evaluate_main(["--hf", str(hf_dir), "--text", str(tmp_path / "valid.jsonl"),
                          "--seq-length", "32", "--max-sequences", "2", "--iterations", "1",
                          "--device", "cpu", "--out", str(tmp_path / "eval.json"),
                          "--quiet"]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert rows and all(r["bpb"] is not None and r["bpb"] > 0 for r in rows)
    bundle = _std_bundle(tmp_path / "bundle")  # CORE's prompts through the same tokenizer
    assert evaluate_main(["core", "--hf", str(hf_dir), "--bundle", str(bundle), "--tasks-yaml",
                          str(bundle / "core.yaml"), "--T", "1", "--seeds", "1", "--quiet",
                          "--device", "cpu", "--out", str(tmp_path / "core.json")]) == 0
    assert json.loads((tmp_path / "core.json").read_text())["tasks"][0]["by_T"]["1"]["items"] == 4

    # Training data from the same tokenizer.json; every document 32 tokens with BOS and EOS.
    doc = _document_of(tok, texts, 30)
    (tmp_path / "train.jsonl").write_text((json.dumps({"text": doc}) + "\n") * 400)
    data = str(tmp_path / "data")
    assert preprocess.main([str(tmp_path / "train.jsonl"), "--tokenizer",
                            str(released / "tokenizer.json"), "--output", data,
                            "--quiet"]) == 0
    assert convert_main(["from-hf", "--hf", str(hf_dir), "--save", str(tmp_path / "mcore")]) == 0
    proc = train(1, "--config", "configs/parcae-tiny-cpu.yaml", "--seq-length", "64",
                 "--tokenizer-model", str(hf_dir), "--load", str(tmp_path / "mcore"),
                 "--train-data-path", "1.0", data, "--valid-data-path", "1.0", data,
                 "--depth-sampling", "fixed", "--state-init", "zero", "--train-iters", "1",
                 "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
                 "--save-interval", "100", "--telemetry-path", str(tmp_path / "t.jsonl"))
    log = proc.stdout + proc.stderr
    assert "successfully loaded checkpoint" in log
    first = losses(tmp_path / "t.jsonl").get(1)
    sample = torch.tensor(([tok.bos] + tok.tokenize(doc) + [tok.eos]) * 3)[:65]
    model = load_hf_model(hf_dir).float()
    with torch.no_grad():
        logits = model(sample[None, :64], num_iterations=4, use_cache=False,
                       initial_state=torch.zeros(1, 64, 64)).logits
    hf_loss = torch.nn.functional.cross_entropy(logits[0], sample[1:]).item()
    print(f"round trip: HF loss {hf_loss:.6f}, first-step loss {first}")
    assert first is not None and abs(first - hf_loss) <= 1e-4 * hf_loss
