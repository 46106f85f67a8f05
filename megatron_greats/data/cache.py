"""Build-once cache: each artifact lives in a folder keyed by a hash of exactly its inputs.

A folder counts as built only once its `.complete` marker exists; the marker is written last and
every file is written under a temporary name and then renamed, so a killed build is redone on the
next run and never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DataError

MARKER = ".complete"


def params_key(params: dict) -> str:
    """Short stable hash of a JSON-able parameter dict."""
    blob = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    """Content hash of a (small) file, for artifacts keyed by a user-given file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    # A unique name that the caller creates itself (normal permissions; several writers may race).
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Artifact:
    """One cached build product: a folder named `<kind>-<hash of params>` under the cache dir."""

    dir: Path
    params: dict

    @classmethod
    def at(cls, cache_dir: Path, kind: str, params: dict) -> "Artifact":
        return cls(Path(cache_dir) / f"{kind}-{params_key(params)}", params)

    @property
    def complete(self) -> bool:
        return (self.dir / MARKER).is_file()

    def build(self, write: Callable[[Path], None]) -> bool:
        """Run `write(folder)` unless a finished build exists; return whether it ran."""
        if self.complete:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        write(self.dir)
        # The marker records the parameters, so a cache folder can be traced back to its inputs.
        with atomic_path(self.dir / MARKER) as tmp:
            tmp.write_text(json.dumps(self.params, sort_keys=True, indent=1, default=str) + "\n")
        return True

    def require(self) -> Path:
        """The folder, or DataError if its build never finished (e.g. it failed on local rank 0)."""
        if not self.complete:
            raise DataError(f"cache folder {self.dir} has no finished build ({MARKER} missing); "
                            "rerun data preparation on local rank 0")
        return self.dir
