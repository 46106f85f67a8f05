"""User documents from local json/jsonl/parquet/text files, read with HF `datasets` offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ...choices import FORMAT_AUTO, JSON, JSONL, PARQUET, TEXT
from ...errors import ConfigError, DataError
from ..documents import Document
from ..messages import one_line

DEFAULT_DOMAIN = "default"
# file_format values -> `datasets` builder names
FORMATS = {JSON: "json", JSONL: "json", PARQUET: "parquet", TEXT: "text"}
EXTENSION_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet",
                     ".txt": "text", ".text": "text"}


def resolve_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The data files: given paths, directories expanded to their supported files (sorted)."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not paths:
        raise ConfigError("files is empty; give at least one data file or directory")
    resolved = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSION_FORMATS)
            if not inside:
                raise DataError(f"data directory {path} has no files with extension "
                                f"{'/'.join(EXTENSION_FORMATS)}")
            resolved.extend(inside)
        elif path.is_file():
            resolved.append(path)
        else:
            raise DataError(f"data path {path} does not exist; allowed: existing json/jsonl/parquet/text files "
                            "or folders in data.files")
    return [p.resolve() for p in resolved]


def resolve_format(paths: list[Path], file_format: str) -> str:
    """The `datasets` builder name: given, or inferred from the (common) file extension."""
    if file_format != FORMAT_AUTO:
        if file_format not in FORMATS:
            raise ConfigError(f"file_format {file_format!r} is not supported; use {FORMAT_AUTO} or one of "
                              f"{', '.join(FORMATS)}")
        return FORMATS[file_format]
    formats = set()
    for path in paths:
        if path.suffix.lower() not in EXTENSION_FORMATS:
            raise ConfigError(f"cannot infer the format of {path} from extension "
                              f"{path.suffix!r}; use one of {', '.join(EXTENSION_FORMATS)} "
                              f"or set file_format to one of {', '.join(FORMATS)}")
        formats.add(EXTENSION_FORMATS[path.suffix.lower()])
    if len(formats) > 1:
        raise ConfigError(f"data files mix formats {sorted(formats)}; give files of one format")
    return formats.pop()


def fingerprint(paths: list[Path]) -> list:
    """Cheap identity of the input files, so edited files invalidate the cache."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _column(table, path: Path, field: str, what: str) -> list:
    if field not in table.column_names:
        raise DataError(f"{what} {field!r} is not in {path}; fields there: "
                        f"{', '.join(table.column_names)}")
    return table[field]


def documents(paths: list[Path], file_format: str, text_field: str, domain_field: str | None,
              show_progress: bool) -> list[Document]:
    """One document per record (per line for text files, as `datasets` reads them); records whose
    text is empty are skipped."""
    # Set before `datasets` is first imported: it reads these once, at import.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    if not show_progress:
        datasets.disable_progress_bars()
    docs = []
    try:
        # datasets' Arrow cache is only a conversion step here: keep it out of ~/.cache.
        with tempfile.TemporaryDirectory(prefix="hf-datasets-") as hf_cache:
            for file_index, path in enumerate(paths):
                try:
                    table = datasets.load_dataset(file_format, data_files=str(path), split="train",
                                                  cache_dir=hf_cache)
                except Exception as e:  # datasets wraps parser errors in many types
                    raise DataError(f"cannot read {path} as {file_format}: {one_line(e)}") from None
                texts = _column(table, path, text_field, "text field")
                domains = (_column(table, path, domain_field, "domain field") if domain_field
                           else [DEFAULT_DOMAIN] * len(texts))
                rows = tqdm(zip(texts, domains), total=len(table), desc=f"reading {path.name}",
                            unit="doc", disable=not show_progress)
                for row, (text, domain) in enumerate(rows):
                    if not isinstance(text, str):
                        raise DataError(f"{path} row {row}: text field {text_field!r} holds "
                                        f"{type(text).__name__}, expected a string")
                    if text.strip():
                        docs.append(Document(f"{file_index}:{path.name}/{row}", str(domain), text))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if not docs:
        raise DataError(f"data files {', '.join(map(str, paths))} hold no non-empty text")
    return docs
