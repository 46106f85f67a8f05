"""Worker: launch/pretrain.py with a selection method added the way a developer adds one (tests only).

    python pretrain_with_a_new_method.py --config FILE selection.method=minloss [dotted.key=value ...]

`minloss` (the k lowest losses) is added with exactly what the catalog's docstring asks: an entry in
selection/catalog.py's CATALOG, and its pick function registered with @picks. Nothing else is touched:
config validation, the selector, the step strategy, telemetry and compare read the catalog.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from megatron_greats.selection import catalog  # noqa: E402
# loaded before the new entry, as the package is before this script runs (its import-time check that
# every catalog entry has a pick function has passed; in a source edit both are there from the start)
from megatron_greats.selection.methods import picks, top_k  # noqa: E402

catalog.CATALOG["minloss"] = catalog.MethodSpec("minloss", (catalog.LOSSES,), catalog.WINDOW_KEYS,
                                                reported=catalog.LOSSES, summary="the k smallest losses")


@picks("minloss")
def _minloss(k, losses, **_):
    return top_k(-losses, k)


import pretrain  # noqa: E402  launch/pretrain.py

if __name__ == "__main__":
    sys.exit(pretrain.main(sys.argv[1:]))
