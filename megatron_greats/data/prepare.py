"""prepare_data: corpus -> splits -> tokenizer -> indexed datasets -> SampleSets, each step cached.

Cache folders under cache_dir are keyed by exactly the parameters each artifact depends on, so a
changed vocab_size rebuilds only the tokenizer and the indexed data, and seq_len rebuilds nothing
(windows are computed when loading).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Callable, Mapping, Sequence

import sentencepiece as spm
import torch

from ..choices import EMBEDDED, FILES, FORMAT_AUTO, MEGATRON, SOURCES
from ..errors import ConfigError, DataError
from . import sources
from .cache import Artifact, atomic_path, file_digest
from .documents import Document, read_jsonl, write_jsonl
from .indexed import write_split
from .samples import SampleSet
from .sources import user_files
from .splits import (EMBEDDED_TARGET, HELD_OUT, SPLITS, crawl_problem, fractions_from_args,
                     fractions_problem, only_domain, prefixes_problem, split_documents)
from .tokenizer import MIN_VOCAB_SIZE, TRAINER_SETTINGS, Tokenizer, train_tokenizer

MIN_SEQ_LEN = 8
CORPUS_FILE = "corpus.jsonl"
SPLITS_FILE = "splits.json"
TOKENIZER_FILE = "tokenizer.model"
INDEXED_FORMAT_VERSION = 1  # bump when write_split's output changes


@dataclass
class DataBundle:
    """The samples of every split in SPLITS: `bundle.splits["selection"]`, or as an attribute,
    `bundle.train`, `bundle.val`, `bundle.test`, `bundle.selection`."""

    splits: dict[str, SampleSet]
    tokenizer: Tokenizer
    vocab_size: int
    target_domain: str
    paths: dict[str, Path]  # corpus/splits files, tokenizer model, and one prefix per split
    notes: list[str] = field(default_factory=list)  # for the user, e.g. how the target was chosen

    @property
    def identity(self) -> str:
        """Which data this is: the indexed cache folder (keyed by corpus, splits and tokenizer), or the
        given megatron prefixes. A checkpoint records it, so a run never resumes on other data."""
        if "corpus" in self.paths:
            return self.paths[SPLITS[0]].parent.name
        return ";".join(f"{split}={self.paths[split]}" for split in SPLITS)

    def __getattr__(self, name: str) -> SampleSet:
        # Only called for names that are not fields; .get: during unpickling there is no field yet
        splits = self.__dict__.get("splits") or {}
        if name in splits:
            return splits[name]
        raise AttributeError(f"DataBundle has no attribute {name!r}; splits: {', '.join(splits)}")


@dataclass
class _Plan:
    """The cache folders of one request; building them is separate so only one rank builds."""

    corpus: Artifact
    splits: Artifact
    tokenizer: Artifact | None  # None: a given tokenizer model is used as is
    tokenizer_path: Path
    indexed: Artifact
    read_corpus: Callable[[], list[Document]]
    split_args: dict


def prepare_data(*, cache_dir: str | os.PathLike, seq_len: int, source: str = EMBEDDED,
                 files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 file_format: str = FORMAT_AUTO, text_field: str = "text",
                 domain_field: str | None = None,
                 megatron_prefixes: Mapping[str, str | os.PathLike] | None = None,
                 target_domain: str | None = None, split_seed: int = 1234,
                 max_docs_per_domain: int | None = None, vocab_size: int = 4096,
                 tokenizer_model: str | os.PathLike | None = None, crawl: bool = False,
                 show_progress: bool = True, **fractions: float) -> DataBundle:
    """Build (or reuse) and load the samples of every split (SPLITS) of one data source.

    source="embedded": the bible/shakespeare/python_docs corpus, with `crawl=True` also the crawl-
    like fourth domain (sources/crawl.py; never the target); "files": local json/jsonl/parquet/
    text files (domain from `domain_field`, else "default"); "megatron": existing Megatron
    prefixes, one per split in SPLITS, tokenized with `tokenizer_model` (required then).
    `fractions`: val_fraction=, test_fraction=, selection_fraction= (splits.HELD_OUT, named like
    the config keys): each held-out split's share of the target domain's documents.
    `target_domain` None: python_docs for the embedded corpus, else the data's only domain (a
    DataError when it has several); the bundle's notes then say which domain that is.
    """
    fractions = fractions_from_args(fractions)
    _check_args(seq_len=seq_len, source=source, files=files, megatron_prefixes=megatron_prefixes,
                tokenizer_model=tokenizer_model, fractions=fractions, split_seed=split_seed,
                max_docs_per_domain=max_docs_per_domain, vocab_size=vocab_size,
                text_field=text_field, domain_field=domain_field, crawl=crawl,
                target_domain=target_domain)
    only = target_domain is None and source != EMBEDDED  # the target is the data's only domain
    target_domain = _known_target(target_domain, source, domain_field)
    if source == MEGATRON:
        paths = {"tokenizer": Path(tokenizer_model),
                 **{split: Path(megatron_prefixes[split]) for split in SPLITS}}
        return _load(paths, seq_len, target_domain, only)

    cache_dir = Path(cache_dir)
    plan = _plan(cache_dir, source=source, files=files, file_format=file_format,
                 text_field=text_field, domain_field=domain_field, target_domain=target_domain,
                 fractions=fractions, split_seed=split_seed,
                 max_docs_per_domain=max_docs_per_domain, vocab_size=vocab_size,
                 tokenizer_model=tokenizer_model, crawl=crawl, show_progress=show_progress)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cache_dir {cache_dir} cannot be created: {e.strerror}") from None
    _build_once_per_node(lambda: _build(plan, vocab_size, show_progress))
    paths = {"corpus": plan.corpus.require() / CORPUS_FILE,
             "splits": plan.splits.require() / SPLITS_FILE,
             "tokenizer": plan.tokenizer_path,
             **{split: plan.indexed.require() / split for split in SPLITS}}
    if plan.tokenizer is not None:
        plan.tokenizer.require()
    return _load(paths, seq_len, target_domain, only)


def _known_target(target_domain: str | None, source: str, domain_field: str | None) -> str | None:
    """The target domain as far as it is known before any data is read (None: the only domain,
    found when the documents or the prefixes are read). Resolved here, the cache keys are those
    of the same domain set explicitly."""
    if target_domain is not None:
        return target_domain
    if source == EMBEDDED:
        return EMBEDDED_TARGET
    if source == FILES and domain_field is None:
        return user_files.DEFAULT_DOMAIN  # every document's domain
    return None


def _check_args(*, seq_len, source, files, megatron_prefixes, tokenizer_model, fractions,
                split_seed, max_docs_per_domain, vocab_size, text_field, domain_field, crawl,
                target_domain) -> None:
    """Reject bad arguments before any work starts."""
    if source not in SOURCES:
        raise ConfigError(f"source {source!r} is not supported; use one of {', '.join(SOURCES)}")
    problem = crawl_problem(source, crawl, target_domain)
    if problem:
        raise ConfigError(problem)
    if not isinstance(seq_len, Integral) or seq_len < MIN_SEQ_LEN:
        raise ConfigError(f"seq_len {seq_len!r} is not allowed; use an integer >= {MIN_SEQ_LEN}")
    if not isinstance(vocab_size, Integral) or vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size {vocab_size!r} is not allowed; use an integer >= "
                          f"{MIN_VOCAB_SIZE} (256 byte-fallback pieces + specials + characters)")
    problem = fractions_problem(fractions)
    if problem:
        raise ConfigError(problem)
    if not isinstance(split_seed, Integral) or split_seed < 0:
        raise ConfigError(f"split_seed {split_seed!r} is not allowed; use an integer >= 0")
    if max_docs_per_domain is not None and (not isinstance(max_docs_per_domain, Integral)
                                            or max_docs_per_domain < 1):
        raise ConfigError(f"max_docs_per_domain {max_docs_per_domain!r} is not allowed; use None "
                          "or an integer >= 1")
    if not text_field or (domain_field is not None and not domain_field):
        raise ConfigError(f"text_field {text_field!r} / domain_field {domain_field!r} must be "
                          "non-empty names (domain_field may be None)")
    if bool(files) != (source == FILES):  # an empty list counts as not given
        raise ConfigError(f"files={files!r} with source {source!r}: give files exactly when "
                          "source is 'files'")
    if source == MEGATRON:
        problem = prefixes_problem(megatron_prefixes)
        if problem:
            raise ConfigError(problem)
        if tokenizer_model is None:
            raise ConfigError("tokenizer_model is None; source 'megatron' needs the tokenizer "
                              "model the prefixes were tokenized with")
    elif megatron_prefixes is not None:
        raise ConfigError(f"megatron_prefixes is given with source {source!r}; it needs source "
                          "'megatron'")


def _plan(cache_dir: Path, *, source, files, file_format, text_field, domain_field,
          target_domain, fractions, split_seed, max_docs_per_domain, vocab_size,
          tokenizer_model, crawl, show_progress) -> _Plan:
    if source == EMBEDDED:
        # Read now: the cache key hashes the crawl documents, and the same ones are written.
        crawl_docs = sources.crawl.documents() if crawl else None
        corpus_params = {"source": source, **sources.embedded_fingerprint(crawl_docs)}

        def read_corpus():
            return sources.embedded_documents(show_progress, crawl_docs)
    else:
        paths = user_files.resolve_files(files)
        file_format = user_files.resolve_format(paths, file_format)
        corpus_params = {"source": source, "files": user_files.fingerprint(paths),
                         "format": file_format, "text_field": text_field,
                         "domain_field": domain_field}

        def read_corpus():
            return user_files.documents(paths, file_format, text_field, domain_field,
                                        show_progress)

    corpus = Artifact.at(cache_dir, "corpus", corpus_params)
    # The held-out split names are part of the key: a cache built before a split existed is
    # never taken for one that has it (and the tokenizer and indexed data, keyed by it, follow).
    splits = Artifact.at(cache_dir, "splits", {
        "corpus": corpus.dir.name, "target_domain": target_domain, "held_out": dict(fractions),
        "split_seed": split_seed, "max_docs_per_domain": max_docs_per_domain})
    if tokenizer_model is None:
        tokenizer = Artifact.at(cache_dir, "tokenizer", {
            "splits": splits.dir.name, "vocab_size": vocab_size, "trainer": TRAINER_SETTINGS,
            "sentencepiece": spm.__version__})
        tokenizer_path, tokenizer_id = tokenizer.dir / TOKENIZER_FILE, tokenizer.dir.name
    else:
        tokenizer_path = Path(tokenizer_model)
        Tokenizer(tokenizer_path)  # fail now on a missing or corrupt model, on every rank
        tokenizer, tokenizer_id = None, file_digest(tokenizer_path)
    indexed = Artifact.at(cache_dir, "indexed", {
        "splits": splits.dir.name, "tokenizer": tokenizer_id, "format": INDEXED_FORMAT_VERSION})
    split_args = dict(target_domain=target_domain, fractions=fractions, seed=split_seed,
                      max_docs_per_domain=max_docs_per_domain)
    return _Plan(corpus, splits, tokenizer, tokenizer_path, indexed, read_corpus, split_args)


def _build_once_per_node(build: Callable[[], None]) -> None:
    """Under torch.distributed, local rank 0 of each node builds while the other ranks wait at a
    barrier; then every rank loads the same files (a failed build shows up as a missing marker)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        build()
        return
    try:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            build()
    finally:
        dist.barrier()


