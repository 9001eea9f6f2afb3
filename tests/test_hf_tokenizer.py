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
