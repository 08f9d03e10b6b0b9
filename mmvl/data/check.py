"""Check every row of a manifest before training: encoding, report text, files present, images readable.

Used by ``tools/check_data.py``; returns one :class:`Problem` per bad row or file, never raises on bad data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from mmvl.data.manifest import load_manifest
from mmvl.data.reports import report_text
from mmvl.data.transforms import LoadVolume, Pipeline
from mmvl.data.volume import is_volume_source
from mmvl.errors import DataError

KINDS = ("encoding", "outside_root", "empty_report", "missing_file", "unreadable", "unexpected")


@dataclass(frozen=True)
class Problem:
    line: int
    path: str
    kind: str  # one of KINDS
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_pipeline(path: str) -> list[dict[str, Any]]:
    """Just the reader: ``LoadVolume`` for NIfTI files and series folders, ``LoadImage`` otherwise."""
    return [dict(type="LoadVolume")] if is_volume_source(path) else [dict(type="LoadImage")]


def _read(task: tuple[int, str, dict[str, Any], list[dict[str, Any]] | None]) -> Problem | None:
    line, path, fields, spec = task
    try:
        Pipeline(spec or default_pipeline(path)).load(path, **fields)
    except DataError as err:
        return Problem(line, path, "unreadable", err.problem if err.path == path else str(err))
    except Exception as err:  # the check must list every problem, whatever raised it
        return Problem(line, path, "unexpected", f"{type(err).__name__}: {err}")
    return None


def check_manifest(
    manifest: str | os.PathLike,
    pipeline: Sequence[dict[str, Any]] | None = None,
    split: str | None = None,
    report_sections: Sequence[str] = ("findings", "impression"),
    require_report: bool = True,
    read: bool = True,
    jobs: int = 1,
    progress: bool = True,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> tuple[int, list[Problem]]:
    """Rows checked and the problems found. ``pipeline``: the deterministic steps to run on each image
    (default: just the reader); ``read=False`` checks presence only; ``jobs`` worker processes; ``root`` and
    ``allow_outside_root`` as for :func:`~mmvl.data.manifest.load_manifest`. Every image outside the data root
    is an ``outside_root`` problem, and is neither opened nor looked for."""
    # a malformed manifest is an error, not a per-row problem; rows outside the root are listed, all of them
    rows = load_manifest(manifest, root=root, allow_outside_root=allow_outside_root, keep_outside_root=True)
    if split is not None:
        rows = [row for row in rows if row.get("split") == split]
    problems: list[Problem] = []
    tasks = []
    volume_pipeline = bool(pipeline) and Pipeline(pipeline).kind == "3d"
    spec = list(Pipeline(pipeline).deterministic_spec) if pipeline else None
    data_root = os.path.abspath(root if root is not None else os.path.dirname(manifest))
    for row in rows:
        line = row["line"]
        outside = row.get("outside_root") or []
        problems.extend(Problem(line, path, "outside_root", f"outside the data root {data_root}") for path in outside)
        if row.get("error"):
            problems.append(Problem(line, row["image"][0], "encoding", row["error"]))
            continue
        if require_report and not report_text(row["report"], report_sections):
            problems.append(Problem(line, row["image"][0], "empty_report", "report is empty after section "
                                                                           f"extraction {list(report_sections)}"))
        fields = {key: row[key] for key in LoadVolume.FIELDS if row.get(key) is not None}
        for path in row["image"]:
            if path in outside:
                continue  # never opened, nor looked for
            if not os.path.exists(path):
                problems.append(Problem(line, path, "missing_file", "not found"))
            elif os.path.isdir(path) and pipeline and not volume_pipeline:
                problems.append(Problem(line, path, "unreadable", "is a folder, but the pipeline reads 2D images"))
            elif read:
                tasks.append((line, path, fields, spec))
    problems.extend(p for p in _run(tasks, jobs, progress) if p is not None)
    problems.sort(key=lambda p: (p.line, p.path))
    return len(rows), problems


def _run(tasks: list, jobs: int, progress: bool) -> Iterator[Problem | None]:
    bar = dict(total=len(tasks), desc="check", unit="file", disable=not progress)
    if jobs <= 1 or len(tasks) < 2:
        yield from tqdm(map(_read, tasks), **bar)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from tqdm(pool.map(_read, tasks, chunksize=max(1, len(tasks) // (jobs * 8))), **bar)
