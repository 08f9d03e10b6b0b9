"""Evaluate a trained model on a split of a labelled manifest: zero-shot classification, image-text retrieval,
linear probes on frozen image features, generated reports, or grounding heatmaps.

    python tools/evaluate.py MODEL [MODEL ...] --manifest FILE --task zero_shot|retrieval|linear_probe|report|grounding
        [--split test] [--val-split val] [--train-split train] [--labels "a,b"] [--preset chexzero]
        [--mode pairwise|multiclass] [--out metrics.json] [--plots DIR] [--batch-size 32] [--device cpu]
        [--n-bootstrap 1000] [--seed 0] [--limit N] [--method beam|greedy] [--num-beams 4] [--max-length N]
        [--no-repeat-ngram-size 0] [--tokenizer auto|ptb|simple] [--ce-uncertain positive|negative]
        [--heatmap-method similarity|gradcam] [--threshold 0.5]

MODEL is a training work dir, a checkpoint file or a model-zoo entry (folder or name); images go through the
model's recorded preprocessing, and must lie inside the data root it was trained with (its data.root; none
recorded: the manifest's folder) unless --data-root or --allow-outside-root says otherwise. --allow-gaps
(interpolate the missing slices of a DICOM series) and --reader-option KEY=VALUE override the recorded reader's
options.

zero_shot     per-label AUROC and F1 of the zero-shot probabilities (prompt preset and mode as tools/zero_shot.py),
              F1 at the threshold that maximises it on --val-split (0.5 where there are no validation rows)
linear_probe  logistic regression per label on the image encoder's pooled features of 1%, 10% and 100% of the
              --train-split rows, scored on --split like zero_shot
retrieval     image-to-report and report-to-image Recall@1/5/10 among the split's studies
report        reports written by the model's report head (beam search, 4 beams), scored against the split's
              reports with BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), clinical efficacy (CE: precision,
              recall, F1 of the 14 CheXpert observations and the common 5, read by mmvl's report labeller in the
              generated and the reference report; uncertain counted as --ce-uncertain) and finding F1 against the
              manifest labels (every label is listed; those the labeller cannot read are named, not scored)
grounding     where the model's heatmaps (mmvl.grounding, --heatmap-method) put each finding of the rows that carry
              masks or boxes (the synthetic sets' `masks`; MS-CXR-style `boxes`/`phrases`, datasets/ms_cxr.md):
              pointing game, IoU and Dice of the map rescaled to [0, 1] and thresholded at --threshold, BioViL's
              contrast-to-noise ratio, per label against a centre prior (a Gaussian centred in the scan), with the
              paired difference (see mmvl/evaluation/grounding_metrics.py)

Several models (--task grounding; each MODEL as SOURCE or NAME=SOURCE, the first the baseline): each is evaluated
as it would be alone, --task grounding and --task zero_shot (its labels: the grounded ones the manifest labels), on
the same split, and one table compares them: per finding, pointing game and CNR of the centre prior and of every
model, and zero-shot AUROC, each with its interval, and each later model minus the baseline, paired on the same
targets (AUROC: studies) and the same bootstrap resamples of studies (mmvl/evaluation/grounding_comparison.py). The
table is printed and written beside --out with the suffix .md; the JSON holds every model's two one-model records
and the paired differences of every metric.

Labels default to the manifest's label names; unknown labels (-1) are left out per label. Intervals are percentile
bootstrap intervals over --n-bootstrap resamples of the studies (seeded). A table is printed and the JSON (--out)
holds every number with the model, manifest, split sizes, prompts, seed and mmvl version. --plots DIR writes
roc_<label>.png and calibration.png (zero_shot, linear_probe). Images that cannot be read are listed in the JSON
with their reason and the rest is evaluated. Exit code: 0 ok, 1 some images failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mmvl
from mmvl.data.inputs import (
    InputItem,
    add_reader_arguments,
    iter_batches,
    reader_options,
    row_items,
    with_reader_options,
)
from mmvl.data.manifest import add_root_arguments, load_manifest, root_options
from mmvl.errors import ConfigError, MMVLError
from mmvl.evaluation.clinical_efficacy import clinical_efficacy
from mmvl.evaluation.metrics import PROBE_FRACTIONS, classification_metrics, linear_probe, target_matrix
from mmvl.evaluation.report_metrics import TOKENIZERS, UNCERTAIN_POLICIES, caption_metrics, finding_f1
from mmvl.evaluation.retrieval import retrieval_metrics
from mmvl.evaluation.studies import AGGREGATES, aggregate, first_of_each, study_groups
from mmvl.evaluation.zero_shot import PRESETS, prompts_from, text_prototypes, zero_shot_probabilities
from mmvl.utils import atomic_write_text, setup_logging
from mmvl.zoo import load_pretrained

TASKS = ("zero_shot", "retrieval", "linear_probe", "report", "grounding")
RECALL_KS = (1, 5, 10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="+", metavar="MODEL",
                        help="training work dir, checkpoint file, or model-zoo entry (folder or name), as SOURCE or "
                        "NAME=SOURCE; several (--task grounding): compared side by side, the first as the baseline")
    parser.add_argument("--manifest", required=True, help="manifest (JSONL/CSV) with split, labels and reports")
    add_root_arguments(parser)
    add_reader_arguments(parser)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--split", default="test", help="the rows evaluated (manifest 'split')")
    parser.add_argument("--val-split", default="val", help="rows that choose F1 thresholds and probe C ('' for none)")
    parser.add_argument("--train-split", default="train", help="linear_probe: rows the probes are trained on")
    parser.add_argument("--labels", help="comma-separated label names (default: the manifest's)")
    parser.add_argument("--preset", default="chexzero",
                        help=f"zero_shot prompt preset ({', '.join(PRESETS)}) or a JSON/YAML prompt file")
    parser.add_argument("--mode", default="pairwise", choices=["pairwise", "multiclass"])
    parser.add_argument("--out", default="metrics.json", help="JSON file for the results")
    parser.add_argument("--plots", help="folder for roc_<label>.png and calibration.png (zero_shot, linear_probe)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples of studies (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the probe's training subsets")
    parser.add_argument("--limit", type=int, help="only the first N rows (studies) of each split (quick checks)")
    parser.add_argument("--study-aggregate", default="mean", choices=AGGREGATES,
                        help="a study's score from its frontal views' (all views where none is frontal)")
    parser.add_argument("--method", default="beam", choices=["beam", "greedy"], help="report: search")
    parser.add_argument("--num-beams", type=int, default=4, help="report: beams")
    parser.add_argument("--max-length", type=int, help="report: tokens including BOS/EOS (default: the model's)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="report: ban repeating any n-gram of this size (0: off, the default)")
    parser.add_argument("--tokenizer", default="auto", choices=TOKENIZERS,
                        help="report: 'auto' = pycocoevalcap's PTB tokenizer where Java runs, else 'simple'")
    parser.add_argument("--ce-uncertain", default="positive", choices=UNCERTAIN_POLICIES,
                        help="report: an observation the labeller reads as uncertain counts as present (positive, "
                        "as the CE papers do) or absent, in CE and finding F1")
    parser.add_argument("--heatmap-method", default="similarity", choices=["similarity", "gradcam"],
                        help="grounding: patch-text similarity or Grad-CAM maps")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="grounding: IoU/Dice keep the map where it is >= this, after per-scan min-max rescaling")
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_beams"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_bootstrap < 0:
        parser.error("--n-bootstrap must be >= 0")
    if args.no_repeat_ngram_size < 0:
        parser.error("--no-repeat-ngram-size must be >= 0")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.plots and args.task not in ("zero_shot", "linear_probe"):
        parser.error("--plots applies to --task zero_shot and linear_probe")
    try:
        args.models = model_specs(args.model)
    except ValueError as err:
        parser.error(str(err))
    if len(args.models) > 1 and args.task != "grounding":
        parser.error(f"several models are compared with --task grounding only, got --task {args.task}")
    return args


def model_specs(values: list[str]) -> list[tuple[str, str]]:
    """``[(name, source)]`` of the MODEL arguments, each ``SOURCE`` or ``NAME=SOURCE`` (a SOURCE that exists as a
    path is never split); a name defaults to the source's last path component."""
    specs = []
    for value in values:
        name, sep, source = value.partition("=")
        if not sep or not re.fullmatch(r"[\w.+-]+", name) or not source or Path(value).exists():
            name, source = Path(value.rstrip("/\\")).name or value, value
        specs.append((name, source))
    names = [name for name, _ in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two models named {repeated}: name them apart as NAME=SOURCE (e.g. clip=work_dirs/a)")
    return specs


# ---------------------------------------------------------------------------------------------------------
# Rows and images
# ---------------------------------------------------------------------------------------------------------


def load_splits(manifest: str, sections: Any, limit: int | None, root: str | None = None,
                allow_outside_root: bool = False) -> tuple[dict[str, list[InputItem]], list[str]]:
    """Manifest items by split, one per image of each row (a study's views; with labels, volume fields and the
    reference report of ``sections``), and the manifest's label names (sorted, as ``ManifestDataset`` orders
    them). ``limit``: the first N rows (studies) of each split."""
    rows = load_manifest(manifest, root=root, allow_outside_root=allow_outside_root)
    splits: dict[str, list[InputItem]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        split = str(row.get("split") or "")
        counts[split] = counts.get(split, 0) + 1
        if limit and counts[split] > limit:
            continue
        splits.setdefault(split, []).extend(row_items(row, sections))
    return splits, sorted({name for row in rows for name in (row.get("labels") or {})})


def split_rows(splits: dict[str, list[InputItem]], name: str, manifest: str, option: str) -> list[InputItem]:
    if name not in splits:
        found = sorted(split or "(none)" for split in splits)
        raise ConfigError(f"{manifest}: no rows with split '{name}' ({option}); splits found: {found}")
    return splits[name]


class Runner:
    """Runs images of manifest items through the model in batches and collects the ones that cannot be read."""

    def __init__(self, loaded: Any, batch_size: int, device: str):
        self.loaded, self.batch_size, self.device = loaded, batch_size, device
        self.failed: list[dict[str, str]] = []

    def run(self, items: list[InputItem], compute: Callable[[torch.Tensor], Any], split: str) -> tuple[list, list]:
        """``(outputs, indices)``: ``compute(images)`` per loaded batch, split per row, and the indices of the
        items they belong to; failed items are recorded with path and reason."""
        outputs, indices, offset = [], [], 0
        for batch in iter_batches(self.loaded.preprocess, items, self.batch_size, self.device,
                                  desc=f"{split} images"):
            if batch.images is not None:
                with torch.no_grad():
                    outputs.extend(compute(batch.images))
                indices.extend(offset + index for index in batch.loaded)
            for row in batch.rows:
                if row["error"]:
                    self.failed.append({"split": split, "path": row["path"], "study_id": row["study_id"],
                                        "reason": row["error"]})
            offset += len(batch.rows)
        return outputs, indices

    def features(self, items: list[InputItem], encode: Callable[[torch.Tensor], torch.Tensor],
                 split: str) -> tuple[np.ndarray, list[InputItem]]:
        """``(N_loaded, D)`` features and the items that loaded."""
        outputs, indices = self.run(items, lambda images: encode(images).float().cpu().numpy(), split)
        features = np.stack(outputs).astype(np.float64) if outputs else np.zeros((0, 0))
        return features, [items[i] for i in indices]


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------


def _check_labels(labels: list[str], known: list[str], manifest: str) -> None:
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ConfigError(f"{manifest}: no label named {unknown} in the manifest; its labels: {known}")
    if not labels:
        raise ConfigError(f"{manifest}: the manifest has no labels; give --labels or use --task retrieval/report")


def run_zero_shot(args: argparse.Namespace, loaded: Any, runner: Runner, test: list[InputItem],
                  val: list[InputItem], labels: list[str]) -> dict[str, Any]:
    model = loaded.model
    prompts = prompts_from(labels, args.preset)
    positive, negative = (side.float().cpu() for side in text_prototypes(model, prompts))
    scale = float(model.contrastive_head.scale().detach())
    study_ids: dict[str, list[str | None]] = {}  # per split, of the rows that loaded: the bootstrap's units

    per_image: dict[str, Any] = {}

    def probabilities(items: list[InputItem], split: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per study: the aggregate of its frontal views' probabilities (``--study-aggregate``)."""
        embeddings, kept = runner.features(items, model.encode_image, split)
        if not kept:
            study_ids[split] = []
            return None, None
        scores = zero_shot_probabilities(torch.from_numpy(embeddings), positive, negative, scale, args.mode).numpy()
        if split == args.split:
            per_image.update(n_images=len(kept), views_scored=sorted({item.view or "?" for item in kept}),
                             metrics=classification_metrics(scores, target_matrix([i.labels for i in kept], labels),
                                                            labels, n_bootstrap=0))
        groups = study_groups(kept)
        study_ids[split] = [kept[g[0]].study_id for g in groups]
        return aggregate(scores, groups, args.study_aggregate), target_matrix([kept[g[0]].labels for g in groups],
                                                                              labels)

    scores, targets = probabilities(test, args.split)
    _require_rows(scores, args.split)
    val_scores, val_targets = probabilities(val, args.val_split) if val else (None, None)
    metrics = classification_metrics(scores, targets, labels, val_scores, val_targets, args.n_bootstrap, args.seed,
                                     study_ids=study_ids[args.split])
    metrics["per_image"] = per_image  # every image scored alone, without intervals
    return {"info": {"preset": str(args.preset), "mode": args.mode, "prompts": prompts, "logit_scale": scale,
                     "embedding": "model.encode_image (the shared image-text space)",
                     "unit": f"study: the {args.study_aggregate} of its frontal views' probabilities (all its views "
                             "where none is frontal)"},
            "metrics": metrics, "plot": (scores, targets, labels, metrics, "zero-shot"),
            "study_ids": study_ids[args.split]}


def run_linear_probe(args: argparse.Namespace, loaded: Any, runner: Runner, test: list[InputItem],
                     val: list[InputItem], train: list[InputItem], labels: list[str]) -> dict[str, Any]:
    # The image encoder's pooled output, not encode_image: it exists for every model (MAE and report models have
    # no contrastive projection), and CLIP's own linear probes read the features before the projection.
    def pooled(images: torch.Tensor) -> torch.Tensor:
        return loaded.model.image_encoder(images).pooled

    sets, study_ids = {}, {}
    for name, items in ((args.train_split, train), (args.split, test), (args.val_split, val)):
        features, kept = runner.features(items, pooled, name) if items else (np.zeros((0, 0)), [])
        groups = study_groups(kept)  # one feature vector per study: the mean of its frontal views'
        features = aggregate(features, groups, "mean") if groups else features
        sets[name] = (features, target_matrix([kept[g[0]].labels for g in groups], labels))
        study_ids[name] = [kept[g[0]].study_id for g in groups]
    train_features, train_targets = sets[args.train_split]
    test_features, test_targets = sets[args.split]
    val_features, val_targets = sets[args.val_split] if val else (None, None)
    _require_rows(test_features, args.split)
    _require_rows(train_features, args.train_split)
    probe = linear_probe(train_features, train_targets, test_features, test_targets, labels, val_features,
                         val_targets, fractions=PROBE_FRACTIONS, seed=args.seed, n_bootstrap=args.n_bootstrap,
                         test_study_ids=study_ids[args.split])
    full = probe["fractions"][f"{max(PROBE_FRACTIONS):g}"]
    plot = None
    if "metrics" in full:
        names = list(full["metrics"]["labels"])
        columns = [labels.index(name) for name in names]
        plot = (full["test_scores"][:, columns], test_targets[:, columns], names, full["metrics"],
                f"linear probe {max(PROBE_FRACTIONS):.0%}")
    for entry in probe["fractions"].values():
        del entry["test_scores"]
    return {"info": {"features": "image_encoder(images).pooled (before any projection head)",
                     "feature_dim": int(train_features.shape[1])},
            "metrics": probe, "plot": plot}


def run_retrieval(args: argparse.Namespace, loaded: Any, runner: Runner, test: list[InputItem]) -> dict[str, Any]:
    model = loaded.model
    with_report = [item for item in test if item.reference]
    images, kept = runner.features(with_report, model.encode_image, args.split)
    _require_rows(images, args.split)
    groups = study_groups(kept)  # one image embedding per study: its frontal views' mean, re-normalised
    images = aggregate(images, groups, "mean")
    images = images / np.linalg.norm(images, axis=1, keepdims=True).clip(min=1e-12)
    texts = [kept[g[0]].reference for g in groups]
    with torch.no_grad():
        text_emb = torch.cat([model.encode_text(texts[i:i + args.batch_size]).float().cpu()
                              for i in range(0, len(texts), args.batch_size)])
    metrics = retrieval_metrics(torch.from_numpy(images).float(), text_emb, ks=RECALL_KS, texts=texts)
    metrics.update(n=len(groups), n_images=len(kept), n_without_report=len(test) - len(with_report))
    return {"info": {"text": "the manifest reports (sections the model was trained on)",
                     "unit": "study: the mean of its frontal views' embeddings"}, "metrics": metrics}


def run_report(args: argparse.Namespace, loaded: Any, runner: Runner, test: list[InputItem]) -> dict[str, Any]:
    model = loaded.model
    head = model.report_head
    max_length = head.max_length if args.max_length is None else args.max_length
    if not 2 <= max_length <= head.max_length:
        raise ConfigError(f"--max-length must be in [2, {head.max_length}] for this model, got {max_length}")
    settings = dict(method=args.method, num_beams=args.num_beams, max_length=max_length,
                    no_repeat_ngram_size=args.no_repeat_ngram_size)
    with_report = first_of_each([item for item in test if item.reference])  # a study's first frontal view
    decoding: dict[str, Any] = {}  # the search that ran (a one-beam "beam" is greedy search)

    def generate(images: torch.Tensor) -> list[str]:
        generated = head.generate(model.image_encoder(images), **settings)
        decoding.update(generated.decoding)
        return generated.texts

    texts, indices = runner.run(with_report, generate, args.split)
    _require_rows(texts, args.split)
    kept = [with_report[i] for i in indices]
    references = [item.reference for item in kept]
    metrics = caption_metrics(texts, references, tokenizer=args.tokenizer)
    metrics["clinical_efficacy"] = clinical_efficacy(texts, references, uncertain=args.ce_uncertain,
                                                     study_ids=[item.study_id for item in kept],
                                                     n_bootstrap=args.n_bootstrap, seed=args.seed)
    labelled = [(text, item.labels) for text, item in zip(texts, kept) if item.labels]
    if labelled:
        findings = finding_f1([text for text, _ in labelled], [labels for _, labels in labelled],
                              uncertain=args.ce_uncertain)
        if findings["labels"]:
            metrics["findings"] = findings
    metrics["n_without_report"] = len(test) - len(with_report)
    examples = [{"study_id": item.study_id, "generated": text, "reference": item.reference}
                for text, item in list(zip(texts, kept))[:5]]
    return {"info": {"generation": settings, "decoding": decoding}, "metrics": metrics, "examples": examples}


def run_grounding(args: argparse.Namespace, loaded: Any, runner: Runner) -> dict[str, Any]:
    from mmvl.evaluation.grounding_metrics import definitions, grounding_records, summarise_records

    rows = [row for row in load_manifest(args.manifest, **root_options(args, loaded.config, source=loaded.source))
            if str(row.get("split") or "") == args.split][:args.limit]
    found = sorted({label for row in rows for key in ("masks", "boxes") for label in (row.get(key) or {})})
    if not found:
        raise ConfigError(f"{args.manifest}: no row of split '{args.split}' has 'masks' or 'boxes' to ground "
                          "(datasets/synthetic.py writes masks; MS-CXR's layout: datasets/ms_cxr.md)")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else found
    prompts = prompts_from(labels, args.preset)
    records, failed = grounding_records(loaded, rows, Path(args.manifest).parent, prompts, args.heatmap_method,
                                        args.threshold, args.batch_size, args.device)
    metrics = summarise_records(records, args.n_bootstrap, args.seed)
    runner.failed.extend({"split": args.split, **entry} for entry in failed)
    if not metrics["n_targets"]:
        raise NoRows(f"no finding of split '{args.split}' could be scored (see 'failed' in the JSON)")
    return {"info": {"labels": labels, "preset": str(args.preset), "prompts": prompts, "method": args.heatmap_method,
                     "threshold": args.threshold, "definitions": definitions(args.threshold)}, "metrics": metrics,
            "records": records}


def _require_rows(rows: Any, split: str) -> None:
    if rows is None or not len(rows):
        raise NoRows(f"no image of split '{split}' could be evaluated (see 'failed' in the JSON)")


class NoRows(Exception):
    """Every image of a split needed for the task failed."""


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _ci(entry: dict[str, Any], key: str) -> str:
    ci = entry.get(f"{key}_ci")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " " * 14


def _value(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def print_classification(metrics: dict[str, Any], title: str) -> None:
    macro, micro = metrics["macro"], metrics["micro"]
    macro_name = f"macro ({len(macro['labels'])} label{'' if len(macro['labels']) == 1 else 's'})"
    width = max(len(macro_name), *(len(name) for name in metrics["labels"]))
    boot = metrics["bootstrap"]
    ci = f"{100 * boot['confidence']:g}% CI" if boot["n_resamples"] else "CI"
    print(f"\n{title}: {metrics['n_rows']} studies; thresholds: {metrics['threshold_source']} "
          f"({metrics['n_val_rows']} validation studies); CIs from {boot['n_resamples']} bootstrap resamples "
          f"of {'studies' if boot['unit'] == 'study' else boot['unit'] + 's'} (seed {boot['seed']})")
    print(f"  {'label':<{width}}  {'n':>5} {'pos':>5}  AUROC  {ci:<14}  F1     {ci:<14}  threshold")
    for name, entry in metrics["labels"].items():
        head = f"  {name:<{width}}  {entry['n']:>5} {entry['n_positive']:>5}  "
        if "skipped" in entry:
            print(head + f"skipped: {entry['skipped']}")
            continue
        source = "" if entry["threshold_source"] == "val" else " (default)"
        print(head + f"{entry['auroc']:.3f}  {_ci(entry, 'auroc')}  {entry['f1']:.3f}  {_ci(entry, 'f1')}  "
                     f"{entry['threshold']:.3f}{source}")
    print(f"  {macro_name:<{width}}  {'':>5} {'':>5}  {_value(macro['auroc'])}  {_ci(macro, 'auroc')}  "
          f"{_value(macro['f1'])}  {_ci(macro, 'f1')}")
    print(f"  {'micro (label-rows)':<{width}}  {micro['n_label_rows']:>5} {micro['n_positive']:>5}  "
          f"{_value(micro['auroc'])}  {_ci(micro, 'auroc')}  {_value(micro['f1'])}  {_ci(micro, 'f1')}")


def print_results(task: str, result: dict[str, Any]) -> None:
    metrics = result["metrics"]
    if task == "zero_shot":
        print_classification(metrics, f"zero-shot ({result['info']['preset']}, {result['info']['mode']})")
    elif task == "linear_probe":
        for key, entry in metrics["fractions"].items():
            sampling = entry["sampling"]
            print(f"\nlinear probe on {float(key):.0%} of the training studies: {entry['n_train_rows']} studies "
                  f"({sampling['n_drawn']} drawn, {sampling['n_added']} added for a missing class)")
            for name, reason in entry["not_trained"].items():
                print(f"  {name}: no probe, {reason}")
            if "metrics" in entry:
                print_classification(entry["metrics"], f"linear probe {float(key):.0%}")
    elif task == "grounding":
        print_grounding(metrics, result["info"])
    elif task == "retrieval":
        print(f"\nretrieval among {metrics['n']} studies (image <-> report):")
        for direction, name in (("i2t", "image -> report"), ("t2i", "report -> image")):
            print(f"  {name}: " + "  ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:.3f}" for k in RECALL_KS))
    else:
        print(f"\n{metrics['n']} generated reports (tokenizer: {metrics['tokenizer']}):")
        print("  " + "  ".join(f"BLEU-{n} {metrics[f'bleu{n}']:.3f}" for n in range(1, 5))
              + f"  METEOR {_value(metrics['meteor'])}  ROUGE-L {metrics['rouge_l']:.3f}  CIDEr "
              + _value(metrics["cider"]))
        for name, reason in metrics.get("unavailable", {}).items():
            print(f"  {name} unavailable: {reason}")
        print_clinical_efficacy(metrics["clinical_efficacy"])
        findings = metrics.get("findings")
        if findings and findings["findings"]:
            micro = {column: findings[column]["micro"]["f1"]
                     for column in ("model", "majority_baseline", "all_positive_baseline")}
            print(f"  finding F1 against the manifest labels (report labeller, micro over "
                  f"{', '.join(findings['findings'])}): model {micro['model']:.3f}, majority class "
                  f"{micro['majority_baseline']:.3f}, always present {micro['all_positive_baseline']:.3f}")
        if findings and findings["unreadable"]:
            print(f"  labels the report labeller cannot read (not in finding F1): {', '.join(findings['unreadable'])}")


def print_grounding(metrics: dict[str, Any], info: dict[str, Any]) -> None:
    boot = metrics["bootstrap"]
    print(f"\ngrounding ({info['method']} maps; IoU/Dice at >= {info['threshold']} of the rescaled map): "
          f"{metrics['n_targets']} findings; {100 * boot['confidence']:g}% CIs from {boot['n_resamples']} bootstrap "
          f"resamples of studies; model vs centre prior")
    for label, entry in metrics["labels"].items():
        print(f"  {label} ({entry['n_images']} images, {entry['n_studies']} studies)")
        for metric in ("pointing", "iou", "dice", "cnr"):
            values = entry[metric]
            print(f"    {metric:<8}  model {_value(values['model'])} {_ci(values, 'model')}  centre prior "
                  f"{_value(values['centre_prior'])} {_ci(values, 'centre_prior')}  difference "
                  f"{_value(values['difference'])} {_ci(values, 'difference')}")


def print_clinical_efficacy(ce: dict[str, Any]) -> None:
    boot = ce["bootstrap"]
    ci = f"{100 * boot['confidence']:g}% CI" if boot["n_resamples"] else "CI"
    print(f"  clinical efficacy (report labeller on generated and reference reports, uncertain = "
          f"{ce['uncertain_policy']}; {ci} from {boot['n_resamples']} resamples of {boot['n_units']} studies):")
    for name, title in (("chexpert14", "14 observations"), ("common5", "common 5")):
        for average in ("micro", "macro"):
            entry = ce[name][average]
            print(f"    {title:<15} {average}  " + "  ".join(
                f"{short} {entry[metric]:.3f} {_ci(entry, metric)}"
                for metric, short in (("precision", "P"), ("recall", "R"), ("f1", "F1"))))


def write_plots(plot: tuple | None, folder: str) -> list[str]:
    if plot is None:
        return []
    from mmvl.evaluation.plots import plot_calibration, plot_roc_curves

    scores, targets, labels, metrics, title = plot
    paths = plot_roc_curves(scores, targets, labels, metrics, folder, title=title)
    paths.append(plot_calibration(scores, targets, labels, folder, title=title))
    return [str(path) for path in paths]


def evaluate_model(args: argparse.Namespace, source: str, task: str, labels: list[str] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], Runner]:
    """``task`` of the model at ``source`` as a one-model run does it: the JSON record (``error`` where every image
    failed), the task's result (with what the record leaves out: plot data, grounding records, study ids) and the
    runner with the images that failed. ``labels``: instead of ``--labels``. Raises MMVLError for bad input."""
    loaded = load_pretrained(source, device=args.device)
    if loaded.preprocess is None:
        raise ConfigError(f"{loaded.source}: this model records no image preprocessing (a text-only model?)")
    loaded.preprocess = with_reader_options(loaded.preprocess, reader_options(args))  # --allow-gaps...
    sections = (loaded.config.get("data") or {}).get("report_sections", ("findings", "impression"))
    # the data root the model was trained with, unless --data-root / --allow-outside-root say otherwise
    splits, manifest_labels = load_splits(args.manifest, sections, args.limit,
                                          **root_options(args, loaded.config, source=loaded.source))
    test = split_rows(splits, args.split, args.manifest, "--split")
    val = splits.get(args.val_split, []) if args.val_split else []
    used_splits = [args.split, *([args.val_split] if args.val_split else []),
                   *([args.train_split] if task == "linear_probe" else [])]
    if len(set(used_splits)) < len(used_splits):
        raise ConfigError(f"--split, --val-split and --train-split must name different splits, got {used_splits}")
    if labels is None:
        labels = manifest_labels
        if args.labels is not None:
            labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if task in ("zero_shot", "linear_probe"):
        _check_labels(labels, manifest_labels, args.manifest)
    runner = Runner(loaded, args.batch_size, args.device)
    problem = None
    try:
        if task == "zero_shot":
            result = run_zero_shot(args, loaded, runner, test, val, labels)
        elif task == "linear_probe":
            train = split_rows(splits, args.train_split, args.manifest, "--train-split")
            result = run_linear_probe(args, loaded, runner, test, val, train, labels)
        elif task == "retrieval":
            result = run_retrieval(args, loaded, runner, test)
        elif task == "grounding":
            result = run_grounding(args, loaded, runner)
        else:
            result = run_report(args, loaded, runner, test)
    except NoRows as err:
        result, problem = {"metrics": None}, str(err)
    result["manifest_labels"] = manifest_labels

    record: dict[str, Any] = {
        "task": task, "model": loaded.source, "manifest": str(args.manifest), "split": args.split,
        "val_split": args.val_split or None, "mmvl_version": mmvl.__version__, "seed": args.seed,
        "n_bootstrap": args.n_bootstrap, "preprocess": loaded.preprocess.kind, "reader_options": reader_options(args),
        "n_rows": {name: len(splits.get(name, [])) for name in used_splits},
        "n_failed": len(runner.failed), "failed": runner.failed,
    }
    if task in ("zero_shot", "linear_probe"):
        record["labels"] = labels
    if task == "linear_probe":
        record["train_split"] = args.train_split
    record.update(result.get("info", {}))
    if problem:
        record["error"] = problem
    else:
        record["metrics"] = result["metrics"]
        if "examples" in result:
            record["examples"] = result["examples"]
    return record, result, runner


def print_failures(failed: list[dict[str, str]], out: str) -> None:
    for failure in failed[:10]:
        print(f"  unreadable ({failure['split']}): {failure['path']}: {failure['reason']}")
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more (listed in {out})")


def compare_models(args: argparse.Namespace) -> int:
    """Grounding and zero-shot AUROC of every model of ``args.models`` on the same split, each run as a one-model
    run would be (``--task grounding``; ``--task zero_shot`` with the grounded labels the manifest labels), and
    the paired difference of each later model from the first, in one JSON (``--out``) and one Markdown table
    (``--out`` with the suffix ``.md``)."""
    from mmvl.evaluation.grounding_comparison import (
        align_studies,
        comparison_table,
        paired_auroc_difference,
        paired_grounding,
    )

    names = [name for name, _ in args.models]
    runs: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, str]] = []
    try:
        for name, source in args.models:  # (record, result, failed images): no model is kept once it has run
            run_record, result, runner = evaluate_model(args, source, "grounding")
            runs[name] = {"grounding": (run_record, result, runner.failed)}
            if result["metrics"] is None:
                continue
            scorable = [label for label in run_record["labels"] if label in result["manifest_labels"]]
            if scorable:
                run_record, result, runner = evaluate_model(args, source, "zero_shot", labels=scorable)
                runs[name]["zero_shot"] = (run_record, result, runner.failed)
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, tasks in runs.items():
        for task, (_, _, task_failed) in tasks.items():
            failed.extend({"model": name, "task": task, **entry} for entry in task_failed)
    problems = {f"{name} {task}": record["error"] for name, tasks in runs.items()
                for task, (record, _, _) in tasks.items() if "error" in record}
    baseline = names[0]
    record: dict[str, Any] = {
        "task": "grounding", "comparison": names, "baseline": baseline,
        "models": {name: runs[name]["grounding"][0]["model"] for name in names}, "manifest": str(args.manifest),
        "split": args.split, "mmvl_version": mmvl.__version__, "seed": args.seed, "n_bootstrap": args.n_bootstrap,
        "runs": {name: {task: record for task, (record, _, _) in tasks.items()} for name, tasks in runs.items()},
        "n_failed": len(failed),
    }
    table_path = Path(args.out).with_suffix(".md")
    if problems:
        record["error"] = problems
    else:
        base_records = runs[baseline]["grounding"][1]["records"]
        differences, auroc_differences = {}, {}
        for name in names[1:]:
            differences[name] = paired_grounding(base_records, runs[name]["grounding"][1]["records"],
                                                 args.n_bootstrap, args.seed)
            if "zero_shot" in runs[baseline] and "zero_shot" in runs[name]:
                base, other = runs[baseline]["zero_shot"][1], runs[name]["zero_shot"][1]
                rows_base, rows_other = align_studies(base["study_ids"], other["study_ids"])
                base_scores, targets, labels = base["plot"][:3]
                auroc_differences[name] = paired_auroc_difference(
                    base_scores[rows_base], other["plot"][0][rows_other], targets[rows_base], labels,
                    [base["study_ids"][i] for i in rows_base], args.n_bootstrap, args.seed)
        table = comparison_table(
            names, {name: runs[name]["grounding"][1]["metrics"] for name in names}, differences,
            {name: runs[name]["zero_shot"][1]["metrics"] if "zero_shot" in runs[name] else None for name in names},
            auroc_differences)
        record.update(differences={"grounding": differences, "zero_shot_auroc": auroc_differences}, table=table)
        atomic_write_text(table_path, table)
    atomic_write_text(args.out, json.dumps(_json_safe(record), indent=2) + "\n")
    if problems:
        for where, problem in problems.items():
            print(f"error: {where}: {problem}", file=sys.stderr)
    else:
        info = runs[baseline]["grounding"][0]
        zero_shot = runs[baseline].get("zero_shot")
        boot = runs[baseline]["grounding"][1]["metrics"]["bootstrap"]
        print(f"\ngrounding side by side on split '{args.split}' ({info['method']} maps; "
              f"{100 * boot['confidence']:g}% CIs from {boot['n_resamples']} bootstrap resamples of studies, the same "
              f"for every model; differences paired on the same targets and studies"
              + (f"; zero-shot: {zero_shot[0]['preset']} prompts, {zero_shot[0]['mode']}" if zero_shot else "")
              + "):\n")
        print(record["table"])
    print_failures(failed, args.out)
    print(f"\nwrote {args.out}" + ("" if problems else f" and {table_path}") + f" ({len(failed)} images failed)")
    return 1 if failed or problems else 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if len(args.models) > 1:
        return compare_models(args)
    try:
        record, result, runner = evaluate_model(args, args.models[0][1], args.task)
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problem = record.get("error")
    if args.plots and not problem:
        record["plots"] = write_plots(result.get("plot"), args.plots)
    atomic_write_text(args.out, json.dumps(_json_safe(record), indent=2) + "\n")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    else:
        print_results(args.task, result)
    print_failures(runner.failed, args.out)
    print(f"\nwrote {args.out}" + (f" and {len(record.get('plots', []))} plots in {args.plots}" if args.plots else "")
          + f" ({len(runner.failed)} images failed)")
    return 1 if runner.failed or problem else 0


if __name__ == "__main__":
    sys.exit(main())
