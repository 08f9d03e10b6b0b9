"""Clinical efficacy (CE) of generated reports: precision, recall and F1 of the CheXpert observations read by the
report labeller in each generated report against those read in its reference report, micro and macro, over the 14
observations and over the common 5, with bootstrap intervals over studies (as R2Gen, CXRMate and LLaVA-Rad report
them beside BLEU; they label with CheXpert/CheXbert, mmvl with :mod:`mmvl.evaluation.labeller`, offline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmvl.evaluation.labeller import CHEXPERT_OBSERVATIONS, COMMON_FIVE, label_observations
from mmvl.evaluation.metrics import bootstrap_units, percentile_interval, resample_units
from mmvl.evaluation.report_metrics import UNCERTAIN_POLICIES, binary_label

OBSERVATION_SETS = {"chexpert14": CHEXPERT_OBSERVATIONS, "common5": COMMON_FIVE}


def _scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 from counts (arrays broadcast alike); 0 where undefined (scikit-learn's
    ``zero_division=0``, as the CE code of R2Gen and CXRMate uses)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def _averages(generated: np.ndarray, reference: np.ndarray) -> dict[str, dict[str, float]]:
    """Micro (counts pooled over the observations) and macro (mean of the per-observation values) scores of
    ``(N, L)`` 0/1 arrays."""
    tp = (generated & reference).sum(axis=0)
    fp = (generated & ~reference).sum(axis=0)
    fn = (~generated & reference).sum(axis=0)
    micro = _scores(tp.sum(), fp.sum(), fn.sum())
    per_observation = _scores(tp, fp, fn)
    return {"micro": {key: float(value) for key, value in micro.items()},
            "macro": {key: float(value.mean()) for key, value in per_observation.items()}}


def binary_matrix(texts: Sequence[str], observations: Sequence[str], uncertain: str = "positive") -> np.ndarray:
    """``(N, L)`` bool array: observation ``l`` read as present in report ``n`` (positive, or uncertain under
    ``uncertain="positive"``)."""
    rows = [label_observations(text, observations) for text in texts]
    return np.array([[binary_label(row[name], uncertain) for name in observations] for row in rows],
                    dtype=bool).reshape(len(texts), len(observations))


def clinical_efficacy(
    generated: Sequence[str],
    references: Sequence[str],
    uncertain: str = "positive",
    study_ids: Sequence[Any] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """CE precision/recall/F1 of ``generated`` reports against ``references`` (paired, one study each).

    Both are labelled by :func:`mmvl.evaluation.labeller.label_observations`; an observation is present when
    positive, and when uncertain under ``uncertain="positive"`` (the default, as in the CE papers; ``"negative"``
    counts it absent); negative and not mentioned are absent. Returns per observation ``precision``, ``recall``,
    ``f1``, ``support`` (references where present) and ``predicted`` (generated reports where present), and for each
    set of :data:`OBSERVATION_SETS` (``chexpert14``: the 14 CheXpert observations, No Finding included;
    ``common5``: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) ``micro`` (counts pooled) and
    ``macro`` (mean over the set's observations, an undefined value counting 0) scores, each with a percentile
    bootstrap interval ``<name>_ci`` from ``n_bootstrap`` seeded resamples of the studies (rows sharing a study
    id are drawn together; without ``study_ids`` each row is a study).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if len(generated) != len(references):
        raise ValueError(f"clinical_efficacy: {len(generated)} generated reports but {len(references)} references")
    if not len(generated):
        raise ValueError("clinical_efficacy: no reports to score")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    observations = list(dict.fromkeys(name for names in OBSERVATION_SETS.values() for name in names))
    predicted = binary_matrix(generated, observations, uncertain)
    truth = binary_matrix(references, observations, uncertain)

    tp = (predicted & truth).sum(axis=0)
    per_observation = _scores(tp, (predicted & ~truth).sum(axis=0), (~predicted & truth).sum(axis=0))
    result: dict[str, Any] = {
        "n": len(generated),
        "uncertain_policy": uncertain,
        "labeller": "mmvl.evaluation.labeller (rules)",
        "observations": {
            name: {**{key: float(values[j]) for key, values in per_observation.items()},
                   "support": int(truth[:, j].sum()), "predicted": int(predicted[:, j].sum())}
            for j, name in enumerate(observations)},
    }
    columns = {name: [observations.index(observation) for observation in names]
               for name, names in OBSERVATION_SETS.items()}
    unit_rows, unit_starts = bootstrap_units(study_ids, len(generated))
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in columns}
    for _ in range(n_bootstrap):
        index = resample_units(rng, unit_rows, unit_starts)
        for name, cols in columns.items():
            draws[name].append(_averages(predicted[index][:, cols], truth[index][:, cols]))
    for name, cols in columns.items():
        point = _averages(predicted[:, cols], truth[:, cols])
        for average, scores in point.items():
            if n_bootstrap:
                for metric in list(scores):
                    samples = np.array([draw[average][metric] for draw in draws[name]])
                    scores[f"{metric}_ci"] = percentile_interval(samples, confidence)["ci"]
        result[name] = {"observations": list(OBSERVATION_SETS[name]), **point}
    result["bootstrap"] = {"n_resamples": n_bootstrap, "seed": seed, "confidence": confidence,
                           "unit": "row" if study_ids is None else "study", "n_units": int(len(unit_starts) - 1),
                           "method": "percentile"}
    return result
