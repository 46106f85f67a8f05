"""Prepare the embedded corpus (bible, shakespeare, python_docs) and print documents, tokens
and samples per split and domain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import GreatsError
from .prepare import DataBundle, prepare_data
from .splits import SPLITS


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_greats.data", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-docs-per-domain", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        bundle = prepare_data(cache_dir=args.cache_dir, seq_len=args.seq_len,
                              vocab_size=args.vocab_size,
                              max_docs_per_domain=args.max_docs_per_domain)
    except GreatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary(bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
