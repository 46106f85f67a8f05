"""SentencePiece BPE tokenizer: trained on the train split, or loaded from an existing .model."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from ..errors import DataError
from .cache import atomic_path
from .messages import one_line

# Settings that make encode/decode lossless: no normalisation, whitespace kept as is, newline as
# its own piece (training sees one line per sentence) and bytes for characters outside the vocab.
TRAINER_SETTINGS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=["\n"],
    byte_fallback=True,
    character_coverage=0.9995,
)
BYTE_PIECES = 256
MIN_VOCAB_SIZE = 320  # 256 byte pieces + specials + a few dozen characters

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\).*?<= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class Tokenizer:
    """encode/decode plus the ids the data pipeline needs (`eod` ends every document)."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model {self.path} does not exist; allowed: a sentencepiece .model file, or "
                            "tokenizer.model=null to train one")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer model {self.path} is not a readable sentencepiece model "
                            f"({one_line(e)}); allowed: a sentencepiece .model file, or tokenizer.model=null "
                            "to train one") from None
        if self._sp.eos_id() < 0:
            raise DataError(f"tokenizer model {self.path} has no end-of-sequence piece to use as "
                            "end-of-document; train it with eos_id >= 0")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: Path) -> Tokenizer:
    """Train on the lines of `texts` and write the model atomically to `model_path`."""
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2,
                                       num_threads=os.cpu_count() or 1, **TRAINER_SETTINGS)
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size) from None
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(model.getvalue())
    return Tokenizer(model_path)


def _training_error(message: str, vocab_size: int) -> DataError:
    if high := _TOO_HIGH.search(message):
        return DataError(f"vocab_size {vocab_size} is too large for the training text: "
                         f"allowed: tokenizer.vocab_size <= {high.group(2)} (or more training text)")
    if "Vocabulary size too high" in message:
        return DataError(f"vocab_size {vocab_size} is too large for the training text; use a "
                         "smaller vocab_size")
    if low := _TOO_LOW.search(message):
        return DataError(f"vocab_size {vocab_size} is too small for the training text: it needs "
                         f"at least {low.group(2)} pieces ({BYTE_PIECES} byte pieces + specials + "
                         f"characters); use vocab_size >= {low.group(2)}")
    return DataError(f"sentencepiece could not train a vocab_size {vocab_size} tokenizer: "
                     f"{one_line(message)}")
