"""The report labeller (mmvl/evaluation/labeller.py): hand-written sentences for each cue kind, and the even-numbered
IU X-ray reports (torchxrayvision's copy) against their MeSH major terms. Speed is measured by
benchmarks/bench_labeller.py, not here.

Only even-numbered IU reports (``<pmcId id>`` even) are read here: the odd ones are kept for an independent check of
the labeller and must not be used to write or tune its rules.
"""

from __future__ import annotations

import importlib.util

import pytest

from mmvl.evaluation.labeller import (
    CHEXPERT_OBSERVATIONS,
    IU_MESH_TERMS,
    NEGATIVE,
    NOT_MENTIONED,
    OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
    canonical_observation,
    label_observations,
    mesh_observations,
    unreadable,
)
from tests.conftest import load_script

P, N, U = POSITIVE, NEGATIVE, UNCERTAIN


@pytest.mark.parametrize("text,expected", [
    # negation, including lists across commas and "or"
    ("The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
     {"Pneumothorax": N, "Pleural Effusion": N, "Lung Opacity": N}),
    ("No evidence of pneumothorax.", {"Pneumothorax": N}),
    ("Heart size normal without pleural effusion.", {"Pleural Effusion": N, "Cardiomegaly": N}),
    ("No focal consolidation, pneumothorax or large pleural effusion.",
     {"Consolidation": N, "Pneumothorax": N, "Pleural Effusion": N}),
    ("Negative for focal consolidation.", {"Consolidation": N}),
    ("The previously seen left effusion has resolved.", {"Pleural Effusion": N}),
    ("Resolved right pneumothorax.", {"Pneumothorax": N}),
    ("Effusion, pneumothorax or edema are not seen.", {"Pleural Effusion": N, "Pneumothorax": N, "Edema": N}),
    ("The heart is not enlarged.", {"Cardiomegaly": N}),
    ("The endotracheal tube has been removed.", {"Support Devices": N}),
    # not a negation
    ("No change in the small left pleural effusion.", {"Pleural Effusion": P}),
    ("A pleural line with absent lung markings, consistent with a small pneumothorax.", {"Pneumothorax": P}),
    # uncertainty, including hedged lists
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
    ("Opacity which may represent atelectasis.", {"Lung Opacity": P, "Atelectasis": U}),
    ("Atelectasis versus consolidation.", {"Atelectasis": U, "Consolidation": U}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": U}),
    ("Left basilar opacity, atelectasis or pneumonia.", {"Lung Opacity": P, "Atelectasis": U, "Pneumonia": U}),
    ("? small effusion", {"Pleural Effusion": U}),
    ("Findings suspicious for pneumonia.", {"Pneumonia": U}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": U}),
    # scope: a cue stops at "but", "however", "although", a new predicate, a comma starting a new statement
    ("There is no pneumothorax, but a small right pleural effusion.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("No pneumothorax or effusion; however, there is cardiomegaly.",
     {"Pneumothorax": N, "Pleural Effusion": N, "Cardiomegaly": P}),
    ("There is no pneumothorax although a small effusion is present.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("Effusion is present and pneumothorax is not seen.", {"Pleural Effusion": P, "Pneumothorax": N}),
    ("No pneumothorax, stable cardiomegaly.", {"Pneumothorax": N, "Cardiomegaly": P}),
    ("Possible small effusion, no pneumothorax.", {"Pleural Effusion": U, "Pneumothorax": N}),
    # mentions
    ("Right IJ catheter tip in the SVC.", {"Support Devices": P}),
    ("A 1 cm nodule in the right upper lobe.", {"Lung Lesion": P, "Lung Nodule": P}),
    ("Centrilobular emphysema. Subcutaneous emphysema of the neck.", {"Emphysema": P}),
    ("Small pericardial effusion.", {"Pleural Effusion": NOT_MENTIONED}),
    ("Healed right rib fracture.", {"Fracture": P}),
    ("Mild pulmonary vascular congestion.", {"Edema": P}),
])
def test_cues_on_hand_written_sentences(text, expected):
    labels = label_observations(text)
    assert {name: labels[name] for name in expected} == expected, labels


def test_no_finding_and_the_rest_not_mentioned():
    normal = label_observations("No acute cardiopulmonary process. Right IJ catheter tip in the SVC.")
    assert normal["No Finding"] == P and normal["Support Devices"] == P  # a device is no pathology
    assert all(normal[name] is NOT_MENTIONED for name in OBSERVATIONS if name not in ("No Finding", "Support Devices"))
    assert label_observations("Possible small effusion.")["No Finding"] is NOT_MENTIONED  # uncertain counts
    assert label_observations("Stable cardiomegaly.")["No Finding"] is NOT_MENTIONED


def test_names_aliases_and_unknown_labels():
    assert label_observations("Small effusion. No nodules.", ["pleural_effusion", "nodule", "Lung Lesion"]) == {
        "pleural_effusion": P, "nodule": N, "Lung Lesion": N}
    assert canonical_observation("lung opacity") == "Lung Opacity" and canonical_observation("effusion") == (
        "Pleural Effusion")
    assert unreadable(["emphysema", "Bronchiectasis", "cardiomegaly"]) == ["Bronchiectasis"]
    with pytest.raises(ValueError, match="no rules for"):
        label_observations("x", ["bronchiectasis"])
    assert set(CHEXPERT_OBSERVATIONS) <= set(OBSERVATIONS) and len(CHEXPERT_OBSERVATIONS) == 14


def test_mesh_mapping():
    assert mesh_observations(["normal"]) == {"No Finding"}
    assert mesh_observations(["Cardiac Shadow/enlarged/mild", "Pleural Effusion/right/small"]) == {
        "Cardiomegaly", "Pleural Effusion"}
    assert mesh_observations(["Opacity/lung/upper lobe/right/round"]) == {"Lung Opacity", "Lung Lesion", "Lung Nodule"}
    assert mesh_observations(["Mediastinum/normal", "Thickening/heart ventricles"]) == set()


# MeSH major term -> observation, as IU_MESH_TERMS in the module (checked here so a change shows in this test):
#   Cardiomegaly: Cardiomegaly, Cardiac Shadow/enlarged; Pleural Effusion: Pleural Effusion, Hydropneumothorax;
#   Pneumothorax: Pneumothorax, Hydropneumothorax; Lung Lesion: Nodule, Mass, Opacity/round, Density/round;
#   Lung Nodule: Nodule, Opacity/round, Density/round; Atelectasis: Pulmonary Atelectasis; Edema: Pulmonary Edema,
#   Pulmonary Congestion; Consolidation; Pneumonia; Lung Opacity: Opacity, Airspace Disease, Infiltrate,
#   Density/lung; Enlarged Cardiomediastinum: Mediastinum/prominent|enlarged|widened; Pleural Other:
#   Thickening/pleura; Fracture: Fractures, Bone; Support Devices: Catheters, Indwelling, Implanted Medical Device,
#   Tube, Inserted, Medical Device, Stents; Emphysema: Emphysema, Pulmonary Emphysema, Bullous Emphysema;
#   No Finding: "normal" alone.
# A report's label counts as present when positive or uncertain (MeSH indexes borderline and hedged findings).
# Floors: precision and recall >= 0.8 for the four below; F1 >= FLOORS_F1 for the others with enough MeSH terms.
# Pneumonia (MeSH rarely indexes "concerning for pneumonia"), No Finding (MeSH "normal" also excludes findings
# outside the 14, e.g. spine degeneration, granulomas) and Enlarged Cardiomediastinum (14 reports) have no floor.
PR_FLOORS = {"Cardiomegaly": 0.8, "Pleural Effusion": 0.8, "Pneumothorax": 0.8, "Lung Lesion": 0.8,
             "Lung Nodule": 0.8}
F1_FLOORS = {"Lung Opacity": 0.8, "Atelectasis": 0.8, "Edema": 0.6, "Consolidation": 0.7, "Pleural Other": 0.6,
             "Fracture": 0.75, "Support Devices": 0.75, "Emphysema": 0.8}


def test_mesh_mapping_is_the_one_stated():
    assert set(IU_MESH_TERMS) == set(OBSERVATIONS) - {"No Finding"}
    assert IU_MESH_TERMS["Lung Lesion"] == (("nodule", ()), ("mass", ()), ("opacity", ("round",)),
                                            ("density", ("round",)))
    assert IU_MESH_TERMS["Cardiomegaly"] == (("cardiomegaly", ()), ("cardiac shadow", ("enlarged",)))


def even_iu_reports():
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision (its NLMCXR_reports.tgz) is not installed: pip install --no-deps torchxrayvision")
    iu_xray = load_script("iu_xray")
    reports = iu_xray.read_reports(parity="even")
    assert reports and all(report.report_id % 2 == 0 for report in reports)  # never an odd (held-out) report
    return [(report.text(), report.mesh_major) for report in reports if report.text()]


def observation_table(pairs):
    """``{observation: (precision, recall, f1, n MeSH positives)}`` with present = positive or uncertain."""
    labels = [label_observations(text) for text, _ in pairs]
    truth = [mesh_observations(terms) for _, terms in pairs]
    table = {}
    for name in OBSERVATIONS:
        said = [row[name] in (POSITIVE, UNCERTAIN) for row in labels]
        true = [name in row for row in truth]
        tp = sum(s and t for s, t in zip(said, true))
        fp, fn = sum(said) - tp, sum(true) - tp
        table[name] = (tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0,
                       2 * tp / (2 * tp + fp + fn) if tp else 0.0, tp + fn)
    return table


def test_even_iu_reports_against_mesh_terms():
    pairs = even_iu_reports()
    assert len(pairs) > 1900  # 1,962 even reports hold findings or an impression
    table = observation_table(pairs)
    print(f"\n{'observation':<28} {'n':>4}  precision  recall  F1")
    for name, (precision, recall, f1, n) in table.items():
        print(f"{name:<28} {n:>4}  {precision:9.3f}  {recall:6.3f}  {f1:.3f}")
    low = {name: table[name][:2] for name, floor in PR_FLOORS.items() if min(table[name][:2]) < floor}
    assert not low, f"precision/recall below {PR_FLOORS}: {low}"
    low = {name: table[name][2] for name, floor in F1_FLOORS.items() if table[name][2] < floor}
    assert not low, f"F1 below {F1_FLOORS}: {low}"



def test_reads_every_synthetic_ct_report():
    # The CT configs' labels (CT-RATE names: lung nodule, pleural effusion, emphysema, cardiomegaly, consolidation)
    # are all readable, so finding F1 scores them all.
    import numpy as np

    from mmvl.data.reports import report_text
    from mmvl.evaluation.report_metrics import label_report

    synthetic_ct = load_script("synthetic_ct")
    assert not unreadable(synthetic_ct.FINDINGS)
    for index in range(200):
        study = synthetic_ct.sample_study(0, index)
        text = report_text(synthetic_ct._report(study, np.random.default_rng(index)))
        assert label_report(text, study.labels) == study.labels, text
