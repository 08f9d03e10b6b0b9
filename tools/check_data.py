"""Check a manifest before training: ``python tools/check_data.py MANIFEST [--config CFG] [--jobs N] [--out F]``.

Lists every problem (file and reason): bytes that are not UTF-8, empty reports, missing files, images that
cannot be read (corrupt DICOM, no PixelData, undecodable transfer syntax, wrong modality, empty or NaN
images, inconsistent DICOM series), and every image outside the data root (listed, never read, with the root
that would hold them all where one is safe). With ``--config`` the config's eval pipeline (up to its first random
step) runs on every image, otherwise just the reader. Exit code 0 when clean, 1 when problems were found,
2 when the manifest itself cannot be read or the config is wrong.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter

from mmvl.data.manifest import add_root_arguments, load_manifest, outside_root_advice, root_options
from mmvl.errors import MMVLError
from mmvl.utils import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status 2: configuration error (--config: unknown or misspelt key, a size that disagrees with "
               "img_size/volume_size...; the message names the key and the fix) or a manifest that cannot be read. "
               "0: no problems, 1: problems found.")
    parser.add_argument("manifest", help="manifest (.jsonl or .csv)")
    parser.add_argument("--config", help="take the eval pipeline and report sections from this training config "
                        "(checked whole first, as tools/train.py checks it)")
    parser.add_argument("--split", help="check only rows of this split")
    add_root_arguments(parser)  # with --config, data.root and data.allow_outside_root apply too
    parser.add_argument("--sections", default=None,
                        help="report sections that must not be empty, comma-separated (default: findings,impression)")
    parser.add_argument("--no-read", action="store_true", help="check files exist without reading them")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default: %(default)s)")
    parser.add_argument("--out", help="also write the problems to this .csv or .jsonl file")
    parser.add_argument("--decoders", action="store_true",
                        help="list which compressed DICOM transfer syntaxes the installed plugins decode, and exit")
    return parser.parse_args(argv)


def _print_decoders() -> None:
    from mmvl.data.dicom import decoder_support

    for name, info in decoder_support().items():
        status = "yes (" + ", ".join(info["plugins"]) + ")" if info["plugins"] else "yes" if info["available"] else "no"
        print(f"{name:<80} {status}")
        for need in info["install"]:
            print(f"{'':<4}install: {need}")


def _write(path: str, problems: list) -> None:
    from mmvl.utils import atomic_write_text

    records = [p.to_dict() for p in problems]
    if path.endswith(".csv"):
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["line", "path", "kind", "reason"])
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(path, buffer.getvalue())
    else:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.decoders:
        _print_decoders()
        return 0
    from mmvl.data.check import check_manifest

    pipeline, sections = None, ("findings", "impression")
    try:
        options = root_options(args, source=args.config)
        if args.config:
            from mmvl.config import Config
            from mmvl.config.validate import validate_config

            data = validate_config(Config.fromfile(args.config))["data"]
            pipeline = list(data["eval_pipeline"])
            sections = tuple(data.get("report_sections", sections))
            options = root_options(args, {"data": data}, source=args.config)
            # unlike a model's recorded config, this is the config training will run this manifest with
            options["allow_outside_root"] |= bool(data.get("allow_outside_root", False))
        if args.sections is not None:
            sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        n_rows, problems = check_manifest(args.manifest, pipeline=pipeline, split=args.split,
                                          report_sections=sections, read=not args.no_read, jobs=args.jobs, **options)
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"line {problem.line}: {problem.path}: [{problem.kind}] {problem.reason}")
    if args.out:
        _write(args.out, problems)
    counts = Counter(p.kind for p in problems)
    rows_with_problems = len({p.line for p in problems})
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no problems"
    print(f"checked {n_rows} rows of {args.manifest}: {rows_with_problems} with problems ({summary})")
    escaping = {p.line for p in problems if p.kind == "outside_root"}
    if escaping:  # one fix for all of them: a root holding every image, where one is safe
        rows = load_manifest(args.manifest, keep_outside_root=True, **options)
        print(f"{len(escaping)} row{'s' if len(escaping) > 1 else ''} with images outside the data root: "
              f"{outside_root_advice(rows)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
