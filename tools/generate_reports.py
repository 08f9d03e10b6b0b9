"""Write reports for scans with a trained report-generation model.

    python tools/generate_reports.py MODEL INPUT... --out reports.jsonl
        [--manifest test.jsonl] [--method beam|greedy] [--num-beams 4] [--length-penalty 1.0]
        [--no-repeat-ngram-size 0] [--max-length N] [--batch-size 16] [--device cpu] [--limit N]

MODEL is a training work dir, a checkpoint file or a model-zoo entry (folder or name).
INPUT may be files or folders, searched recursively (``mmvl.data.inputs.find_inputs``): 2D models take
DICOM/PNG/JPEG files, 3D models NIfTI files and DICOM series folders; other files get an error line.
Preprocessing is rebuilt from the model's recorded spec; --allow-gaps (interpolate the missing slices of a DICOM
series) and --reader-option KEY=VALUE override its reader's options. One JSON line per input: ``path``, ``study_id``
(manifest rows), and ``report`` or ``error``;
the exit code is 1 if any input failed, 2 on bad arguments. A ``.json`` sidecar beside ``--out`` records the
model, the settings asked for ("requested") and the search that ran ("decoding"). Manifest images must lie inside
the data root the model was trained with (its data.root; none recorded: the manifest's folder) unless --data-root
or --allow-outside-root says otherwise. With a manifest that has reports and/or labels, BLEU-1..4 and ROUGE-L
against the reports (the sections the model was trained on) and finding F1 from the report labeller
(mmvl.evaluation.labeller) against the labels, beside the majority-class and always-present baselines, are printed
and stored in the sidecar.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import mmvl
from mmvl.data.inputs import (
    add_reader_arguments,
    find_inputs,
    iter_batches,
    manifest_items,
    reader_options,
    with_reader_options,
)
from mmvl.data.manifest import add_root_arguments, root_options
from mmvl.errors import ConfigError, MMVLError
from mmvl.evaluation.report_metrics import finding_f1, report_metrics
from mmvl.evaluation.studies import first_of_each
from mmvl.utils import atomic_write_text, setup_logging
from mmvl.zoo import load_pretrained


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="training work dir, checkpoint file, or model-zoo entry (folder or name)")
    parser.add_argument("inputs", nargs="*", help="image files or folders (3D: volume files or series folders)")
    parser.add_argument("--manifest", help="also run over the rows of a manifest (JSONL/CSV); with reports/labels "
                                           "the generated reports are scored")
    add_root_arguments(parser)
    add_reader_arguments(parser)
    parser.add_argument("--out", default="reports.jsonl", help="output JSONL (a .json sidecar is written beside it)")
    parser.add_argument("--method", default="beam", choices=["beam", "greedy"])
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam ranking: sum log p / length**penalty (> 0 favours longer reports)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="ban repeating any n-gram of this size (0: off, the default; reports repeat 'there is "
                        "no' on purpose)")
    parser.add_argument("--max-length", type=int, help="tokens including BOS/EOS (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N inputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("num_beams", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.no_repeat_ngram_size < 0:
        parser.error("--no-repeat-ngram-size must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        loaded = load_pretrained(args.model, device=args.device)
        head = loaded.model.report_head
        max_length = head.max_length if args.max_length is None else args.max_length
        if not 2 <= max_length <= head.max_length:
            raise ConfigError(f"--max-length must be in [2, {head.max_length}] for this model, got {max_length}")
        preprocess = with_reader_options(loaded.preprocess, reader_options(args))  # --allow-gaps...
        items = find_inputs(args.inputs, volumes=preprocess.kind == "3d")
        if args.manifest:
            sections = loaded.config["data"].get("report_sections", ("findings", "impression"))
            # the data root the model was trained with, unless --data-root / --allow-outside-root say otherwise
            # one report per study, from its first frontal view
            items += first_of_each(manifest_items(args.manifest, sections=sections,
                                                  **root_options(args, loaded.config, source=loaded.source)))
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        items = items[: args.limit]
    if not items:
        print("error: no inputs (give files, folders or --manifest)", file=sys.stderr)
        return 2

    model = loaded.model
    decoding: dict[str, Any] | None = None  # what the head reports it ran (a one-beam "beam" is greedy search)
    settings = dict(method=args.method, num_beams=args.num_beams, length_penalty=args.length_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size, max_length=max_length)
    rows: list[dict[str, Any]] = []
    for batch in iter_batches(preprocess, items, args.batch_size, args.device, desc="reports"):
        if batch.images is not None:
            kept = [batch.rows[index] for index in batch.loaded]
            try:
                with torch.no_grad():
                    generated = head.generate(model.image_encoder(batch.images), **settings)
            except (RuntimeError, ValueError) as err:  # e.g. a volume of another size than the model's
                for row in kept:
                    row["error"] = f"generation failed: {err}"
            else:
                decoding = generated.decoding
                for row, text, ids in zip(kept, generated.texts, generated.token_ids):
                    row.update(report=text, n_tokens=len(ids))
        for row in batch.rows:  # JSONL rows: study_id only from manifests, error only on failure
            rows.append({key: value for key, value in row.items() if value != "" or key not in ("study_id", "error")})

    out = Path(args.out)
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    n_failed = sum("error" in row for row in rows)
    sidecar: dict[str, Any] = {"model": loaded.source, "mmvl_version": mmvl.__version__, "requested": settings,
                               "decoding": decoding,
                               "reader_options": reader_options(args),
                               "n_inputs": len(rows), "n_failed": n_failed}
    scores = _score(rows, items)
    if scores:
        sidecar["metrics"] = scores
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    _print_summary(rows, scores)
    print(f"wrote {out} and {out.with_suffix('.json')} ({n_failed} of {len(rows)} failed)")
    return 1 if n_failed else 0


def _score(rows: list[dict[str, Any]], items: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics over the inputs that have a generated report and a reference and/or labels."""
    scored = [(row, item) for row, item in zip(rows, items) if "report" in row]
    with_text = [(row["report"], item.reference) for row, item in scored if item.reference]
    with_labels = [(row["report"], item.labels) for row, item in scored if item.labels]
    out: dict[str, Any] = {}
    if with_text:
        text_scores = report_metrics([h for h, _ in with_text], [r for _, r in with_text])
        out.update({"n_with_reference": text_scores.pop("n"), **text_scores})
    if with_labels:
        findings = finding_f1([h for h, _ in with_labels], [labels for _, labels in with_labels])
        if findings["labels"]:
            out["n_with_labels"] = len(with_labels)
            out["findings"] = findings
    return out


