"""The report labeller (mmvl.evaluation.labeller) on the even-numbered IU X-ray reports: per-observation precision,
recall and F1 against the reports' MeSH major terms, and labelling speed on one core.

``python benchmarks/bench_labeller.py`` reads torchxrayvision's NLMCXR_reports.tgz (or ``--reports``), keeps the
reports whose number (``pmcId``) is even (the odd ones are held out for an independent check of the labeller and
never read here), prints a table and one JSON line ``{"bench": "labeller", ...}`` with every figure. The mapping from
MeSH terms to observations is ``mmvl.evaluation.labeller.IU_MESH_TERMS``; an observation counts as present when the
labeller reads it positive or, under the default ``--uncertain positive``, uncertain.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmvl.evaluation.labeller import (  # noqa: E402
    NEGATIVE,
    OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
    label_observations,
    mesh_observations,
)

COLLECTION_SIZE = 3955  # reports in the IU X-ray collection: speed is timed on this many


def load_iu_xray():
    spec = importlib.util.spec_from_file_location("iu_xray", REPO / "datasets" / "iu_xray.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def observation_table(labels: list[dict], truth: list[set[str]], uncertain: str) -> dict[str, dict[str, Any]]:
    present = (POSITIVE, UNCERTAIN) if uncertain == "positive" else (POSITIVE,)
    table = {}
    for name in OBSERVATIONS:
        said = [row[name] in present for row in labels]
        true = [name in row for row in truth]
        tp = sum(s and t for s, t in zip(said, true))
        fp, fn = sum(said) - tp, sum(true) - tp
        table[name] = {
            "mesh_positive": tp + fn, "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "positive": sum(row[name] == POSITIVE for row in labels),
            "uncertain": sum(row[name] == UNCERTAIN for row in labels),
            "negative": sum(row[name] == NEGATIVE for row in labels),
        }
    return table


def time_labelling(texts: Sequence[str], n_reports: int, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` timings of labelling ``n_reports`` reports (``texts`` cycled), on one core."""
    batch = [texts[i % len(texts)] for i in range(n_reports)]
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    wall, cpu = [], []
    try:
        for _ in range(repeats):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for text in batch:
                label_observations(text)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    finally:
        if cores:
            os.sched_setaffinity(0, cores)
    return {"n_reports": n_reports, "seconds_wall": min(wall), "seconds_cpu": min(cpu),
            "reports_per_s": n_reports / min(wall)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", help="NLMCXR_reports.tgz or its extracted folder (default: torchxrayvision's)")
    parser.add_argument("--uncertain", choices=("positive", "negative"), default="positive",
                        help="an uncertain reading counts as present (default) or absent")
    parser.add_argument("--n-reports", type=int, default=COLLECTION_SIZE, help="reports timed (default 3955)")
    parser.add_argument("--repeats", type=int, default=3, help="timings; the best is reported (default 3)")
    args = parser.parse_args(argv)

    reports = load_iu_xray().read_reports(args.reports, parity="even")
    pairs = [(report.text(), report.mesh_major) for report in reports if report.text()]
    labels = [label_observations(text) for text, _ in pairs]
    table = observation_table(labels, [mesh_observations(terms) for _, terms in pairs], args.uncertain)
    speed = time_labelling([text for text, _ in pairs], args.n_reports, args.repeats)

    print(f"{len(pairs)} even-numbered IU X-ray reports (findings + impression) against MeSH major terms; "
          f"present = positive{' or uncertain' if args.uncertain == 'positive' else ''}")
    print(f"  {'observation':<28} {'MeSH':>5}  precision  recall     F1   pos  unc  neg")
    for name, row in table.items():
        print(f"  {name:<28} {row['mesh_positive']:>5}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
              f"{row['f1']:5.3f}  {row['positive']:4d} {row['uncertain']:4d} {row['negative']:4d}")
    print(f"speed: {speed['n_reports']} reports in {speed['seconds_wall']:.2f} s on one core "
          f"({speed['reports_per_s']:.0f} reports/s; {speed['seconds_cpu']:.2f} s CPU), best of {args.repeats}")
    record = {"bench": "labeller", "n_reports": len(pairs), "uncertain": args.uncertain, "table": table,
              "speed": speed, "python": platform.python_version(), "machine": platform.processor() or None}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
