"""Benchmarks that print ratios: `python -m megatron_greats.bench ghost` (see bench/ghost.py)."""
