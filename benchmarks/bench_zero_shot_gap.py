"""Where does a trained model lose a finding zero-shot: in the prompts, the text tower or the image tower? Five
AUROCs per label on a held-out split of a labelled manifest, from one pass of the model over its images and reports.

``python benchmarks/bench_zero_shot_gap.py WORK_DIR --manifest M [--split val] [--preset ctrate]``

- ``image_zero_shot``: images against the prompts (what ``tools/evaluate.py --task zero_shot`` scores);
- ``text_zero_shot``: the split's own reports (the sections the model was trained on) against the same prompts;
  low here means the prompts do not point where the text tower puts the reports of that label;
- ``image_report_prototype``: images against the mean embedding of the training reports with and without the
  label, prompts aside; low here and in the linear probe below means the image tower has not learnt the finding,
  below 0.5 that it has learnt it pointing the wrong way (e.g. darker lungs read as "normal" when only the
  denser findings were learnt);
- ``image_linear_probe`` / ``text_linear_probe``: a logistic regression on the frozen image / report embeddings of
  the training split, scored on the split: what each tower's embedding holds about the label at all.

Prints a table and one JSON line ``{"bench": "zero_shot_gap", ...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmvl.data.reports import report_text  # noqa: E402
from mmvl.evaluation.zero_shot import auroc, prompts_from, text_prototypes  # noqa: E402

COLUMNS = ("image_zero_shot", "text_zero_shot", "image_report_prototype", "image_linear_probe", "text_linear_probe")


def _first_image(row: dict) -> str:
    return row["image"][0] if isinstance(row["image"], list) else row["image"]


@torch.no_grad()
def embed(model: Any, rows: Sequence[dict], root: Path, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image, report)`` embeddings of ``rows``: images through the model's preprocessing, reports
    cut to the sections it was trained on."""
    sections = (model.config.get("data") or {}).get("report_sections", ("findings", "impression"))
    images, texts = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = torch.stack([torch.as_tensor(model.preprocess(str(root / _first_image(row)))["image"])
                             for row in chunk])
        images.append(model.encode_image(batch).float())
        texts.append(model.encode_text([report_text(row["report"], sections) for row in chunk]).float())
    return torch.cat(images), torch.cat(texts)


def probe_auroc(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """AUROC on ``(x, y)`` of an L2 logistic regression fitted on the training embeddings (NaN if a class is
    missing from either side)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(train_y.tolist())) < 2 or len(set(y.tolist())) < 2:
        return float("nan")
    return auroc(LogisticRegression(max_iter=2000).fit(train_x, train_y).decision_function(x), y)


def zero_shot_gap(model: Any, rows: Sequence[dict], root: Path, labels: Sequence[str], preset: Any = "ctrate",
                  train_split: str = "train", split: str = "val") -> dict[str, dict[str, float]]:
    """``{label: {column: AUROC}}`` (see the module docstring) for the rows of ``split``, prototypes and probes
    fitted on the rows of ``train_split``."""
    train = [row for row in rows if row.get("split") == train_split]
    held_out = [row for row in rows if row.get("split") == split]
    if not train or not held_out:
        raise ValueError(f"need rows of both splits '{train_split}' ({len(train)}) and '{split}' ({len(held_out)})")
    train_image, train_text = embed(model, train, root)
    image, text = embed(model, held_out, root)
    positive, negative = text_prototypes(model, prompts_from(labels, preset))
    table = {}
    for index, label in enumerate(labels):
        train_y = np.array([int(row["labels"][label] == 1) for row in train])
        y = np.array([int(row["labels"][label] == 1) for row in held_out])
        direction = positive[index] - negative[index]
        prototypes = [train_text[torch.from_numpy(train_y == value)].mean(0) for value in (1, 0)]
        report_direction = torch.nn.functional.normalize(prototypes[0], dim=0) - torch.nn.functional.normalize(
            prototypes[1], dim=0)
        scores = {
            "image_zero_shot": auroc((image @ direction).numpy(), y),
            "text_zero_shot": auroc((text @ direction).numpy(), y),
            "image_report_prototype": auroc((image @ report_direction).numpy(), y),
            "image_linear_probe": probe_auroc(train_image.numpy(), train_y, image.numpy(), y),
            "text_linear_probe": probe_auroc(train_text.numpy(), train_y, text.numpy(), y),
        }
        table[label] = {"positives": int(y.sum()), **{name: round(float(value), 3) for name, value in scores.items()}}
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="training work dir, checkpoint or zoo entry")
    parser.add_argument("--manifest", required=True, help="JSONL manifest with labels, reports and splits")
    parser.add_argument("--split", default="val", help="held-out split scored (default: %(default)s)")
    parser.add_argument("--train-split", default="train", help="split of the prototypes and probes")
    parser.add_argument("--preset", default="ctrate", help="prompt preset or prompt file (default: %(default)s)")
    parser.add_argument("--labels", help="comma-separated labels (default: the manifest's)")
    args = parser.parse_args(argv)

    from mmvl.loading import load_model

    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    manifest = Path(args.manifest)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [row for row in rows if row.get("labels")]
    labels = args.labels.split(",") if args.labels else list(rows[0]["labels"])
    start = time.perf_counter()
    table = zero_shot_gap(model, rows, manifest.parent, labels, args.preset, args.train_split, args.split)
    seconds = time.perf_counter() - start
    print(f"{args.model} on the '{args.split}' rows of {manifest} ({seconds:.0f} s)")
    print(f"{'label':20s} {'pos':>4s} " + " ".join(f"{name:>22s}" for name in COLUMNS))
    for label, entry in table.items():
        print(f"{label:20s} {entry['positives']:4d} " + " ".join(f"{entry[name]:22.2f}" for name in COLUMNS))
    record = {"bench": "zero_shot_gap", "model": str(args.model), "manifest": str(manifest), "split": args.split,
              "train_split": args.train_split, "preset": str(args.preset), "seconds": round(seconds, 1),
              "table": table, "python": platform.python_version()}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
