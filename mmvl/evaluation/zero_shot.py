"""Zero-shot classification from label names: prompt presets, text prototypes, pairwise/multiclass scores, and
the run of a loaded model over scans (:func:`zero_shot_scans`, behind ``mmvl.zero_shot``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmvl.data.inputs import iter_batches, rows_frame, scan_items, with_reader_options
from mmvl.errors import ConfigError

# The lobes CT-RATE's reports place nodules and consolidation in.
_LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")

# Named prompt presets: where the field's published systems differ, the preset records which was used.
PRESETS: dict[str, dict[str, Any]] = {
    # CheXzero (Tiu et al. 2022): softmax over "{}" vs "no {}".
    "chexzero": {"positive": ["{}"], "negative": ["no {}"]},
    # CT-CLIP (Hamamci et al. 2024): "{} is present." vs "{} is not present." (its published zero-shot prompts,
    # kept for comparison with its numbers; they are not how CT-RATE's reports are worded: use "ctrate")
    "ctclip": {"positive": ["{} is present."], "negative": ["{} is not present."]},
    # CT-RATE's own report phrasing (Hamamci et al. 2024's dataset; mmvl's synthetic CT reports follow it):
    # impressions name a finding in a word or two ("Cardiomegaly.", "Bilateral pleural effusion."), findings state it
    # ("... was observed") or negate it ("Heart size is normal.", "Pleural effusion-thickening was not detected.").
    # Each side averages the impression and the findings forms; labels outside the five get the templates. A nodule
    # or a consolidation is reported with its lobe ("... was observed in the right lower lobe"), so their positive
    # side also averages the five lobes' forms (prompt ensembling over locations; on the CT demo's validation
    # reports it raised the text's own zero-shot reading from 0.63-0.69 to 0.71-0.73 for nodules and from
    # 0.54-0.62 to 0.79-0.83 for consolidation, which reads best with the lobe forms alone).
    "ctrate": {
        "positive": ["{}.", "{} was observed.", "There is {}."],
        "negative": ["No {}.", "No {} was detected.", "There is no {}."],
        "lung nodule": {
            "positive": ["Pulmonary nodule.", "A nodule was observed in the lung.",
                         "There is a solid pulmonary nodule.", "Nodules are observed in the lungs.",
                         *(f"A nodule was observed in the {lobe}." for lobe in _LOBES)],
            "negative": ["No pulmonary nodule.", "No mass or nodule was detected in either lung.",
                         "There is no suspicious nodule."],
        },
        "pleural effusion": {
            "positive": ["Pleural effusion.", "There is pleural effusion.", "Pleural effusion was observed.",
                         "Bilateral pleural effusion."],
            "negative": ["No pleural effusion.", "Pleural effusion-thickening was not detected.",
                         "There is no pleural effusion."],
        },
        "emphysema": {
            "positive": ["Emphysema.", "Centrilobular emphysema.", "Emphysematous changes are observed in both lungs.",
                         "There is emphysema in both lungs."],
            "negative": ["No emphysema.", "There is no emphysematous change."],
        },
        "cardiomegaly": {
            "positive": ["Cardiomegaly.", "Cardiomegaly is observed.", "The heart is enlarged.",
                         "Heart size is increased."],
            "negative": ["Heart size is normal.", "Heart contour and size are normal.", "No cardiomegaly.",
                         "The heart is not enlarged."],
        },
        "consolidation": {
            "positive": [f"Consolidation areas were observed in the {lobe}." for lobe in _LOBES],
            "negative": ["No consolidation.", "There is no focal consolidation."],
        },
    },
    # Template ensemble: each side's embeddings are averaged (as CLIP's prompt ensembling).
    "ensemble": {
        "positive": ["{}", "there is {}", "findings consistent with {}", "{} is present.", "{} is seen."],
        "negative": ["no {}", "there is no {}", "no evidence of {}", "{} is not present.", "{} is not seen."],
    },
}


def build_prompts(labels: Sequence[str], preset: str | Mapping[str, Any] = "chexzero") -> dict[str, dict]:
    """``{label: {"positive": [...], "negative": [...]}}`` from a preset name or a dict of templates.

    A custom dict may give templates (``{"positive": [...], "negative": [...]}`` with ``{}``) or
    per-label prompt lists (``{"pleural effusion": {"positive": [...], "negative": [...]}}``).
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown prompt preset '{preset}'; choose from {sorted(PRESETS)} or a prompt file")
        preset = PRESETS[preset]
    prompts = {}
    for label in labels:
        if label in preset:
            entry = preset[label]
            prompts[label] = {"positive": list(entry["positive"]), "negative": list(entry.get("negative", []))}
        elif "positive" in preset:
            prompts[label] = {side: [template.format(label) for template in preset.get(side, [])]
                              for side in ("positive", "negative")}
        else:
            raise ConfigError(f"prompt set has no templates and no entry for label '{label}'")
        if not prompts[label]["positive"]:
            raise ConfigError(f"label '{label}': no positive prompts")
    return prompts


