"""Can a model see each labelled finding at a config's input resolution? Two image-only probes on the volumes (or
images) exactly as the config's eval preprocessing gives them, scored by 5-fold cross-validated AUROC per label.

``python benchmarks/bench_findings_visible.py --config configs/demo/ct_clip_tiny.py --manifest M`` preprocesses every
row of ``M`` (all splits) and fits, per label, a logistic regression on (1) the voxels average-pooled by ``--pool``
(position-bound: what sits where), (2) intensity histograms of the whole input and of its halves along each axis
(position-free: how much of each density there is) and (3) a joint histogram of each voxel's value against the mean
of its ``--neighbourhood``^3 surroundings (position-free and local: how much of each density sits in what
surroundings, e.g. soft tissue inside aerated lung, which is how a few-voxel nodule shows). A finding that no probe
separates (AUROC near 0.5) is unlikely to be learnt from the images by a small model at that resolution, whatever the
reports say. Prints a table and one JSON line ``{"bench": "findings_visible", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmvl.config import Config  # noqa: E402
from mmvl.config.validate import validate_config  # noqa: E402
from mmvl.data.transforms import Pipeline  # noqa: E402

HISTOGRAM_BINS = 32
JOINT_BINS = 8  # per axis of the voxel-against-surroundings histogram
JOINT_RANGE = (-2.0, 2.0)  # in normalised units: the CT demo's -1000...1000 HU after Normalize(0.5, 0.25)


def features(image: np.ndarray, pool: int, neighbourhood: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pooled voxels, histograms, voxel-against-surroundings histogram)`` of one preprocessed ``(C, *spatial)``
    input."""
    import torch

    tensor = torch.as_tensor(image, dtype=torch.float32)[None]
    functional = torch.nn.functional
    pooled = (functional.avg_pool3d if tensor.ndim == 5 else functional.avg_pool2d)(tensor, pool)
    surroundings = (functional.avg_pool3d if tensor.ndim == 5 else functional.avg_pool2d)(
        tensor, neighbourhood, 1, neighbourhood // 2, count_include_pad=False)
    joint = np.histogram2d(image[0].ravel(), surroundings[0, 0].numpy().ravel(), bins=JOINT_BINS,
                           range=[JOINT_RANGE, JOINT_RANGE])[0]
    values = image[0]
    edges = np.linspace(float(values.min()), float(values.max()) + 1e-6, HISTOGRAM_BINS + 1)
    parts = [values]
    for axis in range(values.ndim):
        half = values.shape[axis] // 2
        parts += [np.take(values, range(half), axis), np.take(values, range(half, values.shape[axis]), axis)]
    histograms = np.concatenate([np.histogram(part, edges)[0] / part.size for part in parts])
    return pooled.flatten().numpy(), histograms, np.log1p(joint.ravel())  # log: counts span 1 to 10^5


def probe_auroc(x: np.ndarray, y: np.ndarray, standardize: bool, seed: int) -> float:
    """5-fold cross-validated AUROC of an L2 logistic regression (NaN with fewer than 5 of either class)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if min(y.sum(), len(y) - y.sum()) < 5:
        return float("nan")
    # many more pooled voxels than rows: liblinear's dual solver; histograms: a few hundred standardized columns
    model = (make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)) if standardize
             else LogisticRegression(C=0.01, solver="liblinear", dual=True, max_iter=500))
    scores = cross_val_predict(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                               method="decision_function")
    return float(roc_auc_score(y, scores))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config whose data.eval_pipeline is used")
    parser.add_argument("--manifest", required=True, help="JSONL manifest with labels (every row is used)")
    parser.add_argument("--pool", type=int, default=2, help="average-pooling factor of the voxel probe")
    parser.add_argument("--neighbourhood", type=int, default=7,
                        help="side (voxels) of the surroundings averaged for the joint-histogram probe")
    parser.add_argument("--limit", type=int, help="only the first N rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = Config.fromfile(args.config)
    cfg.merge_options([f"data.manifest={args.manifest}"])
    pipeline = Pipeline(validate_config(cfg)["data"]["eval_pipeline"])
    manifest = Path(args.manifest)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [row for row in rows if row.get("labels")][: args.limit]
    start = time.perf_counter()
    pooled, histograms, joints = [], [], []
    for row in rows:
        image = row["image"][0] if isinstance(row["image"], list) else row["image"]
        array = np.asarray(pipeline(manifest.parent / image)["image"])
        voxels, counts, joint = features(array, args.pool, args.neighbourhood)
        pooled.append(voxels)
        histograms.append(counts)
        joints.append(joint)
    seconds = time.perf_counter() - start
    table = {}
    for label in rows[0]["labels"]:
        y = np.array([int(row["labels"][label] == 1) for row in rows])
        table[label] = {"positives": int(y.sum()),
                        "voxel_auroc": round(probe_auroc(np.stack(pooled), y, False, args.seed), 3),
                        "histogram_auroc": round(probe_auroc(np.stack(histograms), y, True, args.seed), 3),
                        "surroundings_auroc": round(probe_auroc(np.stack(joints), y, True, args.seed), 3)}
    print(f"{len(rows)} inputs preprocessed by {args.config} in {seconds:.0f} s ({os.cpu_count()} CPUs)")
    print(f"{'label':20s} {'positives':>9s} {'voxels':>7s} {'histograms':>10s} {'surroundings':>12s}")
    for label, row in table.items():
        print(f"{label:20s} {row['positives']:9d} {row['voxel_auroc']:7.2f} {row['histogram_auroc']:10.2f} "
              f"{row['surroundings_auroc']:12.2f}")
    record = {"bench": "findings_visible", "config": str(args.config), "manifest": str(args.manifest),
              "n": len(rows), "pool": args.pool, "neighbourhood": args.neighbourhood, "input_shape": list(array.shape),
              "preprocess_s": round(seconds, 1), "table": table, "python": platform.python_version()}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