def _print_summary(rows: list[dict[str, Any]], scores: dict[str, Any]) -> None:
    for row in [r for r in rows if "report" in r][:3]:
        print(f"\n{Path(row['path']).name}: {row['report']}")
    if "bleu4" in scores:
        print(f"\nagainst {scores['n_with_reference']} reference reports: "
              + ", ".join(f"BLEU-{n} {scores[f'bleu{n}']:.3f}" for n in range(1, 5))
              + f", ROUGE-L {scores['rouge_l']:.3f}")
    findings = scores.get("findings")
    if findings and findings["unreadable"]:
        print(f"\nlabels the report labeller cannot read (no finding F1): {', '.join(findings['unreadable'])}")
    if findings and findings["findings"]:
        columns = [findings["model"], findings["majority_baseline"], findings["all_positive_baseline"]]
        width = max(len("micro"), *(len(name) for name in findings["findings"]))
        print(f"\nfinding F1 from the report labeller ({scores['n_with_labels']} studies):")
        print(f"  {'':<{width}}  model  majority class  always present  positives")
        for name in findings["findings"]:
            row = [column["per_finding"][name] for column in columns]
            print(f"  {name:<{width}}  {row[0]['f1']:.3f}  {row[1]['f1']:14.3f}  {row[2]['f1']:14.3f}  "
                  f"{row[0]['support']}/{row[0]['n']}")
        micro = [column["micro"]["f1"] for column in columns]
        print(f"  {'micro':<{width}}  {micro[0]:.3f}  {micro[1]:14.3f}  {micro[2]:14.3f}")

if __name__ == "__main__":
    sys.exit(main())
