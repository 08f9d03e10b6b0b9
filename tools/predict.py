"""Per-label probabilities and predictions of a fine-tuned classifier, or masks of a fine-tuned segmenter, on scans.

    python tools/predict.py MODEL INPUT... [--out preds.csv] [--batch-size 32] [--device cpu] [--limit N]
        [--threshold LABEL=VALUE ...] [--allow-gaps] [--reader-option KEY=VALUE ...]
    python tools/predict.py MODEL --manifest test.jsonl [--data-root DIR] ...

MODEL is a classifier's zoo entry (tools/export.py on a configs/finetune/ work dir; folder or name), or the work
dir or checkpoint itself. INPUT may be files or folders, found as tools/zero_shot.py finds them (DICOM, PNG,
JPEG, TIFF for a 2D model; NIfTI files and DICOM series for a 3D one; DICOMDIR read); every other file found is
a row with its reason. The CSV has one row per scan: path, study_id, view, one probability column per label,
then ``<label>_pred`` (1 when the probability reaches the label's threshold, chosen F1-optimal on the training
run's validation split and recorded in the entry; --threshold overrides) or, for a multi-class model,
``prediction``, and ``error``. A ``.json`` sidecar records the model, task, thresholds and mmvl version.
A segmenter (configs/finetune/seg_*) writes one mask per label and scan under --mask-dir (default: the CSV's
name without suffix + "_masks"): NIfTI with the scan's affine for volumes (the recorded preprocessing's ROI;
--whole-scan: the whole volume by sliding windows, for models trained on random crops),
PNG at the image's size for 2D, thresholded at each label's Dice-optimal threshold on the run's validation split
(--threshold overrides); the CSV then has ``<label>_mask`` and ``<label>_voxels`` columns.
Exit code: 0 all scans predicted, 1 some failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import mmvl
from mmvl.data.inputs import add_reader_arguments, reader_options, rows_csv
from mmvl.data.manifest import add_root_arguments
from mmvl.errors import ConfigError, MMVLError
from mmvl.evaluation.predict import classifier_record, prediction_fields
from mmvl.evaluation.segment import has_segmenter, mask_fields, segmenter_record
from mmvl.inference import predict
from mmvl.loading import load_model
from mmvl.utils import atomic_write_text, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="classifier zoo entry (folder or name), fine-tuning work dir or checkpoint")
    parser.add_argument("inputs", nargs="*", help="scan files or folders")
    parser.add_argument("--manifest", help="also run over the rows of a manifest (JSONL/CSV)")
    add_root_arguments(parser)
    parser.add_argument("--out", default="preds.csv", help="output CSV (a .json sidecar is written beside it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N scans")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threshold", action="append", default=[], metavar="LABEL=VALUE",
                        help="override a label's recorded threshold; repeatable")
    parser.add_argument("--mask-dir", help="segmenters: where the masks go (default: OUT without suffix + _masks)")
    parser.add_argument("--whole-scan", action="store_true", help="segmenters: the whole volume by sliding windows "
                        "(CropOrPad pads only) instead of the training ROI")
    add_reader_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def parse_thresholds(pairs: list[str]) -> dict[str, float]:
    thresholds = {}
    for pair in pairs:
        label, sep, value = pair.rpartition("=")
        try:
            thresholds[label.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not label.strip() or not 0 <= thresholds[label.strip()] <= 1:
            raise ConfigError(f"--threshold {pair!r}: expected LABEL=VALUE with VALUE in [0, 1], e.g. nodule=0.3")
    return thresholds


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        thresholds = parse_thresholds(args.threshold)
        loaded = load_model(args.model, device=args.device)
        segmenter = has_segmenter(loaded.model)
        key = "segmenter" if segmenter else "classifier"
        record = segmenter_record(loaded) if segmenter else classifier_record(loaded)
        loaded.config.setdefault(key, record)  # a work dir's validation pass runs once
        options = reader_options(args)
        mask_dir = args.mask_dir or str(Path(args.out).with_suffix("")) + "_masks"
        rows = predict(loaded, args.inputs, manifest=args.manifest, batch_size=args.batch_size, limit=args.limit,
                       data_root=args.data_root, allow_outside_root=args.allow_outside_root,
                       reader_options=options, thresholds=thresholds, mask_dir=mask_dir, whole_scan=args.whole_scan)
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    fields = mask_fields(record["labels"]) if segmenter else prediction_fields(record)
    atomic_write_text(out, rows_csv(rows, ["path", "study_id", "view", *fields, "error"]))
    if record.get("thresholds") is not None:
        record["thresholds"] = [thresholds.get(label, value) for label, value in zip(record["labels"],
                                                                                      record["thresholds"])]
    n_failed = sum(bool(row["error"]) for row in rows)
    sidecar = {"model": loaded.source, key: record, "threshold_overrides": thresholds,
               **({"mask_dir": mask_dir, "whole_scan": args.whole_scan} if segmenter else {}),
               "preprocess": loaded.preprocess.kind, "reader_options": options, "mmvl_version": mmvl.__version__,
               "n_inputs": len(rows), "n_failed": n_failed}
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    for row in [r for r in rows if r["error"]][:8]:
        print(f"{Path(row['path']).name[:27]:<28}error: {row['error']}")
    print(f"wrote {out} and {out.with_suffix('.json')} ({n_failed} of {len(rows)} failed)")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
