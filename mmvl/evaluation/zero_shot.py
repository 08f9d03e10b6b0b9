"""Zero-shot classification from label names: prompt presets, text prototypes, pairwise/multiclass scores, and
the run of a loaded model over scans (:func:`zero_shot_scans`, behind ``mmvl.zero_shot``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmvl.data.inputs import find_inputs, iter_batches, manifest_items
from mmvl.errors import ConfigError

# Named prompt presets: where the field's published systems differ, the preset records which was used.
PRESETS: dict[str, dict[str, list[str]]] = {
    # CheXzero (Tiu et al. 2022): softmax over "{}" vs "no {}".
    "chexzero": {"positive": ["{}"], "negative": ["no {}"]},
    # CT-CLIP (Hamamci et al. 2024): "{} is present." vs "{} is not present."
    "ctclip": {"positive": ["{} is present."], "negative": ["{} is not present."]},
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
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count half); NaN if one class."""
    scores_t = torch.as_tensor(scores, dtype=torch.float64)
    targets_t = torch.as_tensor(targets, dtype=torch.float64)
    pos, neg = scores_t[targets_t == 1], scores_t[targets_t == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


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
) -> Any:
    """Zero-shot probabilities of ``labels`` for every scan in ``inputs`` and/or ``manifest``, by ``loaded`` (a
    :class:`mmvl.loading.LoadedModel`: its ``model`` and ``preprocess``); see :func:`mmvl.inference.zero_shot`
    for the arguments and the rows returned. ``device``: where to move the model first (default: where it is)."""
    labels = [label.strip() for label in (labels.split(",") if isinstance(labels, str) else labels) if label.strip()]
    if not labels:
        raise ConfigError("zero_shot: no labels given")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"zero_shot: repeated label names in {labels}")
    net = loaded.model
    if device is not None:
        net.to(device)
    device = next(net.parameters()).device
    prompts = prompts_from(labels, preset)
    items = find_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs),
                        volumes=loaded.preprocess.kind == "3d")
    if manifest is not None:
        items += manifest_items(manifest, root=data_root, allow_outside_root=allow_outside_root)
    items = items[:limit] if limit else items
    if not items:
        raise ConfigError("zero_shot: no inputs (give files, folders or a manifest)")
    positive, negative = text_prototypes(net, prompts)
    scale = float(net.contrastive_head.scale().detach())
    rows: list[dict[str, Any]] = []
    for batch in iter_batches(loaded.preprocess, items, batch_size, device, progress, desc="zero-shot"):
        if batch.images is not None:
            with torch.no_grad():
                embeddings = net.encode_image(batch.images)
            probabilities = zero_shot_probabilities(embeddings, positive, negative, scale, mode)
            for index, values in zip(batch.loaded, probabilities.tolist()):
                batch.rows[index].update(zip(labels, values))
        for row in batch.rows:
            rows.append({"path": row["path"], "study_id": row["study_id"],
                         **{label: row.get(label, float("nan")) for label in labels}, "error": row["error"]})
    if as_frame:
        try:
            import pandas as pd
        except ImportError as err:
            raise ConfigError("zero_shot(as_frame=True) needs pandas (pip install pandas)") from err
        return pd.DataFrame(rows)
    return rows
