"""The named values of the config's string keys, each defined once: config validation builds its
"allowed:" lists from these tuples, and code compares a config value with a name here, never with a
literal. Plain Python without imports, so config validation and data preparation read it without
torch.

Each line names one key's values and their tuple, in the order "allowed:" lists them:
ARCHS = (GPT2, LLAMA) = ("gpt2", "llama") makes GPT2 "gpt2", LLAMA "llama" and ARCHS both.

selection.method's names and selection.update's modes live with each method's facts in
selection/catalog.py; the names of a step's phases in phases.py.
"""

# data.source
SOURCES = (EMBEDDED, FILES, MEGATRON) = ("embedded", "files", "megatron")
# data.format: one of FILE_FORMATS, or FORMAT_AUTO (from the files' extension)
FORMAT_AUTO = "auto"
FILE_FORMATS = (JSON, JSONL, PARQUET, TEXT) = ("json", "jsonl", "parquet", "text")
# model.arch
ARCHS = (GPT2, LLAMA) = ("gpt2", "llama")
# train.precision
PRECISIONS = (FP32, BF16) = ("fp32", "bf16")
# train.optimizer
OPTIMIZERS = (ADAMW, SGD) = ("adamw", "sgd")
# selection.preconditioner
PRECONDITIONERS = (NO_PRECONDITIONER, ADAM) = ("none", "adam")
# selection.alignment
ALIGNMENTS = (DOT, COSINE) = ("dot", "cosine")
# selection.score_window_at
WINDOW_PLACEMENTS = (WINDOW_START, WINDOW_RANDOM) = ("start", "random")
# selection.eta: a number, null, or ETA_AUTO
ETA_AUTO = "auto"
