"""megatron_greats: GREATS online batch selection in DeepSpeed/Megatron LLM pretraining."""

__version__ = "0.1.0"
