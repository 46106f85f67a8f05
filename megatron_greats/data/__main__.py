"""Prepare the embedded corpus (bible, shakespeare, python_docs; with --crawl also the crawl-like
fourth domain) and print documents, tokens and samples per split and domain."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ..errors import GreatsError
from .documents import read_jsonl
from .prepare import DataBundle, prepare_data
from .splits import CRAWL_DOMAIN, SPLITS


def summary(bundle: DataBundle) -> str:
    rows = [f"{'split':<9} {'domain':<14} {'documents':>10} {'tokens':>12} {'samples':>9}"]
    for split in SPLITS:
        for domain, counts in bundle.splits[split].stats().items():
            if counts["documents"]:
                rows.append(f"{split:<9} {domain:<14} {counts['documents']:>10} "
                            f"{counts['tokens']:>12} {counts['samples']:>9}")
    rows.append(f"vocab_size {bundle.vocab_size}, seq_len {bundle.train.seq_len}, "
                f"target domain {bundle.target_domain}")
    rows.extend(f"{name}: {path}" for name, path in bundle.paths.items())
    return "\n".join(rows)


def crawl_summary(bundle: DataBundle) -> str:
    """The crawl domain's kinds (documents, characters, verbatim repeats) and each domain's share
    of the train split's characters."""
    from .sources import crawl

    documents = read_jsonl(bundle.paths["corpus"])
    train_ids = set(json.loads(bundle.paths["splits"].read_text())["train"])
    train = [doc for doc in documents if doc.id in train_ids]
    chars = Counter()
    for doc in train:
        chars[doc.domain] += len(doc.text)
    total = sum(chars.values())
    found = crawl.composition([doc for doc in train if doc.domain == CRAWL_DOMAIN])
    rows = [f"{'crawl kind':<10} {'documents':>10} {'chars':>10} {'repeats':>8} {'repeat chars':>13}"]
    for kind, row in [*found["kinds"].items(), ("all", found["total"])]:
        rows.append(f"{kind:<10} {row['documents']:>10} {row['chars']:>10} "
                    f"{row['duplicate_documents']:>8} {row['duplicate_chars']:>13}")
    rows.append(f"distinct crawl texts {found['distinct_texts']}, most repeated text "
                f"{found['most_repeated']} times")
    rows.append("train characters: " + ", ".join(
        f"{domain} {count} ({count / total:.1%})" for domain, count in sorted(chars.items())))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_greats.data", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-docs-per-domain", type=int, default=None)
    parser.add_argument("--crawl", action="store_true",
                        help="add the crawl-like fourth domain (docs/data.md)")
    args = parser.parse_args(argv)
    try:
        bundle = prepare_data(cache_dir=args.cache_dir, seq_len=args.seq_len,
                              vocab_size=args.vocab_size,
                              max_docs_per_domain=args.max_docs_per_domain, crawl=args.crawl)
    except GreatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary(bundle))
    if args.crawl:
        print(crawl_summary(bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
