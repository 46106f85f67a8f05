"""Document-level splits. HELD_OUT below is the one declaration of the splits held out of the target
domain and of the config key that gives each one's share; train is every other document, from
every domain. Config, prepare_data, the cache keys and the megatron prefix check all read it.

This module must stay free of torch: the config validation imports it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np

from ..choices import EMBEDDED
from ..errors import ConfigError, DataError
from .documents import Document


@dataclass(frozen=True)
class HeldOut:
    key: str        # data.<key>: the split's fraction of the target domain's documents
    default: float
    use: str        # who reads it, for help texts and error messages


# In the order the shuffled target-domain documents are dealt out: val and test come first, so
# adding a split after them left their documents as they were.
HELD_OUT: dict[str, HeldOut] = {
    "val": HeldOut("val_fraction", 0.1, "val/loss"),
    "test": HeldOut("test_fraction", 0.1, "test/loss"),
    "selection": HeldOut("selection_fraction", 0.1,
                         "the selector's validation samples, never evaluated"),
}
SPLITS = ("train", *HELD_OUT)
FRACTION_KEYS = tuple(split.key for split in HELD_OUT.values())


def default_fractions() -> dict[str, float]:
    return {name: split.default for name, split in HELD_OUT.items()}


def fraction_args(data_config: Any) -> dict[str, float]:
    """prepare_data's fraction keywords ({"val_fraction": ...}) from the `data` config section."""
    return {key: getattr(data_config, key) for key in FRACTION_KEYS}


def fractions_from_args(args: Mapping[str, Any]) -> dict[str, float]:
    """Split name -> fraction, from keywords named like the config keys (absent: the default)."""
    unknown = sorted(set(args) - set(FRACTION_KEYS))
    if unknown:
        raise ConfigError(f"unknown argument {unknown[0]!r}; allowed fraction arguments: "
                          f"{', '.join(FRACTION_KEYS)}")
    return {name: args.get(split.key, split.default) for name, split in HELD_OUT.items()}


def fractions_problem(fractions: Mapping[str, Any], prefix: str = "") -> str | None:
    """One line on what is wrong with these fractions (split name -> fraction), or None.
    `prefix` ("data." in the config) is put before the key names."""
    keys = {name: prefix + HELD_OUT[name].key for name in fractions}
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
            return f"{keys[name]} {value!r} is not allowed; use a number in (0, 1)"
    total = sum(fractions.values())
    if total >= 1:
        return (f"{' + '.join(keys.values())} = {' + '.join(f'{v:g}' for v in fractions.values())} "
                f"= {total:g} holds out every target-domain document; allowed: fractions whose sum "
                "is < 1")
    return None


def prefixes_problem(prefixes: Any, prefix: str = "") -> str | None:
    """One line on what is wrong with source=megatron's prefixes (split name -> path), or None."""
    key = f"{prefix}megatron_prefixes"
    allowed = (f"allowed: exactly the keys {', '.join(SPLITS)}, each a path prefix (selection: "
               f"target-domain data apart from the others, read only by the selector)")
    if not isinstance(prefixes, Mapping):
        return f"{key} is {prefixes!r}; source 'megatron' needs a mapping; {allowed}"
    missing = [s for s in SPLITS if s not in prefixes]
    unknown = sorted(map(str, set(prefixes) - set(SPLITS)))
    if missing or unknown:
        what = "; ".join(part for part in (missing and f"missing: {', '.join(missing)}",
                                           unknown and f"unknown: {', '.join(unknown)}") if part)
        return f"{key} has keys {sorted(map(str, prefixes))} ({what}); {allowed}"
    for split in SPLITS:
        if not isinstance(prefixes[split], (str, os.PathLike)) or not os.fspath(prefixes[split]):
            return f"{key}.{split} is {prefixes[split]!r}; {allowed}"
    # val/test loss must not measure the selector's own data (nor should it pick against train)
    where = {s: os.path.realpath(os.fspath(prefixes[s])) for s in SPLITS}
    same = [s for s in SPLITS if s != "selection" and where[s] == where["selection"]]
    if same:
        return (f"{key}.selection is {os.fspath(prefixes['selection'])!r}, the same data as "
                f"{key}.{same[0]}; allowed: a prefix of target-domain documents that are in no "
                "other split")
    return None


