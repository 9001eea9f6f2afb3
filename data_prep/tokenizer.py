"""The one tokenizer interface: SentencePiece ``.model`` or Hugging Face ``tokenizer.json``.

:func:`load_tokenizer` tells the two apart by content and returns an object with the attributes
Megatron's datasets and trainer expect (``vocab_size``, ``bos``, ``eos``, ``eod``, ``pad``,
``tokenize``, ``detokenize``, ``unique_identifiers``) that pickles for workers, and
``megatron_args()``: the ``--tokenizer-type``/``--tokenizer-model`` flags for the trainer.

``hf-bpe`` tokenizers (``data_prep.train_tokenizer --kind hf-bpe``, the paper's own kind) are a
directory with ``tokenizer.json`` and ``tokenizer_config.json``: byte-level BPE, special tokens
``<|bos|>`` 0, ``<|eos|>`` 1, ``<|pad|>`` 2, exact round trip.

The SentencePiece tokenizer (docs/design.md §6.3) is a byte-level BPE with byte fallback,
split digits, a 32768 vocabulary and the special tokens ``<|bos|>``, ``<|eos|>`` and
``<|pad|>``. Models trained by ``python -m data_prep.train_tokenizer`` use identity
normalisation, no dummy prefix and keep all whitespace, so
``detokenize(tokenize(text)) == text`` for every string with one exception:

* U+2581 (``▁``, SentencePiece's whitespace marker) in the input comes back as a space.

Ids: ``<unk>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2, ``<|pad|>`` 3, then 256 byte pieces.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from data_prep.files import InputError, atomic_write_bytes, atomic_write_json

BOS_PIECE, EOS_PIECE, PAD_PIECE, UNK_PIECE = "<|bos|>", "<|eos|>", "<|pad|>", "<unk>"
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
META_SPACE = "\u2581"
BOS_NAMES, EOS_NAMES, PAD_NAMES = ("<|bos|>", "<s>"), ("<|eos|>", "</s>"), ("<|pad|>", "<pad>")
HF_FILE, HF_CONFIG_FILE, SP_FILE = "tokenizer.json", "tokenizer_config.json", "tokenizer.model"


def _spm():
    try:
        import sentencepiece
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the tokenizer needs the 'sentencepiece' package "
                          "(pip install 'sentencepiece>=0.2.0')") from err
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model with Megatron's tokenizer attributes.

    ``vocab_size``, ``bos``, ``eos``, ``eod`` (= ``eos``), ``pad``, ``tokenize(text)`` and
    ``detokenize(ids)`` are what megatron-core's ``GPTDataset`` and the training loop use; the
    object pickles (it carries the model bytes), so dataset workers can receive it.
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None
                 ) -> None:
        if model_path is None and model_proto is None:
            raise ValueError("give model_path or model_proto")
        if model_proto is None:
            with open(model_path, "rb") as f:  # type: ignore[arg-type]
                model_proto = f.read()
        self.model_path = os.path.abspath(model_path) if model_path else None
        self._proto = model_proto
        self._sp = _spm().SentencePieceProcessor(model_proto=model_proto)
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    # -- Megatron's interface ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special and byte pieces included."""
        return self._sp.get_piece_size()

    @property
    def bos(self) -> int:
        """Id of ``<|bos|>``."""
        return self._sp.bos_id()

    @property
    def eos(self) -> int:
        """Id of ``<|eos|>``."""
        return self._sp.eos_id()

    @property
    def eod(self) -> int:
        """End of document: Megatron's name for the EOS id."""
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        """Id of ``<|pad|>`` (never equal to ``eod``, so Megatron does not remap it)."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        """Id of ``<unk>`` (unused with byte fallback, kept because SentencePiece needs it)."""
        return self._sp.unk_id()

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        """Special token ids by role, as Megatron's dataset looks them up."""
        return {"bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad,
                "unk_token": self.unk}

    @property
    def unique_identifiers(self) -> dict:
        """What Megatron hashes to name its dataset index cache: the model's content."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "sha256": self.sha256, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text``, without BOS/EOS."""
        return self._sp.encode(text)

    def detokenize(self, ids: Any) -> str:
        """Text of ``ids``; BOS/EOS/PAD are control symbols and decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    # -- helpers for preprocessing --------------------------------------------------------
    def encoder(self, add_bos: bool, add_eos: bool):
        """A fast ``text -> ids`` function with BOS/EOS added as asked."""
        encode = self._sp.encode
        return lambda text: encode(text, add_bos=add_bos, add_eos=add_eos)

    def id_to_piece(self, token: int) -> str:
        """The piece string of ``token`` (``<0x0A>`` for byte pieces)."""
        return self._sp.id_to_piece(int(token))

    @property
    def processor(self):
        """The ``sentencepiece.SentencePieceProcessor`` (piece types and scores)."""
        return self._sp

    @property
    def model_proto(self) -> bytes:
        """The serialized model (the bytes of the .model file)."""
        return self._proto

    def megatron_args(self) -> list[str]:
        """The trainer's flags for this tokenizer: Megatron's own SentencePiece tokenizer."""
        if self.model_path is None:
            raise TokenizerError("a SentencePiece tokenizer built from bytes has no file for "
                                 "Megatron's --tokenizer-model")
        return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                self.model_path]

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(model_proto=state["proto"])  # type: ignore[misc]
        self.model_path = state["model_path"]

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({self.model_path or '<bytes>'}, vocab_size="
                f"{self.vocab_size}, sha256={self.sha256[:12]})")


class TokenizerError(InputError):
    """A path that holds no usable tokenizer (unknown content, no BOS/EOS); one line."""


def _hf_library():
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("a tokenizer.json needs the 'tokenizers' package "
                          "(pip install tokenizers)") from err
    return tokenizers


def _token_name(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ..}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` with Megatron's tokenizer attributes.

    Ids are exactly those of the ``tokenizers`` library (``encode(text,
    add_special_tokens=False)``). BOS/EOS/PAD are named by a ``tokenizer_config.json`` beside
    the file or, without one, found by name (:data:`BOS_NAMES` ...). The object pickles (it
    carries the JSON text), so dataset workers can receive it.
    """

    kind = "huggingface"

    def __init__(self, json_text: str, path: str | None = None,
                 config: dict | None = None) -> None:
        self._json = json_text
        self._config = dict(config or {})
        self.model_path = os.path.abspath(path) if path else None
        self._tk = _hf_library().Tokenizer.from_str(json_text)
        self._special = {role: self._find(role, names) for role, names in
                         (("bos", BOS_NAMES), ("eos", EOS_NAMES), ("pad", PAD_NAMES))}
        # transformers' split_special_tokens: literal special-token text stays text (as in
        # SentencePiece; the tokenizer.json copy of a SentencePiece model sets it).
        split = bool(self._config.get("split_special_tokens", False))
        self._tk.encode_special_tokens = split
        self.sha256 = hashlib.sha256(
            json_text.encode() + json.dumps(self.special_tokens, sort_keys=True).encode()
            + (b"split_special_tokens" if split else b"")).hexdigest()

    def _find(self, role: str, names: tuple[str, ...]) -> str | None:
        named = _token_name(self._config.get(f"{role}_token"))
        for name in ([named] if named else list(names)):
            if self._tk.token_to_id(name) is not None:
                return name
        return None

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The BOS/EOS/PAD token strings (None where the tokenizer has none)."""
        return dict(self._special)

    def _id(self, role: str) -> int | None:
        name = self._special[role]
        return None if name is None else self._tk.token_to_id(name)

    # -- Megatron's interface ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos(self) -> int:
        """Id of the BOS token."""
        return self._id("bos")  # type: ignore[return-value]

    @property
    def eos(self) -> int:
        """Id of the EOS token."""
        return self._id("eos")  # type: ignore[return-value]

    @property
    def eod(self) -> int:
        """End of document: Megatron's name for the EOS id."""
        return self._id("eos")  # type: ignore[return-value]

    @property
    def pad(self) -> int | None:
        """Id of the PAD token, or None."""
        return self._id("pad")

    @property
    def unk(self) -> int | None:
        """Byte-level BPE has no unknown token."""
        return None

    @property
    def special_tokens_dict(self) -> dict[str, int | None]:
        """Special token ids by role, as Megatron's dataset looks them up."""
        return {"bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad}

    @property
    def unique_identifiers(self) -> dict:
        """What Megatron hashes to name its dataset index cache: the tokenizer's content."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "sha256": self.sha256, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text``, without BOS/EOS."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Any) -> str:
        """Text of ``ids``; special tokens decode to nothing."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    # -- helpers for preprocessing --------------------------------------------------------
    def encoder(self, add_bos: bool, add_eos: bool):
        """A ``text -> ids`` function with BOS/EOS added as asked."""
        encode, head, tail = self._tk.encode, [self.bos] * add_bos, [self.eos] * add_eos
        return lambda text: head + encode(text, add_special_tokens=False).ids + tail

    def id_to_piece(self, token: int) -> str:
        """The token string of ``token`` (byte-level: ``Ġ`` is a space)."""
        return self._tk.id_to_token(int(token))

    @property
    def json_text(self) -> str:
        """The ``tokenizer.json`` content."""
        return self._json

    def save_pretrained(self, directory: str) -> str:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming the special tokens
        (what ``AutoTokenizer`` and Megatron's ``HuggingFaceTokenizer`` read); return the dir."""
        os.makedirs(directory, exist_ok=True)
        atomic_write_bytes(os.path.join(directory, HF_FILE), self._json.encode())
        atomic_write_json(os.path.join(directory, HF_CONFIG_FILE), self.hf_config())
        return directory

    def hf_config(self) -> dict:
        """``tokenizer_config.json`` for this tokenizer: a fast tokenizer, no remote code,
        no clean-up of spaces on decode (it would change the text)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        config.update({f"{role}_token": name for role, name in self._special.items() if name})
        if self._tk.encode_special_tokens:
            config["split_special_tokens"] = True
        return config

    def megatron_args(self) -> list[str]:
        """``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``: Megatron loads the
        directory with ``AutoTokenizer``, which needs ``tokenizer_config.json`` to know BOS/EOS.
        """
        directory = os.path.dirname(self.model_path) if self.model_path else None
        ok = (directory is not None and os.path.basename(self.model_path) == HF_FILE
              and os.path.isfile(os.path.join(directory, HF_CONFIG_FILE))
              and all(_token_name(self._config.get(f"{r}_token")) for r in ("bos", "eos")))
        if not ok:
            raise TokenizerError(
                f"tokenizer {self.model_path or '<text>'}: Megatron's HuggingFaceTokenizer needs "
                f"a directory holding {HF_FILE} and a {HF_CONFIG_FILE} naming bos_token and "
                "eos_token; write one with data_prep.tokenizer.load_tokenizer(PATH)"
                ".save_pretrained(DIR)")
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", directory]

    def __getstate__(self) -> dict:
        return {"json": self._json, "path": self.model_path, "config": self._config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"], None, state["config"])  # type: ignore[misc]
        self.model_path = state["path"]

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.model_path or '<text>'}, vocab_size={self.vocab_size}, "
                f"sha256={self.sha256[:12]})")


Tokenizer = SentencePieceTokenizer | HFTokenizer


def resolve_tokenizer(path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, file)`` of the tokenizer at ``path``: ``"huggingface"`` for a
    ``tokenizer.json``, ``"sentencepiece"`` for a SentencePiece model, told apart by content,
    not by name. A directory: its ``tokenizer.model``, else its ``tokenizer.json``. Raises
    :class:`TokenizerError` (one line) for anything else."""
    path = os.fspath(path)
    if os.path.isdir(path):
        # tokenizer.model first: in a directory with both (an HF export of a SentencePiece
        # run) it is the tokenizer the model was trained with, and the tokenizer.json beside
        # it is the export's copy for AutoTokenizer (same ids, verified when it was written).
        found = [os.path.join(path, n) for n in (SP_FILE, HF_FILE)
                 if os.path.isfile(os.path.join(path, n))]
        for i, candidate in enumerate(found):
            try:
                return resolve_tokenizer(candidate)
            except TokenizerError:
                if i == len(found) - 1:
                    raise
        raise TokenizerError(f"tokenizer directory {path} holds neither {HF_FILE} nor {SP_FILE}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        content = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        content = None
    if isinstance(content, dict):
        if not isinstance(content.get("model"), dict):
            raise TokenizerError(f"{path} is JSON but not a Hugging Face tokenizer (no \"model\" "
                                 "object; a tokenizer's settings file?)")
        return HFTokenizer.kind, path
    try:
        _spm().SentencePieceProcessor(model_proto=data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError on a bad proto
        raise TokenizerError(f"{path} is neither a SentencePiece model nor a Hugging Face "
                             "tokenizer.json") from err
    return SentencePieceTokenizer.kind, path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at ``path`` (see :func:`resolve_tokenizer`): a SentencePiece model or a
    Hugging Face ``tokenizer.json`` with its ``tokenizer_config.json``, if any, beside it.
    Raises :class:`TokenizerError` (one line) for anything else, or for a tokenizer without
    BOS and EOS."""
    kind, path = resolve_tokenizer(path)
    tok: Tokenizer
    if kind == SentencePieceTokenizer.kind:
        tok = SentencePieceTokenizer(path)
    else:
        config_path = os.path.join(os.path.dirname(path), HF_CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            config = {}
            if os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            tok = HFTokenizer(text, path, config)
        except Exception as err:  # the library's own message says what is wrong
            raise TokenizerError(f"{path}: not a usable tokenizer.json: {err}") from err
    missing = [role for role, i in (("BOS", tok.bos), ("EOS", tok.eos)) if i is None or i < 0]
    if missing:
        raise TokenizerError(
            f"tokenizer {path} has no {' or '.join(missing)} token; documents are stored as "
            "BOS text EOS: use one with <|bos|>/<s> and <|eos|>/</s> (or a "
            f"{HF_CONFIG_FILE} naming bos_token and eos_token)")
    return tok

def megatron_tokenizer_args(path: str | os.PathLike) -> list[str]:
    """The trainer's ``--tokenizer-type``/``--tokenizer-model`` flags for the tokenizer at
    ``path`` (whichever kind it is)."""
    return load_tokenizer(os.fspath(path)).megatron_args()
