"""Benchmarks that print ratios: `python -m megatron_greats.bench ghost|step` (bench/ghost.py, bench/step.py)."""

import os
import re

from megatron_greats.choices import WINDOW_RANDOM


def rss_bytes() -> int:
    """Resident set size of this process now (CPU memory measurements)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_high_water() -> bool:
    """Reset this process's peak resident set (VmHWM) to its current size; False where the kernel does
    not allow it (not Linux, or /proc/self/clear_refs not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_bytes() -> int:
    """Peak resident set size of this process since its last reset_high_water (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rotated(items: tuple, round_index: int) -> tuple:
    """`items` rotated left by round_index: the order of one benchmark round (each round starts one
    later, so a drift of the machine's speed falls on every variant alike)."""
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


# The keys a cheap-scoring setting may change: how the scoring pass reads the candidates, never which
# candidates, validation samples or model a step has (fidelity compares on the same ones).
CHEAP_KEYS = ("selection.score_window", "selection.score_window_at", "selection.score_layers", "selection.prefilter",
              "selection.score_micro_batch", "selection.score_exclude")
# Exact scoring, whatever the config's default: every token of every candidate, every layer. The
# reference of bench fidelity and the exact rows of bench step.
EXACT_SCORING = ("selection.score_window=null", "selection.score_window_at=start", "selection.score_layers=null",
                 "selection.prefilter=null")
# One method for every step: the benchmarks time or compare one method's step, so a config's phase
# gating (selection.early_method for its first selection.early_steps steps) is left out, with a note.
ONE_METHOD = ("selection.early_method=null", "selection.early_steps=0")


def phases_left_out(cfg, bench: str) -> list:
    """The note a benchmark prints where the config it was given is phased (it runs with ONE_METHOD)."""
    if not cfg.phased:
        return []
    sel = cfg.selection
    return [f"{bench} measures one method's step: the config's selection.early_method={sel.early_method} for its "
            f"first selection.early_steps={sel.early_steps} steps is left out"]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+.-]*")
_NEXT_KEY = re.compile(r",(?=\s*[A-Za-z_][\w.]*=)")  # a comma that starts the next key=value (not one in a list)


def parse_setting(text: str, allowed_keys: tuple, option: str) -> tuple:
    """'NAME:key=value,key=value' -> (NAME, ['key=value', ...]). A comma inside a value (a YAML list)
    stays in it: only a comma followed by key= starts the next override. Raises ConfigError."""
    from megatron_greats.errors import ConfigError

    name, sep, rest = text.partition(":")
    form = f"{option} '{text}' is not NAME:key=value[,key=value...]"
    if not sep or not _NAME.fullmatch(name.strip()) or not rest.strip():
        raise ConfigError(f"{form}; allowed: e.g. {option} 'window32:selection.score_window=32'")
    overrides = [part.strip() for part in _NEXT_KEY.split(rest)]
    for part in overrides:
        key = part.split("=", 1)[0].strip()
        if "=" not in part or key not in allowed_keys:
            raise ConfigError(f"{option} '{text}' sets '{part}'; allowed keys: {', '.join(allowed_keys)}")
    return name.strip(), overrides


def default_settings(cfg, world_size: int, kinds: tuple) -> dict:
    """Cheap settings sized to the config: {name: [overrides]} for each of `kinds` ('window:8' -> a window
    of seq_len/8 at the start, 'random:4' -> seq_len/4 at a random offset, 'top:1', 'prefilter' -> M =
    (N + k) / 2, 'window:4+top:1' both). Those that come out empty or repeated are left out; the caller
    loads each (the config may still refuse one)."""
    seq, n, k = cfg.model.seq_len, cfg.num_candidates(world_size), cfg.num_selected(world_size)
    out = {}
    for kind in kinds:
        name, overrides = [], []
        for part in kind.split("+"):
            what, _, arg = part.partition(":")
            if what in ("window", "random"):
                length = seq // int(arg)
                if length < 1 or length >= seq:
                    break
                name.append(f"window{length}" + ("random" if what == "random" else ""))
                overrides.append(f"selection.score_window={length}")
                if what == "random":
                    overrides.append(f"selection.score_window_at={WINDOW_RANDOM}")
            elif what == "top":
                if int(arg) >= cfg.model.num_layers:
                    break
                name.append(f"top{arg}")
                overrides.append(f"selection.score_layers={arg}")
            elif what == "prefilter":
                if n <= k:
                    break
                name.append(f"prefilter{(n + k) // 2}")
                overrides.append(f"selection.prefilter={(n + k) // 2}")
            else:
                raise ValueError(kind)
        else:
            if overrides not in out.values():
                out["+".join(name)] = overrides
    return out
