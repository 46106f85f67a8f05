"""python -m megatron_greats.bench ghost [--points B,T,d ...] [--repeats N] [--min-seconds S] [--rounds N] [--json FILE]
python -m megatron_greats.bench step --config FILE [--warmup W] [--repeats R] [--rounds N] [--out DIR] [key=value ...]
    [--cheap NAME:key=value[,key=value...] ...] (any launcher: python, torchrun, deepspeed; every rank runs it)
python -m megatron_greats.bench fidelity --config FILE [--steps S] [--every E] [--setting NAME:key=value[,...] ...]
    [--out DIR] [--raw] [key=value ...]
python -m megatron_greats.bench proxy --run RUN_DIR [--steps a,b,c | --every K] [--out FILE.json] [--sel-samples N]
    [--val-samples N] [--seed S] [--batch B] [--no-adam] [key=value ...] (one process; reads val, never test)"""

from __future__ import annotations

import argparse
import functools
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
    # the deepspeed launcher puts --local_rank before the sub-command
    parser.add_argument("--local_rank", dest="launcher_local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="bench", required=True)
    ghost = sub.add_parser("ghost", help="GhostRecorder vs torch.func per-sample gradients + Gram")
    ghost.add_argument("--points", type=_point, nargs="+", default=None, help="B,T,d triples")
    ghost.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, at least")
    ghost.add_argument("--min-seconds", type=float, default=1.0,
                       help="keep timing calls until this much time is spent (at most 200 calls)")
    ghost.add_argument("--rounds", type=int, default=1,
                       help="measure every method this many times, in rotated order; ghost/step: median over rounds")
    ghost.add_argument("--json", default=None, help="also write the results here")
    ghost.add_argument("--one", nargs=4, metavar=("METHOD", "B", "T", "D"), help=argparse.SUPPRESS)
    step = sub.add_parser("step", help="GREATS step vs Regular(k) and Regular(N): time, memory, phase split")
    step.add_argument("--config", required=True, help="YAML run config (see configs/)")
    step.add_argument("--warmup", type=int, default=2, help="steps dropped per variant")
    step.add_argument("--repeats", type=int, default=5, help="steps timed per variant")
    step.add_argument("--rounds", type=int, default=1,
                      help="measure every variant this many times, in rotated order; ratios: median over rounds")
    step.add_argument("--out", default="runs/bench-step", help="folder for bench_step.json and bench_step.md")
    step.add_argument("--cheap", action="append", default=None, metavar="NAME:key=value[,key=value...]",
                      help="a cheap-scoring variant: GREATS with these selection keys (repeatable; 'none': no "
                           "cheap variant); default: a window of seq_len/4 and /8 on the top layer, a prefilter "
                           "of (N+k)/2, a window of seq_len/4")
    step.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    step.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    fidelity = sub.add_parser("fidelity", help="cheap scoring vs exact on the same steps: rank correlation of the "
                                               "scores, overlap of the picks, correlation of the Gram")
    fidelity.add_argument("--config", required=True, help="YAML run config (see configs/)")
    fidelity.add_argument("--steps", type=int, default=None,
                          help="training steps of the exact run, on the config's schedule (at most train.steps); "
                               "default: 60, or train.steps if fewer")
    fidelity.add_argument("--every", type=int, default=2, help="measure every E-th step (steps E-1, 2E-1, ...)")
    fidelity.add_argument("--setting", "--settings", dest="settings", action="append", default=None,
                          metavar="NAME:key=value[,key=value...]",
                          help="a cheap setting (repeatable); default: windows of seq_len/2, /4, /8, /4 at a "
                               "random offset, top 1 and 2 layers, a prefilter of (N+k)/2, window seq_len/4 + top 1")
    fidelity.add_argument("--out", default="runs/bench-fidelity", help="folder for fidelity.json and fidelity.md")
    fidelity.add_argument("--raw", action="store_true",
                          help="also write fidelity_raw.npz: every measured step's scores, Grams and picks")
    fidelity.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    fidelity.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    proxy = sub.add_parser("proxy", help="does the selector fit its proxy? a finished run's picks replayed at its "
                                         "checkpoints: their gains on the step's validation samples, the "
                                         "selection split and val, against a random pick of the same candidates")
    proxy.add_argument("--run", required=True, help="run_dir of a finished run (checkpoints/step_N, selection.jsonl)")
    which = proxy.add_mutually_exclusive_group()
    which.add_argument("--steps", default=None, help="checkpoint steps a,b,c (each with a selection logged at "
                                                     "the step after it); default: every such checkpoint")
    which.add_argument("--every", type=int, default=None, help="the checkpoint steps that are multiples of K")
    proxy.add_argument("--out", default=None, help="the JSON report (and a .md beside it); default: "
                                                   "RUN_DIR/proxy_probe.json")
    proxy.add_argument("--sel-samples", type=int, default=None,
                       help="S: the first N samples of the selection split (default: all of it)")
    proxy.add_argument("--val-samples", type=int, default=None,
                       help="V: the first N samples of the val split (default: all of it)")
    proxy.add_argument("--seed", type=int, default=0, help="seed of the random control R (drawn per step)")
    proxy.add_argument("--batch", type=int, default=16, help="samples per forward/backward")
    proxy.add_argument("--no-adam", dest="adam", action="store_false",
                       help="leave out the views preconditioned by Adam's D from the checkpoint")
    proxy.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's config.yaml "
                                                    "(e.g. data.cache_dir=...)")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megatron_greats.quiet import quiet_run_output

    quiet_run_output()  # before DeepSpeed is imported
    if args.bench == "ghost":
        if args.repeats < 1 or args.rounds < 1:  # before the heavy imports
            print(f"megatron_greats: error: --repeats {args.repeats} / --rounds {args.rounds}; allowed: >= 1",
                  file=sys.stderr)
            return 2
        if not args.min_seconds >= 0:
            print(f"megatron_greats: error: --min-seconds {args.min_seconds}; allowed: >= 0", file=sys.stderr)
            return 2
    from megatron_greats.errors import GreatsError
    from megatron_greats.ghost.reduction import gram_form

    try:
        gram_form()  # MEGATRON_GREATS_GRAM_FORM, checked before anything is built or measured
        return {"step": _step, "fidelity": _fidelity, "ghost": _ghost, "proxy": _proxy}[args.bench](args)
    except GreatsError as e:
        print(f"megatron_greats: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


def _ghost(args) -> int:
    from megatron_greats.bench import ghost as bench_ghost

    if args.one:  # one measurement, in its own process (run() spawns these)
        method, b, t, d = args.one
        measure = bench_ghost.measure_pairs if method == "pairs" else functools.partial(bench_ghost.measure, method)
        print(json.dumps(measure(int(b), int(t), int(d), args.repeats, args.min_seconds)))
        return 0
    print("GhostRecorder vs torch.func per-sample gradients + Gram (2-layer transformer, tied embeddings, "
          f"vocab 1024; median of >= {args.repeats} calls over >= {args.min_seconds} s, peak memory above the model)")
    print("floor: forward + backward w.r.t. activations only, which every exact method needs; "
          "func/floor = the most any exact method can gain")
    print("ghost/step time: the recorder and the ordinary step called in turn in one process, the median of "
          "the pairs' ratios (separate processes: the ratio of their medians)")
    print("kernel floor: ghost/step if the recorder cost only its per-sample GEMMs and Gram in place of the "
          "weight-gradient GEMMs (timed alone in the pairs' process)")
    print(bench_ghost.HEADER)
    bench_ghost.run(args.points or bench_ghost.DEFAULT_POINTS, args.repeats, args.json, args.rounds,
                    args.min_seconds)
    return 0


def _step(args) -> int:
    import os

    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    from megatron_greats.bench import step as bench_step
    from megatron_greats.parallel.state import launcher_rank

    report = bench_step.run(args.config, args.overrides, args.warmup, args.repeats, args.out, args.rounds,
                            cheap=args.cheap)
    if launcher_rank() == 0:  # the process group has ended (run's distributed_session)
        print(bench_step.markdown(report), flush=True)
        print(f"written: {args.out}/bench_step.json, {args.out}/bench_step.md", flush=True)
    return 0


def _fidelity(args) -> int:
    import os

    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    from megatron_greats.bench import fidelity
    from megatron_greats.parallel.state import launcher_rank

    report = fidelity.run(args.config, args.overrides, args.settings, args.steps, args.every, args.out, args.raw)
    if launcher_rank() == 0:
        print(fidelity.markdown(report), flush=True)
        written = ", ".join(f"{args.out}/{name}" for name in ("fidelity.json", "fidelity.md")
                            + (("fidelity_raw.npz",) if args.raw else ()))
        print(f"written: {written}", flush=True)
    return 0


def _proxy(args) -> int:
    from megatron_greats.bench import proxy

    proxy.plan(args.run, args.steps, args.every)  # refusals before the heavy imports
    report = proxy.run(args.run, args.steps, args.every, args.out, args.overrides, args.sel_samples,
                       args.val_samples, args.seed, args.batch, args.adam)
    print(proxy.markdown(report), flush=True)
    print(f"written: {', '.join(report['written'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
