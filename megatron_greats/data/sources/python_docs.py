"""Python's own documentation: the pydoc topics plus the docstrings of public stdlib modules.

Modules are parsed with `ast`, never imported (importing would run arbitrary stdlib code and
depend on optional C extensions).
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from ..documents import Document

DOMAIN = "python_docs"
MIN_DOC_CHARS = 300
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}

_Def = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"{DOMAIN}/topic/{name}", DOMAIN, text.strip())
            for name, text in sorted(topics.items()) if len(text.strip()) >= MIN_DOC_CHARS]


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of every public stdlib module, sorted by name."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # prune: site-packages can be huge
        for name in files:
            if not name.endswith(".py"):
                continue
            parts = Path(folder, name).relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if parts and not any(p.startswith("_") for p in parts):
                found.append((".".join(parts), Path(folder, name)))
    return sorted(found)


def _public_defs(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, _Def]]:
    """Public classes, functions and methods in source order, with qualified names."""
    for node in body:
        if isinstance(node, _Def) and not node.name.startswith("_"):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from _public_defs(node.body, f"{prefix}{node.name}.")


def module_text(name: str, source: bytes) -> str | None:
    """Module docstring + one block per documented public definition; None if unparsable."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # e.g. deliberately broken sample files
        return None
    blocks = [f"Module {name}"]
    if doc := ast.get_docstring(tree):
        blocks.append(doc)
    for qualname, node in _public_defs(tree.body):
        if doc := ast.get_docstring(node):
            header = (f"class {qualname}" if isinstance(node, ast.ClassDef)
                      else f"def {qualname}({ast.unparse(node.args)})")
            blocks.append(f"{header}\n{doc}")
    return "\n\n".join(blocks)


def module_documents(show_progress: bool) -> list[Document]:
    docs = []
    modules = module_files(stdlib_dir())
    for name, path in tqdm(modules, desc="python_docs: stdlib docstrings", unit="module",
                           disable=not show_progress):
        text = module_text(name, path.read_bytes())
        if text is not None and len(text) >= MIN_DOC_CHARS:
            docs.append(Document(f"{DOMAIN}/module/{name}", DOMAIN, text))
    return docs


def documents(show_progress: bool) -> list[Document]:
    return topic_documents() + module_documents(show_progress)
