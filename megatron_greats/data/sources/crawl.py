"""A crawl-like domain built from what the installed packages ship in their `*.dist-info` folders.

Real text, nothing generated here; it is the kind of text a web crawl holds beside the prose:
- licence: every licence file (`licenses/...`, `LICENSE*`, `LICENCE*`, `COPYING*`, `NOTICE*`,
  `AUTHORS*`), verbatim. Many packages (and torch's vendored third-party code) ship the same MIT,
  BSD or Apache text, so whole documents recur verbatim across sources, at their natural rate;
- record: the first RECORD_LINES lines of each RECORD file (`path,sha256=<hash>,<size>`) that
  name files inside site-packages: machine-generated lines that no model should learn;
- metadata: METADATA (email-style header fields, then the package description, cut after
  METADATA_BODY_CHARS characters), WHEEL, entry_points.txt and top_level.txt: semi-structured
  records. WHEEL files are near-identical boilerplate, many of them identical;
- sbom: CycloneDX software bills of materials (`sboms/*.json`), first SBOM_CHARS characters:
  machine-generated JSON with hashes, UUIDs and timestamps.

Deterministic: folders and files in sorted order, fixed selection rules, text relative to
site-packages only (no absolute paths), CRLF turned into LF. A folder with a `direct_url.json` (an
editable or local install, such as this project's own) is skipped: it describes a checkout, not a
published package. Another set of installed packages gives another corpus; `fingerprint()` hashes
the documents themselves, so a cached corpus is never reused for other content.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections import Counter
from pathlib import Path

from ..documents import Document
from ..splits import CRAWL_DOMAIN

DOMAIN = CRAWL_DOMAIN
KINDS = ("licence", "record", "metadata", "sbom")
# Bump when the selection rules or caps below change, so cached corpora are rebuilt.
FORMAT_VERSION = 1
RECORD_LINES = 200
METADATA_BODY_CHARS = 4000
SBOM_CHARS = 20000
METADATA_FILES = ("METADATA", "WHEEL", "entry_points.txt", "top_level.txt")
LICENCE_PREFIXES = ("license", "licence", "copying", "notice", "authors")


def site_packages() -> list[Path]:
    """The interpreter's site-packages folders (purelib, platlib), each once, in that order."""
    paths = sysconfig.get_paths()
    found = []
    for key in ("purelib", "platlib"):
        path = Path(paths[key])
        if path.is_dir() and path.resolve() not in [p.resolve() for p in found]:
            found.append(path)
    return found


def dist_info_dirs(roots: list[Path]) -> list[Path]:
    """Published packages' dist-info folders, sorted by folder name (first root wins a tie)."""
    found: dict[str, Path] = {}
    for root in roots:
        for folder in root.glob("*.dist-info"):
            if folder.is_dir() and not (folder / "direct_url.json").exists():
                found.setdefault(folder.name, folder)
    return [found[name] for name in sorted(found)]


def _read(path: Path) -> str:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _record(text: str) -> str:
    """The first RECORD_LINES lines of files inside site-packages. Lines for files outside it
    (`../../../bin/...` console scripts) are left out: those scripts are written at install time
    with the interpreter's absolute path in them, so their hashes depend on where the venv is."""
    inside = [line for line in text.split("\n") if not line.startswith("../")]
    return "\n".join(inside[:RECORD_LINES])


def _cut(text: str, chars: int) -> str:
    """The first `chars` characters, ending at a line end where there is one."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    return head[:head.rfind("\n")] if "\n" in head else head


def _metadata(text: str) -> str:
    """The header fields as they are, the description body cut to METADATA_BODY_CHARS."""
    header, sep, body = text.partition("\n\n")
    return header + sep + _cut(body, METADATA_BODY_CHARS) if sep else header


def _kind(relative: str) -> str | None:
    """Which kind a dist-info file is, or None for files left out (RECORD is read separately)."""
    name = relative.rsplit("/", 1)[-1]
    if relative in METADATA_FILES:
        return "metadata"
    if relative.startswith("licenses/") or name.lower().startswith(LICENCE_PREFIXES):
        return "licence"
    if relative.startswith("sboms/") and name.endswith(".json"):
        return "sbom"
    return None


def package_documents(folder: Path) -> list[Document]:
    """One package's documents: its licences, RECORD head, metadata files and SBOMs."""
    docs = []
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for relative in files:
        kind = "record" if relative == "RECORD" else _kind(relative)
        if kind is None:
            continue
        text = _read(folder / relative)
        if kind == "record":
            text = _record(text)
        elif kind == "sbom":
            text = _cut(text, SBOM_CHARS)
        elif relative == "METADATA":
            text = _metadata(text)
        if text and "\x00" not in text:
            docs.append(Document(f"{DOMAIN}/{kind}/{folder.name}/{relative}", DOMAIN, text))
    return docs


def documents(roots: list[Path] | None = None) -> list[Document]:
    """Every package's documents, packages in sorted order; kinds interleave as in a crawl."""
    return [doc for folder in dist_info_dirs(site_packages() if roots is None else roots)
            for doc in package_documents(folder)]


def kind_of(doc: Document) -> str:
    return doc.id.split("/", 2)[1]


def fingerprint(docs: list[Document]) -> dict:
    """What the crawl corpus is: its rules' version, document count and a hash of ids and texts."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(f"{len(doc.id)}:{doc.id}{len(doc.text)}:".encode())
        digest.update(doc.text.encode())
    return {"format_version": FORMAT_VERSION, "documents": len(docs),
            "sha256": digest.hexdigest()[:16]}


def composition(docs: list[Document]) -> dict:
    """Documents and characters per kind, and how many documents repeat an earlier one verbatim."""
    seen: Counter = Counter()
    kinds = {kind: {"documents": 0, "chars": 0, "duplicate_documents": 0, "duplicate_chars": 0}
             for kind in KINDS}
    for doc in docs:
        row = kinds[kind_of(doc)]
        row["documents"] += 1
        row["chars"] += len(doc.text)
        if seen[doc.text]:
            row["duplicate_documents"] += 1
            row["duplicate_chars"] += len(doc.text)
        seen[doc.text] += 1
    total = {key: sum(row[key] for row in kinds.values()) for key in kinds[KINDS[0]]}
    return {"kinds": kinds, "total": total, "distinct_texts": len(seen),
            "most_repeated": max(seen.values(), default=0)}
