"""A SentencePiece model as a Hugging Face ``tokenizer.json``, written only when its ids are
verified equal to SentencePiece's.

HF exports of SentencePiece runs carry it beside ``tokenizer.model``, so
``AutoTokenizer.from_pretrained(dir)`` is a fast tokenizer and needs no remote code.
``tokenizer.model`` stays the directory's canonical tokenizer (``data_prep.tokenizer`` reads it
first): the JSON is a copy for Hugging Face users.

Why the copy is exact: SentencePiece's BPE encoder repeatedly merges the adjacent pair whose
concatenation is a piece with the highest score; the ``tokenizers`` BPE merges the pair with the
lowest merge rank. Every split ``(a, b)`` of every piece ``a + b``, ranked by that piece's score,
gives the same merges. Byte pieces are the byte fallback, a space is SentencePiece's ``▁``, and
the control pieces are special tokens that text never produces (``split_special_tokens``), as in
SentencePiece. Models this cannot express (unigram, a normaliser other than the identity, no
byte fallback, a dummy prefix, ...) are reported with the reason instead, and so is any id
difference on the verification sample.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

from data_prep.files import atomic_write_bytes, atomic_write_json
from data_prep.tokenizer import HF_CONFIG_FILE, HF_FILE, SP_FILE, SentencePieceTokenizer

META_SPACE = "\u2581"
# Fixed strings beside the corpus sample: whitespace runs, digits, scripts and emoji outside a
# small vocabulary (byte fallback), literal special-token text, SentencePiece's own ▁.
FIXED_SAMPLES = (
    "", " ", "  two  spaces  ", "\t\ttabs\r\nwindows\n\n\nnewlines\n", "a" * 500,
    "digits 0123456789 3.14159e-10 2024-01-31 1,000,000",
    "unicode: é ñ ü ß Ω≈ç√ 日本語 中文 한국어 Ελληνικά русский עברית العربية",
    "emoji 🤖🚀👩‍💻 and combining e\u0301 and zero\u200bwidth and \x00\x01\x7f",
    "literal specials <|bos|> <|eos|> <|pad|> <unk> <s> </s> <0x41> stay text",
    f"the marker {META_SPACE} itself, {META_SPACE}{META_SPACE} twice, and {META_SPACE}x",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
)


class NotConvertible(ValueError):
    """The SentencePiece model cannot be written as an equivalent ``tokenizer.json``."""


@functools.cache
def verification_texts() -> tuple[str, ...]:
    """The fixed strings plus the embedded corpus's held-out modules (about 116 KB of Python
    source and docstrings; deterministic for a Python version)."""
    from data_prep.corpus import iter_default_corpus

    corpus = [r["text"] for r in iter_default_corpus("valid", max_bytes=2_000_000)]
    return FIXED_SAMPLES + tuple(corpus)


def _check_expressible(tok: SentencePieceTokenizer) -> None:
    """Raise NotConvertible unless the model is a BPE that the mapping above reproduces."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf: tensorboard needs it

    model = pb.ModelProto()
    model.ParseFromString(tok.model_proto)
    spec, norm = model.trainer_spec, model.normalizer_spec
    problems = []
    if spec.model_type != pb.TrainerSpec.BPE:
        problems.append(f"a {pb.TrainerSpec.ModelType.Name(spec.model_type).lower()} model, "
                        "not BPE")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalisation {norm.name!r}")
    if not spec.byte_fallback:
        problems.append("no byte fallback (<unk> for unseen characters)")
    if norm.add_dummy_prefix:
        problems.append("a dummy prefix")
    if norm.remove_extra_whitespaces:
        problems.append("whitespace collapsing")
    if not norm.escape_whitespaces or spec.treat_whitespace_as_suffix:
        problems.append("unescaped or suffix whitespace")
    if any(p.type == pb.ModelProto.SentencePiece.USER_DEFINED for p in model.pieces):
        problems.append("user-defined pieces")
    if problems:
        raise NotConvertible("the SentencePiece model has " + ", ".join(problems))


