"""Clinical efficacy metrics (mmvl/evaluation/clinical_efficacy.py) against values computed by hand."""

from __future__ import annotations

import pytest

from mmvl.evaluation.clinical_efficacy import clinical_efficacy

REFERENCES = [
    "Cardiomegaly. Small left pleural effusion.",  # cardiomegaly, effusion
    "No acute cardiopulmonary process.",  # no finding
    "Possible right lower lobe atelectasis.",  # atelectasis (uncertain)
    "Pulmonary edema and bilateral pleural effusions.",  # edema, effusion
]
GENERATED = [
    "Cardiomegaly. No pleural effusion.",  # cardiomegaly
    "Small pleural effusion.",  # effusion
    "Right lower lobe atelectasis.",  # atelectasis
    "Pulmonary edema. No effusion.",  # edema
]


def test_ce_by_hand_uncertain_as_positive():
    ce = clinical_efficacy(GENERATED, REFERENCES, n_bootstrap=0)
    # per observation: cardiomegaly tp 1; atelectasis tp 1; edema tp 1; effusion tp 0, fp 1 (study 2), fn 2
    # (studies 1, 4); no finding fn 1 (study 2: the generated report names an effusion); the rest absent in both.
    assert ce["observations"]["Cardiomegaly"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1,
                                                  "predicted": 1}
    assert ce["observations"]["Pleural Effusion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2,
                                                      "predicted": 1}
    assert ce["observations"]["No Finding"]["support"] == 1 and ce["observations"]["No Finding"]["recall"] == 0.0
    # common 5: tp 3, fp 1, fn 2; per observation P = R = F1 = 1, 1, 0 (consolidation: undefined), 1, 0
    five = ce["common5"]
    assert five["micro"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 5, "f1": 6 / 9})
    assert five["macro"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 5, "f1": 3 / 5})
    # 14 observations: tp 3, fp 1, fn 3 (no finding added); macro: 3 of 14 observations score 1
    fourteen = ce["chexpert14"]
    assert fourteen["micro"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 6, "f1": 6 / 10})
    assert fourteen["macro"] == pytest.approx({"precision": 3 / 14, "recall": 3 / 14, "f1": 3 / 14})
    assert len(fourteen["observations"]) == 14 and ce["uncertain_policy"] == "positive"


def test_ce_by_hand_uncertain_as_negative():
    ce = clinical_efficacy(GENERATED, REFERENCES, uncertain="negative", n_bootstrap=0)
    # the reference's "possible atelectasis" is now absent: atelectasis fp 1 -> common 5: tp 2, fp 2, fn 2
    assert ce["observations"]["Atelectasis"]["support"] == 0
    assert ce["common5"]["micro"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert ce["common5"]["macro"]["f1"] == pytest.approx(2 / 5)


def test_ce_bootstrap_resamples_studies():
    ce = clinical_efficacy(GENERATED, REFERENCES, study_ids=["a", "a", "b", "c"], n_bootstrap=200, seed=1)
    assert ce["bootstrap"]["unit"] == "study" and ce["bootstrap"]["n_units"] == 3
    low, high = ce["common5"]["micro"]["f1_ci"]
    assert 0.0 <= low <= 6 / 9 <= high <= 1.0 and low < high
    again = clinical_efficacy(GENERATED, REFERENCES, study_ids=["a", "a", "b", "c"], n_bootstrap=200, seed=1)
    assert again["common5"]["micro"]["f1_ci"] == [low, high]  # seeded
    perfect = clinical_efficacy(REFERENCES, REFERENCES, n_bootstrap=50)
    assert perfect["chexpert14"]["micro"]["f1"] == 1.0 and perfect["chexpert14"]["micro"]["f1_ci"] == [1.0, 1.0]


def test_ce_refuses_bad_input():
    with pytest.raises(ValueError, match="uncertain"):
        clinical_efficacy(["a"], ["a"], uncertain="ignore")
    with pytest.raises(ValueError, match="1 generated reports but 2"):
        clinical_efficacy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no reports"):
        clinical_efficacy([], [])
