"""Long fuzz run of the readers: ``python tests/fuzz/run_fuzz.py --minutes 10 [--seed 0] [--kinds dicom,series]``.

Mutates the seed files (see ``harness.py``) at random for the given time, cycling through the targets (DICOM
file, NIfTI, DICOM series folder, raster image), and
prints the number of inputs and of each outcome; findings (wrong error type, hang, crash) are saved under
``--out`` with the seed file and operations that made them. Exit code 1 when there is any finding.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fuzz.harness import Reader, mutate, mutate_series, raster_seeds, seed_files, series_seeds, suffix_of

# Inputs per cycle: the DICOM reader has the most paths; series and raster reads are cheap but add fewer new ones.
SCHEDULE = ["dicom", "nifti", "dicom", "series", "dicom", "raster"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per file before it counts as a hang")
    parser.add_argument("--out", default="fuzz_findings", help="folder for the inputs that failed")
    parser.add_argument("--kinds", default=",".join(dict.fromkeys(SCHEDULE)), help="comma-separated targets")
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(SCHEDULE))
    if unknown or not kinds:
        parser.error(f"unknown --kinds {unknown}; choose from {sorted(set(SCHEDULE))}")
    schedule = [kind for kind in SCHEDULE if kind in kinds]
    rng = random.Random(args.seed)
    data = {kind: [(path, path.read_bytes()) for path in paths] for kind, paths in seed_files().items()}
    data["series"] = [(Path(name), files) for name, files in series_seeds().items()]
    data["raster"] = [(Path(name), content) for name, content in raster_seeds().items()]
    counts = {kind: Counter() for kind in schedule}
    reader = Reader(timeout=args.timeout)
    findings = []
    start = time.monotonic()
    n = 0
    try:
        while time.monotonic() - start < args.minutes * 60:
            kind = schedule[n % len(schedule)]
            path, original = rng.choice(data[kind])
            operations = [(rng.randrange(6), rng.randrange(2**20), rng.randrange(2**16))
                          for _ in range(rng.randint(1, 8))]
            if kind == "series":
                target, folder_op = rng.randrange(8), rng.randrange(4)
                mutated = mutate_series(original, target, operations, folder_op)
                operations = {"slice": target, "folder_op": folder_op, "operations": operations}
            else:
                mutated = mutate(original, operations)
            outcome = reader.read(kind, mutated, suffix_of(kind, path))
            counts[kind][outcome.status] += 1
            n += 1
            if outcome.status not in ("ok", "data_error"):
                folder = Path(args.out)
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{kind}_{len(findings):04d}{suffix_of(kind, path)}"
                if isinstance(mutated, dict):
                    (folder / name).mkdir()
                    for slice_name, content in mutated.items():
                        (folder / name / slice_name).write_bytes(content)
                else:
                    (folder / name).write_bytes(mutated)
                findings.append({"file": name, "seed": path.name, "operations": operations, **vars(outcome)})
                (folder / "findings.json").write_text(json.dumps(findings, indent=1))
                print(f"{outcome.status}: {path.name} {operations}\n{outcome.detail}", flush=True)
    finally:
        reader.close()
    summary = {"inputs": n, "seconds": round(time.monotonic() - start, 1), "workers_started": reader.started,
               "outcomes": {kind: dict(c) for kind, c in counts.items()}, "findings": len(findings)}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["findings"] else 0)