def tokenizer_json(tok: SentencePieceTokenizer):
    """The ``tokenizers.Tokenizer`` equivalent to ``tok`` (raises NotConvertible). Encoding
    with ``add_special_tokens=True`` prepends BOS, as every training document starts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    _check_expressible(tok)
    sp = tok.processor
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(len(vocab)) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {p: i for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i)
                                                         or sp.is_byte(i) or sp.is_unused(i))}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            if piece[:cut] in mergeable and piece[cut:] in mergeable:
                ranked.append((-sp.get_score(i), i, cut, (piece[:cut], piece[cut:])))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    fast = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                byte_fallback=True))
    fast.normalizer = normalizers.Replace(" ", META_SPACE)
    fast.decoder = decoders.Sequence([decoders.Replace(META_SPACE, " "), decoders.ByteFallback(),
                                      decoders.Fuse()])
    fast.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                             for i in special])
    bos = sp.id_to_piece(tok.bos)
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos)])
    return fast


def first_mismatch(tok: SentencePieceTokenizer, fast, texts) -> str | None:
    """Where ``fast`` (literal special-token text kept as text) differs from SentencePiece in
    ids or decoded text on ``texts``; None when it never does."""
    fast.encode_special_tokens = True
    for n, text in enumerate(texts):
        ids = tok.tokenize(text)
        got = fast.encode(text, add_special_tokens=False).ids
        if got != ids:
            at = next((k for k, (a, b) in enumerate(zip(ids, got)) if a != b),
                      min(len(ids), len(got)))
            return f"sample {n} ({text[:30]!r}...): id {at} is {got[at:at + 1]}, " \
                   f"SentencePiece gives {ids[at:at + 1]}"
        if fast.decode(ids, skip_special_tokens=True) != tok.detokenize(ids):
            return f"sample {n} ({text[:30]!r}...) decodes differently"
    return None


def hf_config(tok: SentencePieceTokenizer) -> dict:
    """``tokenizer_config.json`` of the copy: a built-in fast class (no ``auto_map``, so no
    code runs for the tokenizer), the model's own special pieces, a leading BOS, literal
    special-token text kept as text, no space clean-up on decode (it would change the text)."""
    sp = tok.processor
    roles = {"bos": tok.bos, "eos": tok.eos, "pad": tok.pad, "unk": tok.unk}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
              "add_eos_token": False, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
    config.update({f"{role}_token": sp.id_to_piece(i) for role, i in roles.items()
                   if i is not None and 0 <= i < sp.get_piece_size()})
    return config


def save_sentencepiece(model_file: str | os.PathLike, out_dir: str | os.PathLike) -> bool:
    """Ship the SentencePiece model ``model_file`` in the HF directory ``out_dir``:
    ``tokenizer.model`` plus, when its verified copy exists, ``tokenizer.json`` and a fast
    ``tokenizer_config.json`` (True). Otherwise print one ``warning:`` line saying why and ship
    ``ParcaeTokenizer`` (remote code) as before (False)."""
    tok = SentencePieceTokenizer(os.fspath(model_file))
    try:
        fast = tokenizer_json(tok)
        problem = first_mismatch(tok, fast, verification_texts())
        if problem:
            raise NotConvertible(f"its tokenizer.json copy differs on {problem}")
    except NotConvertible as err:
        # Named by the model file: out_dir is the export's scratch directory.
        print(f"warning: tokenizer {model_file}: the export gets no tokenizer.json ({err}); "
              "AutoTokenizer needs trust_remote_code=True for the shipped SentencePiece "
              "tokenizer code", file=sys.stderr)
        from parcae_megatron.hf.tokenization_parcae import save_tokenizer

        save_tokenizer(model_file, out_dir)
        return False
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, out / SP_FILE)
    atomic_write_bytes(str(out / HF_FILE), fast.to_str(pretty=True).encode())
    atomic_write_json(str(out / HF_CONFIG_FILE), hf_config(tok))
    return True

