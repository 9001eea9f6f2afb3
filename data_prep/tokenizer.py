"""SentencePiece tokenizer with the interface Megatron's datasets and trainer expect.

The Parcae tokenizer (docs/design.md §6.3) is a byte-level BPE with byte fallback, split digits,
a 32768 vocabulary and the special tokens ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``. Models
trained by
``python -m data_prep.train_tokenizer`` use identity normalisation, no dummy prefix and keep
all whitespace, so ``detokenize(tokenize(text)) == text`` for every string with one exception:

* U+2581 (``▁``, SentencePiece's whitespace marker) in the input comes back as a space.

Ids: ``<unk>`` 0, ``<|bos|>`` 1, ``<|eos|>`` 2, ``<|pad|>`` 3, then 256 byte pieces.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

BOS_PIECE, EOS_PIECE, PAD_PIECE, UNK_PIECE = "<|bos|>", "<|eos|>", "<|pad|>", "<unk>"
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
META_SPACE = "\u2581"


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

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None
                 ) -> None:
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path and model_proto")
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
    def model_proto(self) -> bytes:
        """The serialized model (the bytes of the .model file)."""
        return self._proto

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(model_proto=state["proto"])  # type: ignore[misc]
        self.model_path = state["model_path"]

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({self.model_path or '<bytes>'}, vocab_size="
                f"{self.vocab_size}, sha256={self.sha256[:12]})")


def load_tokenizer(path: str) -> SentencePieceTokenizer:
    """Load a ``.model`` file (the path may also be the ``.json`` written beside it)."""
    if path.endswith(".json"):
        path = path[: -len(".json")] + ".model"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    return SentencePieceTokenizer(path)
