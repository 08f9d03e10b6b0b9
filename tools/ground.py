"""Where is it? Grounding heatmaps of phrases on scans.

    python tools/ground.py MODEL SCAN... --phrase "right pleural effusion" [--phrase "nodule" ...]
        [--method similarity|gradcam] [--out-dir heatmaps] [--batch-size 8] [--device cpu]
        [--allow-gaps] [--reader-option KEY=VALUE ...]

MODEL is a training work dir, a checkpoint file or a model-zoo entry (folder or name); SCAN files or folders, found
as tools/zero_shot.py finds them (2D: DICOM, PNG, JPEG, TIFF; 3D: NIfTI files and DICOM series folders). For each
scan and phrase it writes ``<scan>_<phrase>.png``: the scan with the map as a colour overlay, a colour bar and the
image-phrase similarity in the title (2D), or a montage of the axial slices where the map peaks (3D) together with
``<scan>_<phrase>.nii.gz``, the map in the scan's geometry (its affine is the scan's).

--method similarity (default): each patch token projected into the joint image-text space, cosine with the
phrase's embedding (a local-alignment head's own patch similarity where the model has one); gradcam: Grad-CAM on
the image-phrase similarity, for models trained without local alignment. Exit code: 0 every scan mapped, 1 some
could not be read (listed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmvl.data.inputs import add_reader_arguments, reader_options, with_reader_options
from mmvl.errors import ConfigError, MMVLError
from mmvl.evaluation.grounding import METHODS, build_texts, grounding_items, iter_heatmaps
from mmvl.evaluation.overlays import write_heatmaps
from mmvl.loading import load_model
from mmvl.utils import setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="training work dir, checkpoint file, or model-zoo entry (folder or name)")
    parser.add_argument("inputs", nargs="+", help="scan files or folders")
    parser.add_argument("--phrase", action="append", required=True, help="a phrase to ground; repeatable")
    parser.add_argument("--method", default="similarity", choices=METHODS)
    parser.add_argument("--out-dir", default="heatmaps", help="folder for the PNGs (and NIfTI maps of volumes)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_reader_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not all(phrase.strip() for phrase in args.phrase):
        parser.error("--phrase must not be empty")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        loaded = load_model(args.model, device=args.device)
        if loaded.preprocess is None:
            raise ConfigError(f"{loaded.source}: this model has no image preprocessing (a text-only model)")
        loaded.preprocess = with_reader_options(loaded.preprocess, reader_options(args))
        items = grounding_items(loaded, args.inputs)
        texts = build_texts(loaded.model, [phrase.strip() for phrase in args.phrase])
        taken: set[str] = set()
        n_failed = n_files = 0
        for result in iter_heatmaps(loaded, items, texts, method=args.method, batch_size=args.batch_size):
            if result.error:
                n_failed += 1
                print(f"{result.path}: error: {result.error}")
                continue
            written = write_heatmaps(result, args.out_dir, taken=taken)
            n_files += len(written)
            scores = ", ".join(f"{name} {value:.3f}" for name, value in result.similarity.items())
            print(f"{result.path}: similarity {scores} -> {', '.join(path.name for path in written)}")
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n_files} files in {Path(args.out_dir)} ({n_failed} of {len(items)} scans failed)")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
