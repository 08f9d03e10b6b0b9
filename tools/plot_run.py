"""Draw a training run's curves as PNGs from its metrics.jsonl (the trainer also does this at the end of a run,
``train.plots=True``).

    python tools/plot_run.py WORK_DIR [--out DIR] [--smoothing 0.6]

Writes loss.png (training loss raw and smoothed, gradient norm), lr.png, val.png (validation losses, metrics
in [0, 1] such as Recall@K, other metrics), throughput.png (samples/s, step and data time) and head_scalars.png
(each head's own scalars, e.g. clip/logit_scale), those the log has data for, into WORK_DIR/plots (or --out),
and prints their paths. Exit code 0 on success, 1 when no metric has a finite value, 2 on bad arguments or a
missing or empty metrics.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from mmvl.errors import MMVLError
from mmvl.utils import setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", help="training work dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="folder for the PNGs (default WORK_DIR/plots)")
    parser.add_argument("--smoothing", type=float, default=None,
                        help="EMA weight of the smoothed lines, in [0, 1) (default 0.6, as TensorBoard)")
    args = parser.parse_args(argv)
    if args.smoothing is not None and not 0.0 <= args.smoothing < 1.0:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from mmvl.engine.plots import SMOOTHING, plot_run

    weight = SMOOTHING if args.smoothing is None else args.smoothing
    try:
        paths = plot_run(args.work_dir, out=args.out, weight=weight)
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: {args.work_dir}/metrics.jsonl: no metric has a finite value; nothing drawn", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
