"""Benchmarks that print ratios: `python -m megatron_greats.bench ghost|step` (bench/ghost.py, bench/step.py)."""

import os


def rss_bytes() -> int:
    """Resident set size of this process now (CPU memory measurements)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rotated(items: tuple, round_index: int) -> tuple:
    """`items` rotated left by round_index: the order of one benchmark round (each round starts one
    later, so a drift of the machine's speed falls on every variant alike)."""
    shift = round_index % len(items)
    return items[shift:] + items[:shift]
