from __future__ import annotations

import json
import math

import pytest

from mmvl.data.reports import report_text
from mmvl.evaluation.report_metrics import (
    corpus_bleu,
    finding_f1,
    label_report,
    report_metrics,
    rouge_l,
    tokenize_report,
    truth_labels,
)


def test_tokens_ignore_case_punctuation_and_decoder_spacing():
    assert tokenize_report("Nodule, 2.5 cm; CT recommended.") == ["nodule", "2", "5", "cm", "ct", "recommended"]
    assert tokenize_report("nodule, 2. 5 cm ; ct recommended .") == tokenize_report("Nodule, 2.5 cm; CT recommended.")


def test_corpus_bleu_by_hand():
    hypotheses = ["the heart is enlarged", "no pleural effusion", "small left pleural effusion"]
    references = ["the heart is mildly enlarged", "no pleural effusion", "small left pleural effusion"]
    # Matched / total n-grams per sentence:   n=1      n=2     n=3     n=4
    #   "the heart is enlarged" (4 words):    4/4      2/3     1/2     0/1
    #   "no pleural effusion" (3):            3/3      2/2     1/1     0/0
    #   "small left pleural effusion" (4):    4/4      3/3     2/2     1/1
    # corpus:                                 11/11    7/8     4/5     1/2;  c = 11 < r = 12
    brevity = math.exp(1 - 12 / 11)
    scores = corpus_bleu(hypotheses, references)
    assert scores["bleu1"] == pytest.approx(brevity)
    assert scores["bleu2"] == pytest.approx(brevity * (7 / 8) ** (1 / 2))
    assert scores["bleu3"] == pytest.approx(brevity * (7 / 8 * 4 / 5) ** (1 / 3))
    assert scores["bleu4"] == pytest.approx(brevity * (7 / 8 * 4 / 5 * 1 / 2) ** (1 / 4))
    # Corpus BLEU pools counts; it is not the mean of sentence scores (the first sentence alone has BLEU-4 0).
    # (no 4-gram matches: 0 up to the ~1e-4 that pycocoevalcap's 1e-15 division guard leaves)
    assert corpus_bleu(hypotheses[:1], references[:1])["bleu4"] == pytest.approx(0.0, abs=1e-3)
    assert corpus_bleu(hypotheses[:1], references[:1])["bleu3"] == pytest.approx(
        math.exp(1 - 5 / 4) * (2 / 3 * 1 / 2) ** (1 / 3))


def test_corpus_bleu_clips_counts_and_picks_the_closest_reference_length():
    assert corpus_bleu(["the the the the"], ["the heart"])["bleu1"] == pytest.approx(1 / 4)  # "the" counts once
    # References of 2 and 4 words are equally close to 3: the shorter counts, so c = 3 > r = 2 and BP = 1.
    assert corpus_bleu(["a b c"], [["a b", "a b c d"]])["bleu1"] == pytest.approx(1.0)
    assert corpus_bleu(["a b c"], [["a b c d"]])["bleu1"] == pytest.approx(math.exp(1 - 4 / 3))
    assert corpus_bleu([""], ["no effusion"]) == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_rouge_l_by_hand():
    # LCS("the heart is enlarged", "the heart is mildly enlarged") = 4: P = 1, R = 4/5, beta = 1.2.
    expected = (1 + 1.44) * 1.0 * 0.8 / (0.8 + 1.44 * 1.0)
    assert rouge_l(["the heart is enlarged"], ["the heart is mildly enlarged"]) == pytest.approx(expected)
    assert rouge_l(["no pneumothorax", "x"], ["no pneumothorax", "y"]) == pytest.approx(0.5)  # mean over reports


@pytest.mark.parametrize("text,positive", [
    ("No pleural effusion or pneumothorax.", set()),
    ("Small left pleural effusion without pneumothorax.", {"pleural effusion"}),
    ("No focal consolidation, pleural effusion, or pneumothorax.", set()),
    ("There is no pneumothorax, but a moderate right pleural effusion.", {"pleural effusion"}),
    ("Pneumothorax is not seen; there is a 1.2 cm nodule in the right upper lobe.", {"nodule"}),
    ("The heart is not enlarged. No suspicious pulmonary nodule.", set()),
    ("The heart is mildly enlarged. Bilateral pleural fluid.", {"cardiomegaly", "pleural effusion"}),
    ("A pleural line with absent lung markings, consistent with a small pneumothorax.", {"pneumothorax"}),
    ("Pleural effusions have resolved.", set()),
])
def test_keyword_labeller_handles_negation(text, positive):
    findings = ("pleural effusion", "cardiomegaly", "pneumothorax", "nodule")
    assert {name for name, value in label_report(text, findings).items() if value} == positive


