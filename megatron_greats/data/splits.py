"""Document-level train/val/test split: val and test are held-out documents of the target domain;
train is everything else, from every domain."""

from __future__ import annotations

import zlib

import numpy as np

from ..errors import DataError
from .documents import Document

SPLITS = ("train", "val", "test")


def _rng(seed: int, domain: str, purpose: int) -> np.random.Generator:
    # Seeded per domain (by a stable hash of its name), so adding a domain moves no other split.
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), purpose])


def split_documents(documents: list[Document], *, target_domain: str, val_fraction: float,
                    test_fraction: float, seed: int,
                    max_docs_per_domain: int | None) -> dict[str, list[Document]]:
    """Splits keep corpus order inside each split; the choice is a pure function of the inputs."""
    by_domain: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        by_domain.setdefault(doc.domain, []).append(i)
    if target_domain not in by_domain:
        raise DataError(f"target domain {target_domain!r} has no documents; domains present: "
                        f"{', '.join(sorted(by_domain)) or 'none'}")
    if max_docs_per_domain is not None:
        by_domain = {d: sorted(_rng(seed, d, 0).permutation(ids)[:max_docs_per_domain].tolist())
                     for d, ids in by_domain.items()}

    target = by_domain[target_domain]
    n_val, n_test = round(len(target) * val_fraction), round(len(target) * test_fraction)
    if n_val == 0 or n_test == 0:
        raise DataError(f"val/test would be empty: target domain {target_domain!r} has "
                        f"{len(target)} documents and val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction}; allowed: more documents of that domain (data."
                        "max_docs_per_domain) or larger data.val_fraction / data.test_fraction")
    order = _rng(seed, target_domain, 1).permutation(target)
    val, test = set(order[:n_val].tolist()), set(order[n_val:n_val + n_test].tolist())
    kept = sorted(i for ids in by_domain.values() for i in ids)
    splits = {"train": [documents[i] for i in kept if i not in val and i not in test],
              "val": [documents[i] for i in sorted(val)],
              "test": [documents[i] for i in sorted(test)]}
    if not splits["train"]:
        raise DataError(f"train would be empty: all {len(target)} documents of {target_domain!r} "
                        "went to val/test and no other domain has documents")
    return splits