def load_prompt_file(path: str | os.PathLike) -> dict[str, Any]:
    """A prompt set from JSON or YAML: templates ``{"positive": ["{}", ...], "negative": ["no {}", ...]}`` and/or
    per-label prompt lists ``{"pleural effusion": {"positive": [...], "negative": [...]}}``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            prompts = yaml.safe_load(text)
        else:
            prompts = json.loads(text)
    except Exception as err:  # json.JSONDecodeError or yaml.YAMLError (which is no ValueError)
        raise ConfigError(f"{path}: not a valid prompt file: {err}") from err
    if not isinstance(prompts, Mapping):
        raise ConfigError(f"{path}: a prompt file holds a mapping (templates or per-label prompts), "
                          f"got {type(prompts).__name__}")
    return dict(prompts)


def prompts_from(labels: Sequence[str], preset: str | os.PathLike | Mapping[str, Any]) -> dict[str, dict]:
    """:func:`build_prompts` from a preset name, a prompt dict or the path of a JSON/YAML prompt file."""
    if isinstance(preset, (str, os.PathLike)) and (str(preset) not in PRESETS):
        if not Path(preset).is_file():
            raise ConfigError(f"unknown prompt preset '{preset}': not one of {sorted(PRESETS)} and no such file")
        preset = load_prompt_file(preset)
    return build_prompts(labels, preset)


@torch.no_grad()
def text_prototypes(model: Any, prompts: Mapping[str, Mapping[str, list[str]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding per label and side, re-normalised: ``(L, D)`` positive and negative (NaN if none)."""
    positives, negatives = [], []
    for entry in prompts.values():
        for side, out in (("positive", positives), ("negative", negatives)):
            texts = entry[side]
            if texts:
                mean = model.encode_text(texts).float().mean(0)
                out.append(mean / mean.norm().clamp(min=1e-12))
            else:
                out.append(torch.full_like(positives[-1], float("nan")))
    return torch.stack(positives), torch.stack(negatives)


def zero_shot_probabilities(
    image_emb: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, logit_scale: float,
    mode: str = "pairwise",
) -> torch.Tensor:
    """``(B, L)`` probabilities. Pairwise: per label, softmax over (positive, negative) similarity.
    Multiclass: softmax of the positive similarities across labels."""
    pos = logit_scale * image_emb.float() @ positive.T
    if mode == "multiclass":
        return pos.softmax(dim=-1)
    if mode != "pairwise":
        raise ConfigError(f"zero-shot mode must be 'pairwise' or 'multiclass', got '{mode}'")
    if torch.isnan(negative).any():
        raise ConfigError("pairwise zero-shot needs negative prompts for every label (or use mode='multiclass')")
    neg = logit_scale * image_emb.float() @ negative.T
    return torch.stack([pos, neg], dim=-1).softmax(dim=-1)[..., 0]


