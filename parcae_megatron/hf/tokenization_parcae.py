"""Hugging Face tokenizer for Parcae exports: our SentencePiece model behind ``transformers``.

Self-contained (imports only ``transformers`` and ``sentencepiece``): ``save_pretrained`` copies
this file next to ``tokenizer.model`` so ``AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)`` works offline.

Ids equal ``data_prep.tokenizer.SentencePieceTokenizer.tokenize`` exactly: the text goes to
SentencePiece untouched (identity normalisation, no dummy prefix) and literal ``<|eos|>`` text is
*not* turned into the control id (``split_special_tokens=True``), as in ``data_prep``.
``data_prep.preprocess`` writes every document as ``<|bos|> text <|eos|>``, so by default a
sequence gets a leading ``<|bos|>`` (``add_bos_token=True``): a scored prompt then starts like a
training document. ``encode(text, add_special_tokens=False)`` gives the bare ids.

BOS, EOS, pad and unk are the SentencePiece model's own (``bos_id()`` … and their piece names:
``<|bos|>`` for ours, ``<s>`` / ``</s>`` / ``<pad>`` for a standard model), never added as new
ids; ``check_sentencepiece`` refuses a model without a usable BOS.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


def _piece(sp: spm.SentencePieceProcessor, index: int) -> str | None:
    """The piece of a special id, or None when the model disables it (id -1)."""
    return sp.id_to_piece(index) if 0 <= index < sp.get_piece_size() else None


def check_sentencepiece(model_file: str | os.PathLike, vocab_size: int | None = None) -> None:
    """Raise ValueError (one line) unless the SentencePiece model has a usable BOS: enabled,
    a control piece (text can never produce it) and, given the model's ``vocab_size``, an id
    inside it, like every other piece."""
    sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
    bos = sp.bos_id()
    if bos < 0 or not sp.is_control(bos):
        what = "has no BOS piece (bos_id = -1)" if bos < 0 else \
            f"has BOS id {bos} ({sp.id_to_piece(bos)!r}) that is not a control piece"
        raise ValueError(f"tokenizer {model_file} {what}; CORE prompts and training documents "
                         "start with BOS: use a SentencePiece model trained with a bos_id")
    if vocab_size is not None and sp.get_piece_size() > vocab_size:
        raise ValueError(f"tokenizer {model_file} has {sp.get_piece_size()} pieces but the "
                         f"model's vocabulary has {vocab_size} rows: wrong tokenizer?")


class ParcaeTokenizer(PreTrainedTokenizer):
    """Byte-fallback BPE SentencePiece tokenizer; its special tokens are the model's own
    (ours: ``<unk>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2, ``<|pad|>`` 3)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | os.PathLike, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, add_bos_token: bool = True,
                 add_eos_token: bool = False, **kwargs) -> None:
        self.vocab_file = vocab_file = os.fspath(vocab_file)
        self.sp_model = sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # The model's own special pieces, also in place of a name the model lacks (e.g. an
        # old tokenizer_config.json): transformers would append it as a new id past the
        # vocabulary, which the model's embedding does not have.
        def own(given, index: int):  # given: a str, an AddedToken (from a config) or None
            text = None if given is None else str(given)
            known = text is not None and (sp.piece_to_id(text) != sp.unk_id()
                                          or text == sp.id_to_piece(sp.unk_id()))
            return given if known else _piece(sp, index)

        super().__init__(bos_token=own(bos_token, sp.bos_id()),
                         eos_token=own(eos_token, sp.eos_id()),
                         pad_token=own(pad_token, sp.pad_id()),
                         unk_token=own(unk_token, sp.unk_id()), **kwargs)

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (specials and byte pieces included)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """Piece → id for every piece."""
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces with SentencePiece's own decoder (byte pieces become UTF-8 again)."""
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs) -> str:
        """Decode runs of ordinary ids with SentencePiece; specials become their text.

        SentencePiece decodes control ids to nothing, but callers such as lm-eval compare
        ``decode([bos_id])`` with a prompt prefix, so they are spelled out unless skipped.
        """
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        special = set(self.all_special_ids)
        out, run = [], []
        for i in ids:
            if i in special:
                out.append(self.sp_model.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.convert_ids_to_tokens(i))
            else:
                run.append(i)
        out.append(self.sp_model.decode(run))
        text = "".join(out)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    # -- special tokens around a sequence -----------------------------------------------------
    def _adds(self, which: str) -> bool:
        """Whether ``which`` ('bos' / 'eos') goes around a sequence: asked for and present."""
        return bool(getattr(self, f"add_{which}_token")
                    and getattr(self, f"{which}_token_id") is not None)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """``<|bos|>``? ids ``<|eos|>``? (and the same for a second sequence)."""
        bos = [self.bos_token_id] if self._adds("bos") else []
        eos = [self.eos_token_id] if self._adds("eos") else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 where ``build_inputs_with_special_tokens`` adds a token."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        bos, eos = [1] * self._adds("bos"), [1] * self._adds("eos")
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """Tokens ``build_inputs_with_special_tokens`` adds."""
        return (1 + pair) * (int(self._adds("bos")) + int(self._adds("eos")))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None
                        ) -> tuple[str]:
        """Write ``tokenizer.model`` (the SentencePiece model bytes) into ``save_directory``."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out,)


ParcaeTokenizer.register_for_auto_class("AutoTokenizer")


def save_tokenizer(sp_model_path: str | os.PathLike, out_dir: str | os.PathLike,
                   **kwargs) -> ParcaeTokenizer:
    """Write ``tokenizer.model``, ``tokenizer_config.json`` (with ``auto_map``) and this file
    into ``out_dir``; return the tokenizer. ``kwargs`` go to ``ParcaeTokenizer``."""
    if not os.path.isfile(sp_model_path):
        raise FileNotFoundError(f"SentencePiece model not found: {sp_model_path}")
    tok = ParcaeTokenizer(vocab_file=os.fspath(sp_model_path), **kwargs)
    tok.save_pretrained(os.fspath(out_dir))
    return tok
