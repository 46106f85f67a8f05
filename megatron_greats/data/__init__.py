"""Data pipeline: corpora, splits, tokenizer, Megatron indexed datasets, samples and their order."""

from .prepare import DataBundle, prepare_data
from .samples import GlobalBatchSampler, SampleSet, epoch_order
from .sources import DOMAINS, corpora_dir
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["DOMAINS", "DataBundle", "GlobalBatchSampler", "SampleSet", "Tokenizer",
           "corpora_dir", "epoch_order", "prepare_data", "train_tokenizer"]
