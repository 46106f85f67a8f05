"""Megatron indexed datasets (<prefix>.bin/.idx written and read by megatron-core itself) plus a
side file with each document's domain (<prefix>.domains.json and <prefix>.domains.npy)."""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from .cache import atomic_path
from .documents import Document
from .messages import one_line
from .tokenizer import Tokenizer

with warnings.catch_warnings():
    # megatron.core warns at import that Transformer Engine/Apex are absent: irrelevant to data.
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core.datasets.indexed_dataset import (DType, IndexedDataset,
                                                        IndexedDatasetBuilder)

DEFAULT_DOMAIN = "default"  # domain of every document of a prefix without a side file
# .idx layout (megatron-core _IndexWriter): magic, version u64, dtype code u8, sequence count u64,
# document count u64, then int32 lengths, int64 pointers, int64 document indices.
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
_ENCODE_CHUNK = 256  # documents per tokenizer call


def _bad_index(problem: str) -> DataError:
    return DataError(f"{problem}; allowed: a .bin/.idx pair as megatron-core's IndexedDatasetBuilder writes it "
                     "(rebuild the data)")


def _names_path(prefix: Path) -> Path:
    return Path(f"{prefix}.domains.json")


def _labels_path(prefix: Path) -> Path:
    return Path(f"{prefix}.domains.npy")


def write_split(prefix: Path, documents: Sequence[Document], tokenizer: Tokenizer,
                domain_names: list[str], show_progress: bool, desc: str) -> None:
    """Tokenize `documents` into one sequence each, EOD appended, grouped by domain in
    `domain_names` order (stable), so each domain is one contiguous token stream."""
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    index = {name: i for i, name in enumerate(domain_names)}
    documents = sorted(documents, key=lambda doc: index[doc.domain])
    labels = np.array([index[doc.domain] for doc in documents], dtype=np.int32)
    bar = tqdm(total=len(documents), desc=desc, unit="doc", disable=not show_progress)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    with atomic_path(bin_path) as bin_tmp, atomic_path(idx_path) as idx_tmp:
        builder = IndexedDatasetBuilder(str(bin_tmp), dtype=dtype)
        for start in range(0, len(documents), _ENCODE_CHUNK):
            chunk = documents[start:start + _ENCODE_CHUNK]
            for ids in tokenizer.encode_batch([doc.text for doc in chunk]):
                builder.add_item(torch.tensor(ids + [tokenizer.eod], dtype=torch.int64))
                builder.end_document()
            bar.update(len(chunk))
        builder.finalize(str(idx_tmp))
    bar.close()
    with atomic_path(_labels_path(prefix)) as tmp, open(tmp, "wb") as f:
        np.save(f, labels)
    with atomic_path(_names_path(prefix)) as tmp:
        tmp.write_text(json.dumps({"domain_names": domain_names}) + "\n")


def _check_files(prefix: Path) -> tuple[Path, Path]:
    """Cheap structural checks of .idx against .bin, so corruption is reported by file name."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise _bad_index(f"indexed dataset file {path} does not exist")
    with open(idx, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise _bad_index(f"index file {idx} is truncated ({len(raw)} bytes, header needs "
                         f"{_HEADER.size})")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(raw)
    if magic != _MAGIC:
        raise _bad_index(f"index file {idx} is not a Megatron indexed dataset index: magic "
                         f"{magic!r}, expected {_MAGIC!r}")
    if version != 1:
        raise _bad_index(f"index file {idx} has format version {version}; only version 1 is read")
    if code not in {d.value for d in DType}:
        raise _bad_index(f"index file {idx} has unknown token dtype code {code}")
    expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
    if idx.stat().st_size != expected:
        raise _bad_index(f"index file {idx} has {idx.stat().st_size} bytes but its header "
                         f"({n_seq} sequences, {n_doc} document indices) needs {expected}")
    return idx, bin_


@dataclass
class IndexedDocuments:
    """A Megatron prefix opened through megatron-core, as per-document token ranges + domains."""

    prefix: Path
    dataset: IndexedDataset
    dtype: np.dtype
    doc_start: np.ndarray  # first token of each document, in tokens from the start of .bin
    doc_length: np.ndarray  # tokens per document (all its sequences)
    doc_domain: np.ndarray  # domain index per document
    domain_names: list[str]

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")


def open_indexed(prefix: str | Path) -> IndexedDocuments:
    prefix = Path(prefix)
    idx, bin_ = _check_files(prefix)
    try:
        dataset = IndexedDataset(str(prefix), mmap=True)
    except Exception as e:  # megatron-core reports corruption through asserts and numpy errors
        raise _bad_index(f"index file {idx} cannot be read by megatron-core: "
                         f"{one_line(e)}") from None
    index = dataset.index
    lengths = index.sequence_lengths.astype(np.int64)
    itemsize = np.dtype(index.dtype).itemsize
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])
    if not np.array_equal(index.sequence_pointers, token_offsets[:-1] * itemsize):
        raise _bad_index(f"index file {idx} has sequence pointers that are not contiguous")
    if bin_.stat().st_size != token_offsets[-1] * itemsize:
        raise _bad_index(f"data file {bin_} has {bin_.stat().st_size} bytes but index {idx} "
                         f"describes {token_offsets[-1] * itemsize}")
    docs = index.document_indices
    if docs[0] != 0 or np.any(np.diff(docs) < 0):
        raise _bad_index(f"index file {idx} has document indices that are not increasing from 0")
    doc_start = token_offsets[docs[:-1]]
    names, labels = _read_domains(prefix, len(docs) - 1)
    return IndexedDocuments(prefix, dataset, np.dtype(index.dtype), doc_start,
                            token_offsets[docs[1:]] - doc_start, labels, names)


def _read_domains(prefix: Path, num_docs: int) -> tuple[list[str], np.ndarray]:
    names_path, labels_path = _names_path(prefix), _labels_path(prefix)
    if not names_path.exists() and not labels_path.exists():
        return [DEFAULT_DOMAIN], np.zeros(num_docs, dtype=np.int64)
    try:
        names = json.loads(names_path.read_text())["domain_names"]
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"domain side file {names_path} / {labels_path} is unreadable: "
                        f"{one_line(e)}") from None
    in_range = labels.size == 0 or 0 <= labels.min() <= labels.max() < len(names)
    if labels.shape != (num_docs,) or not in_range:
        raise DataError(f"domain labels {labels_path} need {num_docs} values in "
                        f"0..{len(names) - 1}, found shape {labels.shape}")
    # Samples take each domain as one contiguous token range (as write_split stores them).
    if np.any(np.diff(labels) < 0):
        raise DataError(f"domain labels {labels_path} are not sorted: documents must be stored "
                        "grouped by domain, in domain-index order")
    return list(names), labels.astype(np.int64)
