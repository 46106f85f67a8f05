"""The crawl-like fourth domain of the embedded corpus (data.crawl, sources/crawl.py, docs/data.md):
deterministic, made of the stated kinds at the stated share, never the target, and leaving the clean
default's cache identity as it was. No training here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from megatron_greats.config import load_config
from megatron_greats.data import prepare_data
from megatron_greats.data import sources
from megatron_greats.data.cache import params_key
from megatron_greats.data.documents import Document, read_jsonl
from megatron_greats.data.prepare import _plan
from megatron_greats.data.sources import bible, crawl, shakespeare
from megatron_greats.data.splits import SPLITS, default_fractions, split_documents
from megatron_greats.errors import ConfigError
from conftest import PRETRAIN, REPO, child_env, error_lines

SHARE_RANGE = (0.15, 0.25)  # the crawl domain's share of the training characters (issue #28)
RECORD_LINE = re.compile(r"^[^,]+,(sha256=[A-Za-z0-9_-]{43},\d+)?,?$|^[^,]+,,$")


@pytest.fixture(scope="module")
def crawl_docs() -> list[Document]:
    return crawl.documents()


def test_crawl_documents_are_deterministic_and_path_free(crawl_docs):
    again = crawl.documents()
    assert again == crawl_docs and crawl.fingerprint(again) == crawl.fingerprint(crawl_docs)
    assert len({doc.id for doc in crawl_docs}) == len(crawl_docs)
    assert {doc.domain for doc in crawl_docs} == {"crawl"}
    packages = [doc.id.split("/")[2] for doc in crawl_docs]
    assert packages == sorted(packages)
    # nothing of where this venv or checkout lives, and no editable install of this project
    places = {str(p) for p in crawl.site_packages()} | {sys.prefix, str(REPO)}
    assert not [doc.id for doc in crawl_docs if any(place in doc.text for place in places)]
    assert not [doc.id for doc in crawl_docs if "megatron_greats-" in doc.id]
    # the cache key follows the content: one changed character is another corpus
    changed = [Document(crawl_docs[0].id, "crawl", crawl_docs[0].text + "."), *crawl_docs[1:]]
    assert crawl.fingerprint(changed) != crawl.fingerprint(crawl_docs)


def test_crawl_holds_each_stated_kind(crawl_docs):
    found = crawl.composition(crawl_docs)
    assert all(found["kinds"][kind]["documents"] > 0 for kind in ("licence", "record", "metadata"))
    by_kind = {kind: [doc for doc in crawl_docs if crawl.kind_of(doc) == kind] for kind in crawl.KINDS}
    # machine-generated hash lines: every line of a RECORD head is `path,sha256=<43 chars>,size` (or
    # `path,,` for files without a hash), capped at RECORD_LINES, none outside site-packages
    for doc in by_kind["record"]:
        lines = doc.text.split("\n")
        assert len(lines) <= crawl.RECORD_LINES
        assert all(RECORD_LINE.match(line) and not line.startswith("../") for line in lines), doc.id
    assert sum("sha256=" in doc.text for doc in by_kind["record"]) == len(by_kind["record"])
    # semi-structured metadata: METADATA starts with its header fields
    metadata = [doc for doc in by_kind["metadata"] if doc.id.endswith("/METADATA")]
    assert metadata and all(doc.text.startswith("Metadata-Version:") for doc in metadata)
    assert all("\nName: " in doc.text for doc in metadata)
    # licence texts recur verbatim across packages: some text is shipped more than once
    licences = Counter(doc.text for doc in by_kind["licence"])
    assert max(licences.values()) > 1
    assert found["kinds"]["licence"]["duplicate_documents"] == sum(n - 1 for n in licences.values())
    assert any("Permission is hereby granted, free of charge" in text for text in licences)  # MIT
    assert any("Apache License" in text for text in licences)


def _train_chars(documents: list[Document]) -> Counter:
    splits = split_documents(documents, target_domain="python_docs", fractions=default_fractions(),
                             seed=1234, max_docs_per_domain=None)
    chars = Counter()
    for doc in splits["train"]:
        chars[doc.domain] += len(doc.text)
    assert not any(doc.domain == "crawl" for split in SPLITS[1:] for doc in splits[split])
    return chars


def test_crawl_share_of_training_characters_is_in_range(crawl_docs):
    chars = _train_chars(sources.embedded_documents(show_progress=False, crawl_docs=crawl_docs))
    share = chars["crawl"] / sum(chars.values())
    assert SHARE_RANGE[0] <= share <= SHARE_RANGE[1], (share, chars)
    assert chars["crawl"] == crawl.composition(crawl_docs)["total"]["chars"]  # all of it is trained on


def test_clean_default_keeps_its_cache_identity(tmp_path, crawl_docs):
    """The clean default's corpus key is computed as before the crawl domain existed, so its built
    corpus, splits, tokenizer and indexed data (all keyed below it) are reused unchanged."""
    corpora = sources.corpora_dir()
    files = [bible.verses_file(corpora), *shakespeare.text_files(corpora)]
    before = {"source": "embedded", "format_version": 1,
              "files": [(p.name, p.stat().st_size) for p in files], "python": sys.version.split()[0]}
    args = dict(source="embedded", files=None, file_format="auto", text_field="text",
                domain_field=None, target_domain="python_docs", fractions=default_fractions(),
                split_seed=1234, max_docs_per_domain=None, vocab_size=4096, tokenizer_model=None,
                show_progress=False)
    clean, with_crawl = _plan(tmp_path, crawl=False, **args), _plan(tmp_path, crawl=True, **args)
    assert clean.corpus.dir.name == f"corpus-{params_key(before)}"
    assert clean.corpus.params == before
    assert with_crawl.corpus.params == {**before, "crawl": crawl.fingerprint(crawl_docs)}
    names = lambda plan: [a.dir.name for a in (plan.corpus, plan.splits, plan.tokenizer, plan.indexed)]
    assert not set(names(clean)) & set(names(with_crawl))
    assert not list(tmp_path.iterdir())  # planning builds nothing


def test_crawl_corpus_builds_with_crawl_in_train_only(tmp_path):
    bundle = prepare_data(cache_dir=tmp_path, crawl=True, seq_len=32, max_docs_per_domain=40,
                          vocab_size=512, show_progress=False)
    assert bundle.train.domain_names == ["bible", "crawl", "python_docs", "shakespeare"]
    assert bundle.train.stats()["crawl"]["documents"] == 40
    for split in SPLITS[1:]:  # held out of the target domain only
        assert {d for d, v in bundle.splits[split].stats().items() if v["documents"]} == {"python_docs"}
    corpus = read_jsonl(bundle.paths["corpus"])
    assert sum(doc.domain == "crawl" for doc in corpus) == len(crawl.documents())
    marker = json.loads((bundle.paths["corpus"].parent / ".complete").read_text())
    assert marker["crawl"]["documents"] == len(crawl.documents())


def test_crawl_settings_checked_in_config_and_library(tmp_path):
    load_config(str(REPO / "configs" / "tiny-cpu-crawl.yaml"))
    with pytest.raises(ConfigError, match=r"data.target_domain=crawl .*never the target"):
        load_config(str(REPO / "configs" / "tiny-cpu-crawl.yaml"), ["data.target_domain=crawl"])
    with pytest.raises(ConfigError, match=r"data.crawl=true with data.source=files"):
        load_config(None, ["data.crawl=true", "data.source=files", "data.files=[x.jsonl]"])
    with pytest.raises(ConfigError, match="never the target"):
        prepare_data(cache_dir=tmp_path / "cache", seq_len=32, target_domain="crawl", crawl=True)
    with pytest.raises(ConfigError, match="use true or false"):
        prepare_data(cache_dir=tmp_path / "cache", seq_len=32, crawl="yes")
    with pytest.raises(ConfigError, match="allowed: source=embedded"):
        prepare_data(cache_dir=tmp_path / "cache", seq_len=32, source="files", files=["x.jsonl"],
                     crawl=True)
    assert not list(tmp_path.iterdir())


def test_crawl_config_is_the_tiny_default_plus_crawl():
    default = load_config(str(REPO / "configs" / "tiny-cpu.yaml")).to_dict()
    crawled = load_config(str(REPO / "configs" / "tiny-cpu-crawl.yaml")).to_dict()
    assert default["data"]["crawl"] is False and crawled["data"]["crawl"] is True
    assert crawled["run_dir"] != default["run_dir"]
    for tree in (default, crawled):
        tree["data"].pop("crawl"), tree.pop("run_dir")
    assert crawled == default


@pytest.mark.parametrize("config,extra,needle", [
    ("tiny-cpu-crawl.yaml", ["data.target_domain=crawl"], "data.target_domain=crawl is not allowed"),
    ("tiny-cpu.yaml", ["data.target_domain=crawl"], "never the target"),
])
def test_crawl_target_refused_by_the_cli(tmp_path, config, extra, needle):
    args = [str(PRETRAIN), "--config", str(REPO / "configs" / config), f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}", *extra]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0] and "allowed:" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written: no cache, no run folder