# The embedded source's crawl-like fourth domain (sources/crawl.py) and its target when
# data.target_domain is not set; named here, where the config can read them without the sources.
CRAWL_DOMAIN = "crawl"
EMBEDDED_TARGET = "python_docs"


def only_domain(domains: Sequence[str]) -> str:
    """The target domain when data.target_domain is not set (other sources than the embedded one):
    the data's only domain; DataError when it has several."""
    if len(domains) == 1:
        return domains[0]
    raise DataError(f"data.target_domain is not set and the data has {len(domains)} domains "
                    f"({', '.join(domains) or 'none'}); allowed: data.target_domain set to one of them")


def crawl_problem(source: Any, crawl: Any, target_domain: Any, prefix: str = "") -> str | None:
    """One line on what is wrong with the crawl setting, or None. The crawl domain belongs to the
    embedded source and is never its target. `prefix` ("data." in the config) is put before keys."""
    if not isinstance(crawl, bool):
        return f"{prefix}crawl {crawl!r} is not allowed; use true or false"
    if crawl and source != EMBEDDED:
        return (f"{prefix}crawl=true with {prefix}source={source}: the crawl domain is part of the "
                f"embedded corpus; allowed: {prefix}source=embedded, or {prefix}crawl=false")
    if source == EMBEDDED and target_domain == CRAWL_DOMAIN:
        return (f"{prefix}target_domain={CRAWL_DOMAIN} is not allowed: the crawl domain is training "
                f"noise, never the target; allowed: a clean embedded domain (bible, shakespeare, "
                f"python_docs)")
    return None


def _rng(seed: int, domain: str, purpose: int) -> np.random.Generator:
    # Seeded per domain (by a stable hash of its name), so adding a domain moves no other split.
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), purpose])


def split_documents(documents: list[Document], *, target_domain: str | None,
                    fractions: Mapping[str, float], seed: int,
                    max_docs_per_domain: int | None) -> dict[str, list[Document]]:
    """Split name (SPLITS) -> documents, in corpus order inside each split; a pure function of
    the inputs. `fractions` maps each HELD_OUT name to its share of the target domain;
    `target_domain` None: the documents' only domain (only_domain)."""
    if set(fractions) != set(HELD_OUT):
        raise ConfigError(f"fractions for {sorted(fractions)}; allowed: exactly "
                          f"{', '.join(HELD_OUT)}")
    by_domain: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        by_domain.setdefault(doc.domain, []).append(i)
    if target_domain is None:  # not set: the only domain
        target_domain = only_domain(sorted(by_domain))
    if target_domain not in by_domain:
        raise DataError(f"target domain {target_domain!r} has no documents; domains present: "
                        f"{', '.join(sorted(by_domain)) or 'none'}")
    if max_docs_per_domain is not None:
        by_domain = {d: sorted(_rng(seed, d, 0).permutation(ids)[:max_docs_per_domain].tolist())
                     for d, ids in by_domain.items()}

    target = by_domain[target_domain]
    counts = {name: round(len(target) * fractions[name]) for name in HELD_OUT}
    empty = [name for name, n in counts.items() if n == 0]
    settings = ", ".join(f"{HELD_OUT[name].key}={fractions[name]}" for name in HELD_OUT)
    if empty:
        raise DataError(f"{'/'.join(empty)} would be empty: target domain {target_domain!r} has "
                        f"{len(target)} documents and {settings}; allowed: more documents of that "
                        "domain (data.max_docs_per_domain) or larger fractions")
    if sum(counts.values()) > len(target):  # rounding up can ask for more than there are
        raise DataError(f"the held-out splits need {sum(counts.values())} documents but target "
                        f"domain {target_domain!r} has {len(target)} ({settings}); allowed: "
                        "smaller fractions or more documents of that domain")
    order = _rng(seed, target_domain, 1).permutation(target).tolist()
    held_out, start = {}, 0
    for name, n in counts.items():
        held_out[name] = set(order[start:start + n])
        start += n
    taken = set().union(*held_out.values())
    kept = sorted(i for ids in by_domain.values() for i in ids)
    splits = {"train": [documents[i] for i in kept if i not in taken],
              **{name: [documents[i] for i in sorted(ids)] for name, ids in held_out.items()}}
    if not splits["train"]:
        raise DataError(f"train would be empty: all {len(target)} documents of {target_domain!r} "
                        "were held out and no other domain has documents; allowed: smaller "
                        "fractions or more domains")
    return splits
