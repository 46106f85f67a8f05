"""python -m megatron_greats.bench ghost [--points B,T,d ...] [--repeats N] [--json FILE]"""

from __future__ import annotations

import argparse
import json
import sys


def _point(text: str) -> tuple:
    try:
        b, t, d = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"point '{text}' is not B,T,d (three integers)") from None
    return b, t, d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_greats.bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    ghost = sub.add_parser("ghost", help="GhostRecorder vs torch.func per-sample gradients + Gram")
    ghost.add_argument("--points", type=_point, nargs="+", default=None, help="B,T,d triples")
    ghost.add_argument("--repeats", type=int, default=3)
    ghost.add_argument("--json", default=None, help="also write the results here")
    ghost.add_argument("--one", nargs=4, metavar=("METHOD", "B", "T", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megatron_greats.bench import ghost as bench_ghost

    if args.one:  # one measurement, in its own process (run() spawns these)
        method, b, t, d = args.one
        print(json.dumps(bench_ghost.measure(method, int(b), int(t), int(d), args.repeats)))
        return 0
    print("GhostRecorder vs torch.func per-sample gradients + Gram "
          "(2-layer transformer, tied embeddings, vocab 1024; median of repeats, peak memory above the model)")
    print(bench_ghost.HEADER)
    bench_ghost.run(args.points or bench_ghost.DEFAULT_POINTS, args.repeats, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
