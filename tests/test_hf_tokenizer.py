"""ParcaeTokenizer (the HF face of our SentencePiece model): same ids as data_prep's tokenizer,
lossless decode, BOS as in the training data, save_pretrained + AutoTokenizer offline."""

from __future__ import annotations

import json

import pytest

from data_prep.corpus import build_default_corpus
from data_prep.tokenizer import load_tokenizer
from data_prep.train_tokenizer import train_tokenizer
from parcae_megatron.hf.tokenization_parcae import ParcaeTokenizer, save_tokenizer

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "digits 1234567890 and 3.14159e-10",
    "unicode: é ñ ü ß 日本語 中文 🤖🚀 Ω≈ç√",
    "literal specials <|bos|> <|eos|> <|pad|> <unk> stay text",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tok")
    build_default_corpus(str(d / "train.jsonl"), max_bytes=60_000)
    train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=400, workers=1,
                    character_coverage=1.0)
    save_tokenizer(str(d / "tok.model"), str(d / "hf"))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d / "hf"), trust_remote_code=True,
                                       local_files_only=True)
    texts = [json.loads(line)["text"][:2000] for line in
             (d / "train.jsonl").read_text().splitlines()[:5]]
    return load_tokenizer(str(d / "tok.model")), hf, d, texts


def test_ids_match_data_prep(toks):
    ref, hf, _, texts = toks
    assert type(hf).__name__ == "ParcaeTokenizer"
    for text in SAMPLES + texts:
        ids = ref.tokenize(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:40]
        # Default: a leading <|bos|>, as data_prep.preprocess starts every document.
        assert hf(text)["input_ids"] == [ref.bos] + ids
        assert hf.decode(ids) == ref.detokenize(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    assert hf.vocab_size == len(hf) == ref.vocab_size == 400


def test_decode_and_special_tokens(toks):
    ref, hf, _, _ = toks
    ids = hf("héllo wörld 42")["input_ids"] + [hf.eos_token_id]
    assert hf.decode(ids) == "<|bos|>héllo wörld 42<|eos|>"
    assert hf.decode(ids, skip_special_tokens=True) == "héllo wörld 42"
    assert hf.decode([hf.bos_token_id]) == "<|bos|>"  # lm-eval checks prompts for this prefix
    # Byte-fallback pieces of one character decode together, not as replacement characters.
    emoji = hf.encode("🤖", add_special_tokens=False)
    assert len(emoji) > 1 and hf.decode(emoji) == "🤖"
    assert all(p.startswith("<0x") for p in hf.convert_ids_to_tokens(emoji))
    both = ParcaeTokenizer(vocab_file=ref.model_path, add_eos_token=True)
    assert both("ab")["input_ids"] == [1, *ref.tokenize("ab"), 2]
    assert both("ab", add_special_tokens=False)["input_ids"] == ref.tokenize("ab")
    n = len(ref.tokenize("ab"))
    assert both.get_special_tokens_mask(ref.tokenize("ab")) == [1] + [0] * n + [1]
    assert both.num_special_tokens_to_add() == 2


def test_batch_padding_and_saved_files(toks):
    _, hf, d, _ = toks
    batch = hf(["a b", "a longer line of text"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2
    short = batch["attention_mask"][0].sum().item()
    assert (batch["input_ids"][0, short:] == hf.pad_token_id).all()
    config = json.loads((d / "hf" / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_parcae.ParcaeTokenizer"
    assert {p.name for p in (d / "hf").iterdir()} >= {"tokenizer.model", "tokenizer_config.json",
                                                      "tokenization_parcae.py"}
    assert (d / "hf" / "tokenizer.model").read_bytes() == (d / "tok.model").read_bytes()
    # The copied module imports only transformers and sentencepiece (it runs from the HF dir).
    source = (d / "hf" / "tokenization_parcae.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "os", "shutil", "sentencepiece", "transformers"}


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        save_tokenizer(str(tmp_path / "nope.model"), str(tmp_path / "out"))


# -- HF exports: a verified tokenizer.json beside tokenizer.model --------------------------------
@pytest.fixture(scope="module")
def export(toks):
    """A tiny model exported with the SentencePiece tokenizer: its directory and the files
    written into it."""
    from parcae_megatron.convert.hf_io import write_hf_dir
    from parcae_megatron.hf.configuration_parcae import ParcaeConfig
    from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM

    ref, _, d, _ = toks
    cfg = ParcaeConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, head_dim=16, num_prelude_layers=1,
                       num_recurrent_layers=1, num_coda_layers=1, mean_recurrence=2,
                       mean_backprop_depth=1, max_position_embeddings=64)
    write_hf_dir(ParcaeForCausalLM(cfg), d / "export", d / "tok.model", overwrite=False)
    return d / "export"


def test_export_has_a_fast_tokenizer_with_the_training_ids(toks, export):
    """AutoTokenizer on the export, without remote code, is a fast tokenizer giving the
    training tokenizer's ids (BOS first, as every training document) on the held-out part of
    the embedded corpus and the fixed strings; with remote code allowed, the same one."""
    from transformers import AutoTokenizer

    from parcae_megatron.convert.fast_tokenizer import verification_texts

    ref, _, _, texts = toks
    assert {p.name for p in export.iterdir()} >= {"tokenizer.model", "tokenizer.json",
                                                  "tokenizer_config.json"}
    assert not (export / "tokenization_parcae.py").exists()
    assert "auto_map" not in json.loads((export / "tokenizer_config.json").read_text())
    assert "AutoTokenizer" not in json.loads((export / "config.json").read_text())["auto_map"]
    assert (export / "tokenizer.model").read_bytes() == open(ref.model_path, "rb").read()
    fast = AutoTokenizer.from_pretrained(export, trust_remote_code=False)
    assert fast.is_fast and type(fast).__module__.startswith("transformers.")
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id, fast.unk_token_id,
            len(fast)) == (ref.bos, ref.eos, ref.pad, ref.unk, ref.vocab_size)
    for text in SAMPLES + texts + list(verification_texts()[-4:]):
        ids = ref.tokenize(text)
        assert fast(text)["input_ids"] == [ref.bos] + ids, text[:40]
        assert fast.encode(text, add_special_tokens=False) == ids
        assert fast.decode(ids) == ref.detokenize(ids)
    assert fast.decode([ref.bos, *ref.tokenize("a")]) == "<|bos|>a"  # lm-eval's prefix check
    trusted = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    assert trusted.is_fast and trusted("x y 12")["input_ids"] == fast("x y 12")["input_ids"]


def test_export_tools_keep_the_sentencepiece_model(toks, export, tmp_path):
    """Our own readers take tokenizer.model from the export (the training tokenizer): the
    loader, from-hf (the checkpoint's tokenizer flags) and evaluation; the tokenizer.json read
    on its own gives the same ids, literal special-token text included."""
    from data_prep.tokenizer import load_tokenizer
    from parcae_megatron.convert.__main__ import main as convert_main
    from parcae_megatron.convert.megatron_ckpt import (
        load_checkpoint_args,
        resolve_checkpoint_dir,
    )
    from parcae_megatron.evaluate.runner import load_hf_tokenizer

    ref, _, _, texts = toks
    tok = load_tokenizer(export)
    assert type(tok) is type(ref) and tok.sha256 == ref.sha256
    assert convert_main(["from-hf", "--hf", str(export), "--save", str(tmp_path / "mc")]) == 0
    args = load_checkpoint_args(resolve_checkpoint_dir(tmp_path / "mc"))
    assert (args.tokenizer_type, args.tokenizer_model) == ("SentencePieceTokenizer",
                                                           str(export / "tokenizer.model"))
    assert type(load_hf_tokenizer(str(export), 400)).__name__ == "ParcaeTokenizer"
    copy = load_tokenizer(export / "tokenizer.json")
    assert (copy.kind, copy.bos, copy.eos, copy.pad) == ("huggingface", ref.bos, ref.eos, ref.pad)
    for text in SAMPLES + texts:
        assert copy.tokenize(text) == ref.tokenize(text)
    assert copy.hf_config()["split_special_tokens"] is True  # kept by save_pretrained
    assert load_hf_tokenizer(str(export / "tokenizer.json"), 400).encode(
        SAMPLES[5], add_special_tokens=False) == ref.tokenize(SAMPLES[5])  # literal specials


def test_export_without_an_equivalent_tokenizer_json(toks, tmp_path, capsys):
    """A model the copy cannot express (a standard SentencePiece model: NFKC, dummy prefix)
    ships the remote-code tokenizer and says why in one warning line; the verifier names the
    first differing id of a copy that is not equivalent."""
    from tokenizers import normalizers

    from parcae_megatron.convert.fast_tokenizer import (
        first_mismatch,
        save_sentencepiece,
        tokenizer_json,
    )
    from tests.sentencepiece_models import train_standard_spm

    std = train_standard_spm(tmp_path / "std.model")
    assert save_sentencepiece(std, tmp_path / "hf") is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "nmt_nfkc" in err[0]
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "tokenizer.model", "tokenizer_config.json", "tokenization_parcae.py"}
    ref = toks[0]
    broken = tokenizer_json(ref)
    broken.normalizer = normalizers.Sequence([])  # spaces no longer become ▁
    assert first_mismatch(ref, tokenizer_json(ref), SAMPLES) is None
    assert "SentencePiece gives" in first_mismatch(ref, broken, SAMPLES)
