"""Zero-shot classification of scans from label names.

    python tools/zero_shot.py MODEL INPUT... [--labels "pleural effusion,pneumothorax"]
        [--preset chexzero|ctclip|ctrate|ensemble|prompts.json|prompts.yaml] [--mode pairwise|multiclass]
        [--out preds.csv] [--batch-size 32] [--device cpu] [--limit N]
        [--allow-gaps] [--reader-option KEY=VALUE ...] [--heatmaps DIR [--heatmap-method similarity|gradcam]]
    python tools/zero_shot.py MODEL --manifest test.jsonl [--data-root DIR] ...

MODEL is a training work dir, a checkpoint file or a model-zoo entry (folder or name). Without --labels (and
--preset) the labels and prompts recorded in the zoo entry's prompts.json are used.
INPUT may be files or folders, searched recursively: a 2D model takes DICOM, PNG, JPEG and TIFF files, a 3D
model NIfTI files and DICOM series (the DICOM slices in one folder, one input per series); a DICOMDIR (CD/PACS
export) is read for the images and series it lists. Every other file found is a row with its reason.
Preprocessing is rebuilt from the model's recorded spec; --allow-gaps (interpolate the missing slices of a
DICOM series) and --reader-option override its reader's options. Manifest images must lie in --data-root
(default: the data.root the model was trained with, else the manifest's folder; --allow-outside-root: anywhere).
The CSV has one row per scan (path, study_id, one probability column per label, error); a file that cannot
be read gets its reason in ``error`` and the run goes on. A ``.json`` sidecar records the model, preset,
prompts, mode and mmvl version. Exit code: 0 all scans classified, 1 some failed, 2 bad arguments. With a
labelled manifest, per-label AUROC is printed.

--heatmaps DIR writes where each label is (mmvl.grounding with the label's positive prompts): per scan and label
``<scan>_<label>.png``, the scan with the map as a colour overlay, a colour bar and the zero-shot probability in the
title; for volumes a montage of the axial slices where the map peaks and ``<scan>_<label>.nii.gz``, the map in the
scan's geometry (the scan's affine). --heatmap-method: similarity (patch tokens in the joint space) or gradcam.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

import mmvl
from mmvl.data.inputs import add_reader_arguments, manifest_items, reader_options, rows_csv
from mmvl.data.manifest import add_root_arguments, root_options
from mmvl.errors import ConfigError, MMVLError
from mmvl.evaluation.zero_shot import PRESETS, auroc, prompts_from
from mmvl.inference import zero_shot
from mmvl.loading import load_model, recorded_preset
from mmvl.utils import atomic_write_text, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="training work dir, checkpoint file, or model-zoo entry (folder or name)")
    parser.add_argument("inputs", nargs="*", help="scan files or folders")
    parser.add_argument("--manifest", help="also run over the rows of a manifest (JSONL/CSV)")
    add_root_arguments(parser)
    parser.add_argument("--labels", help="comma-separated label names (default: those of the zoo entry's "
                        "prompts.json)")
    parser.add_argument("--preset", help=f"prompt preset ({', '.join(PRESETS)}) or a JSON/YAML prompt file "
                        "(default: the zoo entry's recorded prompts, else chexzero)")
    parser.add_argument("--mode", default="pairwise", choices=["pairwise", "multiclass"])
    parser.add_argument("--out", default="zero_shot.csv", help="output CSV (a .json sidecar is written beside it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N scans")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_reader_arguments(parser)
    parser.add_argument("--heatmaps", metavar="DIR", help="also write grounding heatmaps of every label on every scan")
    parser.add_argument("--heatmap-method", default="similarity", choices=["similarity", "gradcam"],
                        help="--heatmaps: patch-text similarity or Grad-CAM (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        loaded = load_model(args.model, device=args.device)
        recorded = loaded.prompts or {}
        labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else \
            list(recorded.get("labels") or [])
        if not labels:
            raise ConfigError(f"{args.model}: give --labels (this model records no zero-shot labels in a "
                              "prompts.json)")
        preset = args.preset or (recorded_preset(recorded) if recorded else "chexzero")
        prompts = prompts_from(labels, preset)
        options = reader_options(args)
        rows = zero_shot(loaded, args.inputs, labels, preset=preset, mode=args.mode, manifest=args.manifest,
                         batch_size=args.batch_size, device=args.device, limit=args.limit,
                         data_root=args.data_root, allow_outside_root=args.allow_outside_root,
                         reader_options=options)
        n_heatmaps = _write_heatmaps(args, loaded, prompts, rows, labels) if args.heatmaps else 0
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    atomic_write_text(out, rows_csv(rows, ["path", "study_id", "view", *labels, "error"]))
    n_failed = sum(bool(row["error"]) for row in rows)
    sidecar = {"model": loaded.source, "preset": args.preset or ("prompts.json" if recorded else "chexzero"),
               "mode": args.mode, "labels": labels, "prompts": prompts,
               "logit_scale": float(loaded.model.contrastive_head.scale().detach()),
               "preprocess": loaded.preprocess.kind, "reader_options": options,
               "mmvl_version": mmvl.__version__, "n_inputs": len(rows), "n_failed": n_failed}
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    truth = {}
    if args.manifest:
        truth = {(item.path, item.study_id or ""): item.labels for item in manifest_items(
            args.manifest, **root_options(args, loaded.config, source=loaded.source)) if item.labels}
    _print_summary(rows, labels, truth)
    print(f"wrote {out} and {out.with_suffix('.json')} ({n_failed} of {len(rows)} failed)"
          + (f"; {n_heatmaps} heatmap files in {args.heatmaps}" if args.heatmaps else ""))
    return 1 if n_failed else 0


def _write_heatmaps(args: argparse.Namespace, loaded: Any, prompts: dict[str, dict], rows: list[dict[str, Any]],
                    labels: list[str]) -> int:
    """Grounding maps of every label's positive prompts on the scans of ``rows`` (found again, in the same order),
    titled with the zero-shot probabilities of ``rows``; returns the number of files written."""
    from mmvl.data.inputs import with_reader_options
    from mmvl.evaluation.grounding import build_texts, grounding_items, iter_heatmaps
    from mmvl.evaluation.overlays import write_heatmaps

    loaded = dataclasses.replace(loaded, preprocess=with_reader_options(loaded.preprocess, reader_options(args)))
    items = grounding_items(loaded, args.inputs, args.manifest, args.data_root, args.allow_outside_root, args.limit)
    texts = build_texts(loaded.model, {label: prompts[label]["positive"] for label in labels})
    taken: set[str] = set()
    written = 0
    for row, result in zip(rows, iter_heatmaps(loaded, items, texts, method=args.heatmap_method,
                                               batch_size=args.batch_size)):
        if row["path"] != result.path:  # never expected: the same inputs are found the same way
            raise ConfigError(f"--heatmaps: scans found in a different order ({row['path']} vs {result.path})")
        result.probability = {label: None if math.isnan(row[label]) else row[label] for label in labels}
        written += len(write_heatmaps(result, args.heatmaps, labels, taken))
    return written


def _print_summary(rows: list[dict[str, Any]], labels: list[str], truth: dict[tuple[str, str], dict]) -> None:
    width = max(8, *(len(label) for label in labels))
    print("\n" + "file".ljust(28) + "".join(label[:width].rjust(width + 2) for label in labels))
    for row in [r for r in rows if not r["error"]][:8]:
        print(Path(row["path"]).name[:27].ljust(28) + "".join(f"{row[label]:.3f}".rjust(width + 2) for label in labels))
    for row in [r for r in rows if r["error"]][:8]:
        print(f"{Path(row['path']).name[:27]:<28}error: {row['error']}")
    if truth:
        print("\nAUROC against the manifest's labels:")
        for label in labels:
            pairs = [(row[label], truth[key][label]) for row in rows if not row["error"]
                     and (key := (row["path"], row["study_id"])) in truth and truth[key].get(label, -1) in (0, 1)]
            if pairs:
                print(f"  {label:<{width}}  {auroc([p for p, _ in pairs], [int(t) for _, t in pairs]):.3f}  "
                      f"(n={len(pairs)})")


if __name__ == "__main__":
    sys.exit(main())