def auroc(scores: Sequence[float], targets: Sequence[int]) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``: sorting, so memory grows with the rows and not
    with positives x negatives); NaN if one class is absent."""
    from sklearn.metrics import roc_auc_score

    targets_a = np.asarray(targets, dtype=np.int64)
    if targets_a.size == 0 or targets_a.min() == targets_a.max():
        return float("nan")
    return float(roc_auc_score(targets_a, np.asarray(scores, dtype=np.float64)))


def _check_arguments(inputs: Any, labels: Any, mode: str, batch_size: Any, limit: Any) -> None:
    """Clear :mod:`mmvl.errors` errors for arguments of the wrong kind, before any work."""
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    if not isinstance(paths, Sequence) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise ConfigError(f"zero_shot: inputs must be a path or a list of paths (files or folders), got "
                          f"{type(inputs).__name__}: {inputs!r:.80}")
    names = labels.split(",") if isinstance(labels, str) else labels
    if not isinstance(names, Sequence) or not all(isinstance(label, str) for label in names):
        raise ConfigError(f"zero_shot: labels must be label names (a list, or one comma-separated string), got "
                          f"{type(labels).__name__}: {labels!r:.80}")
    if mode not in ("pairwise", "multiclass"):
        raise ConfigError(f"zero_shot: mode must be 'pairwise' or 'multiclass', got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"zero_shot: batch_size must be an integer >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"zero_shot: limit must be None or an integer >= 1, got {limit!r}")


def zero_shot_scans(
    loaded: Any,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike = (),
    labels: Sequence[str] | str = (),
    preset: str | os.PathLike | Mapping[str, Any] = "chexzero",
    mode: str = "pairwise",
    manifest: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: Any = None,
    progress: bool = True,
    as_frame: bool = False,
    limit: int | None = None,
    data_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    reader_options: Mapping[str, Any] | None = None,
) -> Any:
    """Zero-shot probabilities of ``labels`` for every scan in ``inputs`` and/or ``manifest``, by ``loaded`` (a
    :class:`mmvl.loading.LoadedModel`: its ``model`` and ``preprocess``); see :func:`mmvl.inference.zero_shot`
    for the arguments and the rows returned. ``device``: where to move the model first (default: where it is).
    ``data_root`` defaults to the ``data.root`` recorded with the model
    (:func:`~mmvl.data.manifest.trained_root`); ``reader_options`` override the recorded reading step's options
    (:func:`~mmvl.data.inputs.with_reader_options`)."""
    inputs = () if inputs is None else inputs
    _check_arguments(inputs, labels, mode, batch_size, limit)
    labels = [label.strip() for label in (labels.split(",") if isinstance(labels, str) else labels) if label.strip()]
    if not labels:
        raise ConfigError("zero_shot: no labels given")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"zero_shot: repeated label names in {labels}")
    if mode == "multiclass" and len(labels) < 2:
        raise ConfigError(f"zero_shot: mode 'multiclass' takes a softmax across labels, so with one label "
                          f"({labels[0]!r}) every probability is 1.0; give two or more labels, or use mode 'pairwise'")
    if loaded.preprocess is None:
        raise ConfigError(f"{loaded.source}: this model has no image preprocessing (a text-only model)")
    preprocess = with_reader_options(loaded.preprocess, reader_options)
    net = loaded.model
    if device is not None:
        net.to(device)
    device = next(net.parameters()).device
    prompts = prompts_from(labels, preset)
    items = scan_items(loaded, inputs, manifest, data_root, allow_outside_root, limit, what="zero_shot")
    positive, negative = text_prototypes(net, prompts)
    scale = float(net.contrastive_head.scale().detach())
    rows: list[dict[str, Any]] = []
    for batch in iter_batches(preprocess, items, batch_size, device, progress, desc="zero-shot"):
        if batch.images is not None:
            with torch.no_grad():
                embeddings = net.encode_image(batch.images)
            probabilities = zero_shot_probabilities(embeddings, positive, negative, scale, mode)
            for index, values in zip(batch.loaded, probabilities.tolist()):
                batch.rows[index].update(zip(labels, values))
        for row in batch.rows:
            rows.append({"path": row["path"], "study_id": row["study_id"], "view": row["view"],
                         **{label: row.get(label, float("nan")) for label in labels}, "error": row["error"]})
    return rows_frame(rows, "zero_shot") if as_frame else rows
