"""Data pipeline: corpora, splits, tokenizer, Megatron indexed datasets, samples and their order."""

import importlib

# Resolved on first use, so that the config validation can import .splits (the split table)
# without importing torch and sentencepiece.
_EXPORTS = {"DataBundle": "prepare", "prepare_data": "prepare", "GlobalBatchSampler": "samples",
            "SampleSet": "samples", "epoch_order": "samples", "DOMAINS": "sources", "CRAWL_DOMAIN": "splits",
            "corpora_dir": "sources", "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
            "HELD_OUT": "splits", "SPLITS": "splits"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