def _build(plan: _Plan, vocab_size: int, show_progress: bool) -> None:
    plan.corpus.build(lambda folder: write_jsonl(folder / CORPUS_FILE, plan.read_corpus()))
    pending = [a for a in (plan.splits, plan.tokenizer, plan.indexed) if a and not a.complete]
    if not pending:
        return
    documents = read_jsonl(plan.corpus.dir / CORPUS_FILE)
    plan.splits.build(lambda folder: _write_splits(folder / SPLITS_FILE, documents,
                                                   plan.split_args))
    domain_names, splits = _read_splits(plan.splits.dir / SPLITS_FILE, documents)
    if plan.tokenizer is not None:
        plan.tokenizer.build(lambda folder: train_tokenizer(
            (doc.text for doc in splits["train"]), vocab_size, folder / TOKENIZER_FILE))
    tokenizer = Tokenizer(plan.tokenizer_path)

    def write_indexed(folder: Path) -> None:
        for split in SPLITS:
            write_split(folder / split, splits[split], tokenizer, domain_names, show_progress,
                        desc=f"tokenizing {split}")

    plan.indexed.build(write_indexed)


def _write_splits(path: Path, documents: list[Document], split_args: dict) -> None:
    """Store document ids only: the texts stay in the corpus file."""
    splits = split_documents(documents, **split_args)
    record = {"domain_names": sorted({doc.domain for docs in splits.values() for doc in docs}),
              **{split: [doc.id for doc in docs] for split, docs in splits.items()}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record) + "\n")


