"""megatron_greats: GREATS online batch selection in DeepSpeed/Megatron LLM pretraining."""

from megatron_greats import megatron_import

__version__ = "0.1.0"

megatron_import.install()  # before any megatron-core import: 2 s less per process start (megatron_import.py)
