"""Every selection method's facts, in one table: what it scores with, the keys it reads, the score it
reports and the updates it allows. Plain Python (no torch), so config validation reads it too.

Adding a method: an entry here, and its pick function in methods.py (registered with @picks(name)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# What a method may rank candidates by (the scoring pass's outputs, selection/methods.py SelectorInputs).
GRAM, VAL_ALIGNMENT, LOSSES, REFERENCE_LOSSES = "gram", "val_alignment", "losses", "reference_losses"
# What telemetry reports per candidate (training/selecting.py): one of the inputs, or derived from them.
GRAD_NORM, EXCESS_LOSS = "grad_norm", "excess_loss"

# selection.update
TWO_PASS, SINGLE_PASS = "two_pass", "single_pass"
UPDATE_MODES = (TWO_PASS, SINGLE_PASS)

# Selection keys that only some methods read (the `keys` of each method). A config may set them for
# one method and still be run with another (quickstart, compare): such a run notes the unread keys
# instead of refusing them. (val_batch, score_micro_batch and update follow from needs_gram.)
GRADIENT_KEYS = ("preconditioner", "score_exclude", "score_layers")
WINDOW_KEYS = ("score_window", "score_window_at")
GREEDY_KEYS = ("eta", "temperature", "self_term", "batch_mean")
ALIGNMENT_KEYS = ("alignment", "target_ema")  # read by the methods that rank by the validation alignment


@dataclass(frozen=True)
class MethodSpec:
    name: str
    ranks_by: tuple               # scoring outputs it reads (GRAM, VAL_ALIGNMENT, LOSSES, REFERENCE_LOSSES)
    keys: tuple = ()              # the selection keys of those above that it reads
    reported: Optional[str] = None  # the per-candidate score telemetry reports, or None
    from_stream: bool = False     # trains on k samples straight from the stream (no candidates to choose)
    interaction: bool = False     # its gains are the alignment term less an interaction with the picks so far
    summary: str = ""

    @property
    def scores(self) -> bool:
        """Runs a scoring pass (a forward over the candidates, at least)."""
        return bool(self.ranks_by)

    @property
    def needs_gram(self) -> bool:
        """Needs per-sample gradient products: a backward over the candidates (and validation samples)."""
        return GRAM in self.ranks_by or VAL_ALIGNMENT in self.ranks_by

    @property
    def needs_reference(self) -> bool:
        return REFERENCE_LOSSES in self.ranks_by

    @property
    def updates(self) -> tuple:
        """The update modes it allows: single_pass forms the update from the Gram's backward."""
        return UPDATE_MODES if self.needs_gram else (TWO_PASS,)

    def reads(self, key: str) -> bool:
        return key in self.keys


CATALOG = {spec.name: spec for spec in (
    MethodSpec("greats", (GRAM, VAL_ALIGNMENT),
               GRADIENT_KEYS + WINDOW_KEYS + GREEDY_KEYS + ALIGNMENT_KEYS + ("prefilter",),
               reported=VAL_ALIGNMENT, interaction=True, summary="the greedy of GREATS: alignment with the validation gradient "
                                               "less the interaction with the picks so far"),
    MethodSpec("first_order", (VAL_ALIGNMENT,), GRADIENT_KEYS + WINDOW_KEYS + ALIGNMENT_KEYS + ("prefilter",),
               reported=VAL_ALIGNMENT, summary="the k largest alignments with the validation gradient"),
    MethodSpec("gradnorm", (GRAM,), GRADIENT_KEYS + WINDOW_KEYS + ("prefilter",), reported=GRAD_NORM,
               summary="the k largest gradient norms"),
    # its top k of the M highest losses is its own pick: it does not read the prefilter
    MethodSpec("maxloss", (LOSSES,), WINDOW_KEYS, reported=LOSSES, summary="the k largest losses"),
    MethodSpec("rholoss", (LOSSES, REFERENCE_LOSSES), WINDOW_KEYS + ("prefilter",),
               reported=EXCESS_LOSS, summary="the k largest losses less a reference model's"),
    MethodSpec("uniform", (), summary="k of the N candidates at random"),
    MethodSpec("regular", (), from_stream=True, summary="plain training on k samples from the stream"),
)}

# Keys noted when set for a method that does not read them (the others apply to every method), in
# the order the notes are printed.
NOTED_KEYS = ("eta", "preconditioner", "alignment", "target_ema", "temperature", "self_term", "batch_mean", "score_exclude",
              "score_window", "score_window_at", "score_layers", "prefilter")
assert set(NOTED_KEYS) == {key for spec in CATALOG.values() for key in spec.keys}, "a method reads an unlisted key"


def spec_of(name: str) -> MethodSpec:
    if name not in CATALOG:
        raise ValueError(f"unknown selection method '{name}'; allowed: {', '.join(CATALOG)}")
    return CATALOG[name]


def regular() -> str:
    """The name of the method that trains on the stream: the baseline every comparison is made against."""
    return next(name for name, spec in CATALOG.items() if spec.from_stream)


def methods_needing_a_reference() -> tuple:
    return tuple(name for name, spec in CATALOG.items() if spec.needs_reference)


def methods_reading(key: str) -> tuple:
    """The names of the methods that read a selection key."""
    return tuple(name for name, spec in CATALOG.items() if spec.reads(key))
