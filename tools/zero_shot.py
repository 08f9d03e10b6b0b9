"""Zero-shot classification of scans from label names.

    python tools/zero_shot.py WORK_DIR_OR_CHECKPOINT INPUT... --labels "pleural effusion,pneumothorax"
        [--preset chexzero|ctclip|ensemble|prompts.json] [--mode pairwise|multiclass] [--out preds.csv]
    python tools/zero_shot.py WORK_DIR --manifest test.jsonl --labels ...

INPUT may be files or folders (searched recursively for DICOM/PNG/JPEG). Preprocessing is rebuilt from
the model's recorded spec. A file that cannot be read gets a row with an ``error``; the exit code is 1
if any failed. When a manifest with labels is given, per-label AUROC is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import mmvl
from mmvl.data.dicom import is_dicom_file
from mmvl.data.io import RASTER_SUFFIXES
from mmvl.data.manifest import load_manifest
from mmvl.errors import DataError, MMVLError
from mmvl.evaluation.zero_shot import PRESETS, auroc, build_prompts, text_prototypes, zero_shot_probabilities
from mmvl.utils import atomic_write_text
from mmvl.zoo import load_pretrained


def find_inputs(inputs: list[str]) -> list[dict[str, Any]]:
    items = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in RASTER_SUFFIXES or is_dicom_file(file):
                    items.append({"path": str(file)})
        else:
            items.append({"path": str(path)})  # missing files become error rows
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="training work dir or checkpoint file")
    parser.add_argument("inputs", nargs="*", help="image files or folders")
    parser.add_argument("--manifest", help="run over the rows of a manifest (JSONL/CSV) instead of / as well as INPUT")
    parser.add_argument("--labels", required=True, help="comma-separated label names")
    parser.add_argument("--preset", default="chexzero",
                        help=f"prompt preset ({', '.join(PRESETS)}) or a JSON prompt file")
    parser.add_argument("--mode", default="pairwise", choices=["pairwise", "multiclass"])
    parser.add_argument("--out", default="zero_shot.csv", help="output CSV (a .json sidecar is written beside it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N inputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    try:
        loaded = load_pretrained(args.model, device=args.device)
        preset: Any = args.preset
        if os.path.isfile(preset):
            with open(preset) as handle:
                preset = json.load(handle)
        prompts = build_prompts(labels, preset)
        items = find_inputs(args.inputs)
        if args.manifest:
            items += [{"path": row["image"][0], "study_id": row.get("study_id"), "labels": row.get("labels")}
                      for row in load_manifest(args.manifest)]
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        items = items[: args.limit]
    if not items:
        print("error: no inputs (give files, folders or --manifest)", file=sys.stderr)
        return 2

    model = loaded.model
    positive, negative = text_prototypes(model, prompts)
    scale = float(model.contrastive_head.scale().detach())
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(items), args.batch_size), desc="zero-shot", unit="batch"):
        chunk = items[start:start + args.batch_size]
        images, kept = [], []
        for item in chunk:
            row = {"path": item["path"], "study_id": item.get("study_id") or "", "error": ""}
            try:
                images.append(torch.from_numpy(loaded.preprocess(item["path"])["image"]))
                kept.append(row)
            except DataError as err:
                row["error"] = err.problem
            rows.append(row)
        if images:
            with torch.no_grad():
                emb = model.encode_image(torch.stack(images).to(args.device))
            probs = zero_shot_probabilities(emb, positive, negative, scale, args.mode)
            for row, p in zip(kept, probs.tolist()):
                row.update({label: round(value, 6) for label, value in zip(labels, p)})

    out = Path(args.out)
    fields = ["path", "study_id", *labels, "error"]
    atomic_write_text(out, _csv_text(rows, fields))
    sidecar = {"model": loaded.source, "preset": args.preset, "mode": args.mode, "labels": labels,
               "prompts": prompts, "logit_scale": scale, "mmvl_version": mmvl.__version__,
               "n_inputs": len(rows), "n_failed": sum(bool(r["error"]) for r in rows)}
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    _print_summary(rows, items, labels)
    print(f"wrote {out} and {out.with_suffix('.json')} ({sidecar['n_failed']} of {len(rows)} failed)")
    return 1 if sidecar["n_failed"] else 0


def _csv_text(rows: list[dict[str, Any]], fields: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _print_summary(rows: list[dict[str, Any]], items: list[dict[str, Any]], labels: list[str]) -> None:
    shown = [r for r in rows if not r["error"]][:8]
    width = max(len(label) for label in labels)
    print("\n" + "file".ljust(28) + "".join(label[:width].rjust(width + 2) for label in labels))
    for row in shown:
        print(Path(row["path"]).name[:27].ljust(28) + "".join(f"{row[label]:.3f}".rjust(width + 2) for label in labels))
    truth = {item["path"]: item.get("labels") for item in items if item.get("labels")}
    if truth:
        print("\nAUROC against the manifest's labels:")
        for label in labels:
            pairs = [(r[label], truth[r["path"]][label]) for r in rows
                     if not r["error"] and r["path"] in truth and label in truth[r["path"]]]
            if pairs:
                score = auroc([p for p, _ in pairs], [int(t) for _, t in pairs])
                print(f"  {label:<{width}}  {score:.3f}  (n={len(pairs)})")


if __name__ == "__main__":
    sys.exit(main())
