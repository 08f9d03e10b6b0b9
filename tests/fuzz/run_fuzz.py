"""Long fuzz run of the DICOM and NIfTI readers: ``python tests/fuzz/run_fuzz.py --minutes 10 [--seed 0]``.

Mutates the seed files (see ``harness.py``) at random for the given time, alternating DICOM and NIfTI, and
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
from tests.fuzz.harness import Reader, mutate, seed_files, suffix_of


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per file before it counts as a hang")
    parser.add_argument("--out", default="fuzz_findings", help="folder for the inputs that failed")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seeds = seed_files()
    data = {kind: [(path, path.read_bytes()) for path in paths] for kind, paths in seeds.items()}
    counts = {kind: Counter() for kind in data}
    reader = Reader(timeout=args.timeout)
    findings = []
    start = time.monotonic()
    n = 0
    try:
        while time.monotonic() - start < args.minutes * 60:
            kind = "dicom" if n % 3 else "nifti"  # two DICOM inputs per NIfTI: the DICOM reader has more paths
            path, original = rng.choice(data[kind])
            operations = [(rng.randrange(6), rng.randrange(2**20), rng.randrange(2**16))
                          for _ in range(rng.randint(1, 8))]
            mutated = mutate(original, operations)
            outcome = reader.read(kind, mutated, suffix_of(kind, path))
            counts[kind][outcome.status] += 1
            n += 1
            if outcome.status not in ("ok", "data_error"):
                folder = Path(args.out)
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{kind}_{len(findings):04d}{suffix_of(kind, path)}"
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