def test_label_report_maps_uncertain_by_policy_and_refuses_unknown_names():
    assert label_report("Possible small effusion.", ["effusion"]) == {"effusion": 1}
    assert label_report("Possible small effusion.", ["effusion"], uncertain="negative") == {"effusion": 0}
    assert label_report("Cardiomegaly.")["cardiomegaly"] == 1 and "no finding" in label_report("Cardiomegaly.")
    with pytest.raises(ValueError, match="no rules for"):
        label_report("x", ["situs inversus"])


def test_labeller_reads_every_synthetic_report_correctly(synthetic_cxr):
    rows = [json.loads(line) for line in synthetic_cxr.read_text().splitlines()]
    for row in rows:
        assert label_report(report_text(row["report"]), row["labels"]) == row["labels"], row["report"]


def test_finding_f1_and_majority_baseline():
    labels = [{"Pleural Effusion": 1, "pneumothorax": 0}, {"Pleural Effusion": 0, "pneumothorax": 1},
              {"Pleural Effusion": 1, "pneumothorax": 0}, {"Pleural Effusion": 0, "pneumothorax": -1}]
    generated = ["Small pleural effusion.", "No pneumothorax.", "Pleural effusion and pneumothorax.", "Normal."]
    scores = finding_f1(generated, labels)
    assert scores["findings"] == ["pleural effusion", "pneumothorax"]  # only labelled findings; -1 left out
    effusion = scores["model"]["per_finding"]["pleural effusion"]
    assert (effusion["precision"], effusion["recall"], effusion["f1"]) == (1.0, 1.0, 1.0)
    pneumothorax = scores["model"]["per_finding"]["pneumothorax"]  # 1 false positive, 1 miss, n = 3
    assert (pneumothorax["f1"], pneumothorax["n"]) == (0.0, 3)
    assert scores["model"]["micro"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # Majority class: effusion is a tie (2 of 4) -> negative; pneumothorax 1 of 3 -> negative.
    assert scores["majority_class"] == {"pleural effusion": 0, "pneumothorax": 0}
    assert scores["majority_baseline"]["micro"]["f1"] == 0.0
    assert scores["all_positive_baseline"]["micro"]["f1"] == pytest.approx(2 * 3 / (2 * 3 + 4))  # 3 of 7 positive
    common = finding_f1(["x"] * 3, [{"nodule": 1}] * 3)  # a finding in most studies: the baseline says yes
    assert common["majority_baseline"]["micro"]["f1"] == 1.0 and common["model"]["micro"]["f1"] == 0.0
    trained_on = finding_f1(["x"], [{"nodule": 1}], reference_labels=[{"nodule": 0}] * 3)
    assert trained_on["majority_class"] == {"nodule": 0}
    assert truth_labels({"Nodule": 1, "Lung_Opacity": 0, "cardiomegaly": None}) == {"nodule": 1, "lung opacity": 0}


def test_finding_f1_names_labels_the_labeller_cannot_read():
    labels = [{"emphysema": 1, "lung nodule": 0, "Bronchiectasis": 1}, {"emphysema": 0, "lung nodule": 1}]
    scores = finding_f1(["Emphysema. No nodules.", "A 1 cm nodule."], labels)
    assert scores["labels"] == ["emphysema", "lung nodule", "bronchiectasis"]  # every configured label
    assert scores["findings"] == ["emphysema", "lung nodule"] and scores["unreadable"] == ["bronchiectasis"]
    assert scores["model"]["micro"]["f1"] == 1.0


def test_report_metrics_summary():
    out = report_metrics(["no pleural effusion"], ["no pleural effusion"], [{"pleural effusion": 0}])
    assert out["n"] == 1 and out["rouge_l"] == pytest.approx(1.0) and out["bleu3"] == pytest.approx(1.0)
    assert out["bleu4"] < 0.05  # three words hold no 4-gram: 0 but for pycocoevalcap's guard, (1e-15 / 1e-9)^(1/4)
    assert out["finding_f1"] == 0.0 and out["baseline_f1"] == 0.0 and "f1/pleural effusion" in out
