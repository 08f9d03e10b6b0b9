"""Write a manifest into webdataset tar shards: ``python tools/make_shards.py MANIFEST --out DIR --shard-size N``.

Each row is read once through the deterministic head of the config's ``data.train_pipeline`` (reading,
resizing or resampling: the steps before the first random one) and stored preprocessed, with its
section-extracted report, labels and ``path``/``study_id``/``index``, so training streams the shards
(``data.type=shards data.shards=DIR``) instead of reading every DICOM or NIfTI file again. Rows that cannot
be read are left out and listed in ``DIR/skipped.jsonl``. Exit code 0 on success, 2 on an error (a
configuration error included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmvl.data.manifest import add_root_arguments
from mmvl.errors import MMVLError
from mmvl.utils import setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cxr_clip.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status 2: configuration error (--config: unknown or misspelt key, a size that disagrees with "
               "img_size/volume_size...; the message names the key and the fix), or a manifest or output error.")
    parser.add_argument("manifest", help="manifest (.jsonl or .csv)")
    parser.add_argument("--out", required=True, help="folder to write the shards and shards.json into (what it "
                        "held from an earlier run is replaced)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="take data.train_pipeline and data.report_sections from this config "
                             "(default: configs/cxr_clip.py)")
    parser.add_argument("--split", action="append", dest="splits", metavar="SPLIT",
                        help="write only this split (repeat for several; default: every split in the manifest)")
    parser.add_argument("--dtype", choices=["float16"], default=None,
                        help="store images in float16 (half the size; default: the pipeline's float32)")
    add_root_arguments(parser)  # data.root and data.allow_outside_root of --config apply too
    parser.add_argument("--jobs", type=int, default=1, help="worker processes reading images (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return ""


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        from mmvl.config import Config
        from mmvl.config.validate import validate_config
        from mmvl.data.shards import write_shards

        if args.shard_size < 1:
            raise MMVLError(f"--shard-size must be at least 1, got {args.shard_size}")
        data = validate_config(Config.fromfile(args.config))["data"]  # the whole training config, checked
        summary = write_shards(
            args.manifest, args.out, list(data["train_pipeline"]), shard_size=args.shard_size, splits=args.splits,
            report_sections=tuple(data.get("report_sections", ("findings", "impression"))),
            root=args.data_root or data.get("root"),
            allow_outside_root=args.allow_outside_root or bool(data.get("allow_outside_root", False)),
            dtype=args.dtype, progress=not args.no_progress, jobs=args.jobs,
        )
    except (MMVLError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, counts in summary["splits"].items():
        shards = f"{counts['shards']} shard" + ("s" if counts["shards"] != 1 else "")
        print(f"{split}: {shards}, {counts['samples']} samples, {counts['skipped']} rows skipped")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} rows (listed with the reason in {Path(args.out) / 'skipped.jsonl'})")
    print(f"wrote {_size(summary['bytes'])} to {args.out}")
    print(f"to train: --cfg-options data.type=shards data.shards={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
