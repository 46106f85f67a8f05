"""The lines of run output that come from DeepSpeed, megatron-core or torch and that a user cannot act
on; the commands (launch/pretrain.py, the benches) call quiet_run_output() first thing. What can be
avoided at its source is avoided there instead (the LR scheduler's "optimizer.step() has been
overridden" warning: deepspeed_internals.replace_plain_optimizer_step). Only the lines below go:
every other warning and error still shows. A library user who imports the package keeps them all.
"""

from __future__ import annotations

import logging
import warnings

# DeepSpeed's logger: (logger name, the message's start).
QUIET_LOGS = (
    # no CUDA device: DeepSpeed runs on the CPU (the memory line at start says "host RAM")
    ("DeepSpeed", "Setting accelerator to CPU."),
)
# Python warnings: (category, message regex, module regex where it is raised; "" any).
QUIET_WARNINGS = (
    # torch's deprecations of collectives that DeepSpeed (ZeRO) and megatron-core call, once per rank
    (FutureWarning, r"`torch\.distributed\.[\w.]+` (is|will be) deprecated|"
                    r"`torch\.distributed\.[\w.]+` is a private function", ""),
    # megatron-core's optional-dependency notices at import (apex, Transformer Engine, ...)
    (Warning, "", r"megatron(\.|$)"),
)


class _StartsWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_run_output() -> None:
    """Drop the QUIET_LOGS and QUIET_WARNINGS lines in this process (before DeepSpeed is imported: it
    detects the accelerator then). Calling it again adds nothing."""
    for name, start in QUIET_LOGS:
        logger = logging.getLogger(name)  # the one DeepSpeed configures later, filters kept
        if not any(isinstance(f, _StartsWith) and f.start == start for f in logger.filters):
            logger.addFilter(_StartsWith(start))
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