def _read_splits(path: Path, documents: list[Document]) -> tuple[list[str], dict[str, list]]:
    record = json.loads(path.read_text())
    missing = [split for split in SPLITS if split not in record]
    if missing:  # never fall back to another split (e.g. val) in place of a missing one
        raise DataError(f"splits file {path} has no {missing[0]!r} split (written before it "
                        f"existed); allowed: delete {path.parent} so it is rebuilt, or another "
                        "data.cache_dir")
    by_id = {doc.id: doc for doc in documents}
    return record["domain_names"], {split: [by_id[i] for i in record[split]] for split in SPLITS}


def _load(paths: dict[str, Path], seq_len: int, target_domain: str | None,
          only: bool) -> DataBundle:
    """`only`: the target is the data's only domain (target_domain None: found here, from the
    held-out data's domains); a note says which it is."""
    tokenizer = Tokenizer(paths["tokenizer"])
    sets = {split: SampleSet(paths[split], seq_len) for split in SPLITS}
    if target_domain is None:
        target_domain = only_domain(sorted({name for split in HELD_OUT
                                            for name in sets[split].domain_names}))
    for split in HELD_OUT:
        names = sets[split].domain_names
        if target_domain not in names:
            raise DataError(f"target domain {target_domain!r} is not a domain of the {split} data "
                            f"{paths[split]}; domains present: {', '.join(names)}")
    notes = [f"data.target_domain is not set: the data has one domain, {target_domain!r}, and it is "
             "the target"] if only else []
    return DataBundle(sets, tokenizer, tokenizer.vocab_size, target_domain, paths, notes)
