"""De-identify DICOM files to PS3.15 Annex E: ``python tools/deidentify.py IN OUT --key KEY [--options ...]``.

IN is a DICOM file or a folder searched recursively; OUT receives the copies at the same relative paths and
``deidentification_report.json`` (what was removed or replaced, per file kind; no values). Images that may show
identifying text in their pixels (BurnedInAnnotation YES, secondary captures) are refused and listed unless
``--allow-burned-in``. Exit code 0 when every file was copied, 1 when some were refused or failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    from mmvl.data.deid import DEFAULT_OPTIONS, OPTIONS, deidentify_tree
    from mmvl.errors import MMVLError
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmvl.data.deid import DEFAULT_OPTIONS, OPTIONS, deidentify_tree
    from mmvl.errors import MMVLError

REPORT_NAME = "deidentification_report.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("input", metavar="IN", help="a DICOM file, or a folder searched recursively")
    parser.add_argument("output", metavar="OUT", help="folder for the copies (a .dcm path for a single file)")
    parser.add_argument("--key", required=True,
                        help="secret key file for pseudonyms, UIDs and date shifts (created when missing); keep it "
                        "private and outside OUT, and give the same file again to link later exports")
    parser.add_argument("--options", default=",".join(DEFAULT_OPTIONS),
                        help="PS3.15 options on top of the Basic Profile, comma-separated, or 'none': "
                        f"{', '.join(OPTIONS)} (default: %(default)s)")
    parser.add_argument("--allow-burned-in", action="store_true",
                        help="copy images that may show text in their pixels too (checked by eye first); their "
                        "copies say PatientIdentityRemoved NO")
    parser.add_argument("--report", help=f"where to write the JSON report (default OUT/{REPORT_NAME})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source, out, key = Path(args.input), Path(args.output), Path(args.key)
    named = args.options.strip()
    options = [] if named.lower() == "none" else [name.strip() for name in named.split(",") if name.strip()]
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        parser.error(f"--options: {unknown[0]!r} is not an option; choose from {', '.join(OPTIONS)} or 'none'")
    if not source.exists():
        parser.error(f"IN {source}: not found")
    if source.is_dir() and (_inside(out, source) or _inside(source, out)):
        parser.error(f"OUT {out} and IN {source} overlap: write the copies to a folder outside the originals")
    if source.is_file() and Path(os.path.abspath(out)) == Path(os.path.abspath(source)):
        parser.error("OUT is IN: the copy would overwrite the original")
    if _inside(key, out if out.suffix.lower() != ".dcm" else out.parent):
        parser.error(f"--key {key} lies inside OUT: whoever receives the copies could undo the pseudonyms")
    try:
        report = deidentify_tree(source, out, key, options=options, allow_burned_in=args.allow_burned_in,
                                 progress=not args.no_progress)
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    folder = out.parent if out.suffix.lower() == ".dcm" else out
    report_path = Path(args.report) if args.report else folder / REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report.write(report_path)
    print(report.format())
    print(f"report: {report_path}")
    return 1 if report.refused else 0


if __name__ == "__main__":
    sys.exit(main())
