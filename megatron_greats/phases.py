"""The names of a step's phases: the seconds of each are in selection.jsonl, TensorBoard
(selection/seconds_*) and the step benchmark. The recorder (ghost/) times its own phases under these
names too, when given a clock."""

SCORE_FORWARD = "score_forward"
SCORE_BACKWARD = "score_backward"
SCORE_EXCHANGE = "score_exchange"    # pipeline send/receive in the scoring pass, waiting included
GHOST_PRODUCTS = "ghost_products"    # per-sample products, also those formed inside the backward
ALLREDUCE = "allreduce"              # sums over ranks: the Gram's, Adam's state gathered under ZeRO
SELECTION = "selection"
TRAINING = "training"

# In the order they happen.
SCORING_PHASES = (SCORE_FORWARD, SCORE_BACKWARD, SCORE_EXCHANGE, GHOST_PRODUCTS, ALLREDUCE)
STEP_PHASES = SCORING_PHASES + (SELECTION, TRAINING)
