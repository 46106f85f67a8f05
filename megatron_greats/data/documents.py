"""Documents, the unit of splitting, tokenizing and domain labelling; stored as JSONL records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .cache import atomic_path


@dataclass(frozen=True)
class Document:
    id: str  # stable across rebuilds, e.g. "bible/Genesis/1"
    domain: str
    text: str


def write_jsonl(path: Path, documents: Iterable[Document]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            record = {"id": doc.id, "domain": doc.domain, "text": doc.text}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]
