"""mmvl.evaluation.metrics (AUROC, F1 at validation thresholds, averages, bootstrap intervals, linear probes) and the
pycocoevalcap report metrics of mmvl.evaluation.report_metrics, on fixed inputs with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from mmvl.evaluation import report_metrics
from mmvl.evaluation.metrics import (
    best_f1_threshold,
    classification_metrics,
    linear_probe,
    sample_training_rows,
    target_matrix,
)
from mmvl.evaluation.report_metrics import caption_metrics, corpus_bleu, java_problem, rouge_l, tokenize_corpus

NAN = float("nan")
# Two labels over four studies; label "b" is unknown (-1) for study 1, whose score is NaN and must be ignored.
SCORES = np.array([[0.1, 0.9], [0.4, NAN], [0.35, 0.5], [0.8, 0.2]])
TARGETS = np.array([[0, 1], [0, -1], [1, 0], [1, 1]])


def test_target_matrix_reads_manifest_labels():
    rows = [{"a": 1, "b": 0}, {"a": -1, "b": None}, None, {"a": 0, "b": float("nan")}, {"a": 1.0}]
    assert target_matrix(rows, ["a", "b"]).tolist() == [[1, 0], [-1, -1], [-1, -1], [0, -1], [1, -1]]


def test_auroc_per_label_macro_and_micro_by_hand():
    metrics = classification_metrics(SCORES, TARGETS, ["a", "b"], n_bootstrap=0)
    a, b = metrics["labels"]["a"], metrics["labels"]["b"]
    # a: positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered right (sklearn's own example).
    assert a["auroc"] == pytest.approx(0.75) == roc_auc_score(TARGETS[:, 0], SCORES[:, 0])
    # b (study 1 masked): positives 0.9, 0.2 against negative 0.5: 1 of 2 pairs.
    assert b["auroc"] == pytest.approx(0.5) and (b["n"], b["n_positive"], b["n_unknown"]) == (3, 2, 1)
    assert metrics["macro"]["auroc"] == pytest.approx(0.625) and metrics["macro"]["labels"] == ["a", "b"]
    # micro: the 7 known label-rows pooled; positives 0.35, 0.8, 0.9, 0.2 beat 1 + 3 + 3 + 1 of the negatives
    # 0.1, 0.4, 0.5.
    assert metrics["micro"]["auroc"] == pytest.approx(8 / 12)
    assert (metrics["micro"]["n_label_rows"], metrics["micro"]["n_positive"]) == (7, 4)
    known = TARGETS != -1
    assert metrics["micro"]["auroc"] == pytest.approx(roc_auc_score(TARGETS[known], SCORES[known]))


def test_f1_uses_the_threshold_chosen_on_validation():
    # Validation for "a": thresholds 0.2 / 0.3 / 0.6 / 0.7 give F1 2/3, 0.8, 0.5, 0 -> 0.3.
    val_scores = np.array([[0.2, 0.3], [0.3, 0.3], [0.6, 0.3], [0.7, 0.3]])
    val_targets = np.array([[0, 0], [1, 0], [1, 0], [0, -1]])  # "b" has no positive validation row
    metrics = classification_metrics(SCORES, TARGETS, ["a", "b"], val_scores, val_targets, n_bootstrap=0)
    a, b = metrics["labels"]["a"], metrics["labels"]["b"]
    assert a["threshold"] == pytest.approx(0.3) and a["threshold_source"] == "val"
    # On test, 0.4, 0.35 and 0.8 are called present: TP 2, FP 1, FN 0 -> F1 0.8.
    assert a["f1"] == pytest.approx(0.8) == f1_score(TARGETS[:, 0], SCORES[:, 0] >= 0.3)
    assert b["threshold"] == 0.5 and b["threshold_source"].startswith("default 0.5: no positive validation rows")
    # "b" at 0.5: known rows 0.9 (1), 0.5 (0), 0.2 (1) -> TP 1, FP 1, FN 1 -> F1 0.5.
    assert b["f1"] == pytest.approx(0.5)
    assert metrics["macro"]["f1"] == pytest.approx(0.65)
    assert metrics["threshold_source"] == "val, default for some labels"
    # micro F1 pools the label-rows with each label's threshold: TP 2 + 1, FP 1 + 1, FN 0 + 1.
    assert metrics["micro"]["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))


def test_without_validation_rows_the_threshold_is_half_and_says_so():
    metrics = classification_metrics(SCORES, TARGETS, ["a", "b"], n_bootstrap=0)
    assert metrics["threshold_source"] == "default" and metrics["n_val_rows"] == 0
    assert all(entry["threshold"] == 0.5 and entry["threshold_source"] == "default 0.5: no validation rows"
               for entry in metrics["labels"].values())
    assert metrics["labels"]["a"]["f1"] == pytest.approx(2 / 3)  # only 0.8 >= 0.5: TP 1, FN 1


def test_best_threshold_takes_the_lowest_on_ties():
    # Thresholds 0.1 and 0.4 both give F1 2/3 (0.2 gives 0.4, 0.3 gives 0.5).
    assert best_f1_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 0, 1])) == pytest.approx(0.1)


def test_one_class_and_unknown_labels_are_skipped_with_a_reason():
    scores = np.column_stack([SCORES[:, 0], [0.3, 0.2, 0.1, 0.9], [0.5] * 4])
    targets = np.column_stack([TARGETS[:, 0], [0, 0, 0, 0], [-1] * 4])
    metrics = classification_metrics(scores, targets, ["a", "absent", "unknown"], n_bootstrap=20)
    assert metrics["labels"]["absent"]["skipped"] == (
        "only one class among the 4 rows with a known label (0 positive, 4 negative)")
    assert metrics["labels"]["unknown"]["skipped"] == "no rows with a known label"
    assert "auroc" not in metrics["labels"]["absent"] and metrics["macro"]["labels"] == ["a"]
    assert metrics["macro"]["auroc"] == pytest.approx(0.75)
    assert metrics["micro"]["n_label_rows"] == 8  # the all-negative label's rows still count in the pool
    with pytest.raises(ValueError, match="targets must be 1, 0 or -1"):
        classification_metrics(scores, np.full((4, 3), 2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="scores must be finite where the target is known"):
        classification_metrics(np.full((4, 1), NAN), TARGETS[:, :1], ["a"])


def _noisy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, (n, 2))
    return targets + rng.normal(0, 0.8, (n, 2)), targets


def test_bootstrap_intervals_hold_the_estimate_narrow_with_more_studies_and_are_seeded():
    small = classification_metrics(*_noisy(60, 0), ["a", "b"], n_bootstrap=200, seed=0)
    large = classification_metrics(*_noisy(1200, 0), ["a", "b"], n_bootstrap=200, seed=0)
    for metrics in (small, large):
        for entry in [*metrics["labels"].values(), metrics["macro"], metrics["micro"]]:
            for key in ("auroc", "f1"):
                low, high = entry[f"{key}_ci"]
                assert low <= entry[key] <= high
    for key in ("auroc", "f1"):
        width = {name: np.diff(m["macro"][f"{key}_ci"])[0] for name, m in (("small", small), ("large", large))}
        assert width["large"] < width["small"] / 2  # ~1/sqrt(20) as wide in theory
    assert small["labels"]["a"]["auroc_n_resamples"] == 200
    assert small["bootstrap"]["unit"] == "row" and small["bootstrap"]["n_units"] == 60  # no study ids given
    runs = [classification_metrics(*_noisy(60, 0), ["a", "b"], n_bootstrap=50, seed=seed) for seed in (0, 0, 1)]
    assert runs[0]["macro"]["auroc_ci"] == runs[1]["macro"]["auroc_ci"] != runs[2]["macro"]["auroc_ci"]


def _intervals(metrics: dict) -> list:
    return [metrics[average][f"{key}_ci"] for average in ("macro", "micro") for key in ("auroc", "f1")] + [
        entry[f"{key}_ci"] for entry in metrics["labels"].values() for key in ("auroc", "f1")]


def test_bootstrap_resamples_studies_not_rows():
    scores, targets = _noisy(40, 3)
    studies = [f"s{i}" for i in range(40)]
    # every study's row written three times, interleaved as a per-image manifest would list them
    order = np.tile(np.arange(40), 3)
    copies = (scores[order], targets[order])
    deduplicated = classification_metrics(scores, targets, ["a", "b"], n_bootstrap=200, seed=0)
    by_study = classification_metrics(*copies, ["a", "b"], n_bootstrap=200, seed=0,
                                      study_ids=[studies[i] for i in order])
    by_row = classification_metrics(*copies, ["a", "b"], n_bootstrap=200, seed=0)
    assert by_study["bootstrap"]["unit"] == "study" and by_study["bootstrap"]["n_units"] == 40
    assert by_row["bootstrap"]["unit"] == "row" and by_row["bootstrap"]["n_units"] == 120
    assert by_study["macro"]["auroc"] == deduplicated["macro"]["auroc"]
    # duplicating every study leaves AUROC and F1 unchanged, so a study resample equals one of the deduplicated set
    assert np.ravel(_intervals(by_study)) == pytest.approx(np.ravel(_intervals(deduplicated)))
    study_width = np.diff(by_study["macro"]["auroc_ci"])[0]
    assert np.diff(by_row["macro"]["auroc_ci"])[0] < 0.75 * study_width  # rows pretend to be 3x the evidence


def test_rows_without_a_study_id_are_their_own_unit():
    scores, targets = _noisy(6, 1)
    ids = ["s1", "s1", None, "", float("nan"), "s2"]
    metrics = classification_metrics(scores, targets, ["a", "b"], n_bootstrap=5, seed=0, study_ids=ids)
    assert metrics["bootstrap"]["n_units"] == 5  # s1, three rows without an id, s2
    with pytest.raises(ValueError, match="3 ids for 6 rows"):
        classification_metrics(scores, targets, ["a", "b"], n_bootstrap=5, study_ids=ids[:3])


@pytest.mark.filterwarnings("error")  # no sklearn UndefinedMetricWarning: one-class draws are not scored at all
def test_bootstrap_leaves_out_resamples_where_a_label_has_one_class():
    scores = np.array([[0.9], [0.1], [0.2], [0.3], [0.4]])
    targets = np.array([[1], [0], [0], [0], [0]])  # one positive: many resamples miss it
    entry = classification_metrics(scores, targets, ["a"], n_bootstrap=300, seed=0)["labels"]["a"]
    assert 0 < entry["auroc_n_resamples"] < 300  # (4/5)^5 = 33% of resamples hold no positive
    assert entry["auroc_ci"] == [1.0, 1.0]


def test_training_rows_are_nested_and_hold_both_classes():
    targets = np.zeros((300, 3), dtype=int)
    targets[::50, 0] = 1  # 6 positives
    targets[:, 1] = 1
    targets[7, 1] = 0  # a single negative
    targets[:, 2] = -1
    targets[10, 2] = 1  # one known value only
    rows, report = sample_training_rows(targets, 0.01, seed=0)
    assert report["n_labelled"] == 300 and report["n_drawn"] == 3
    assert (targets[rows, 0] == 1).any() and (targets[rows, 0] == 0).any()
    assert (targets[rows, 1] == 0).any() and 7 in rows
    assert report["added"][0] == ["positive"] and report["added"][1] == ["negative"]
    assert report["missing"] == {2: ["negative"]}  # no negative exists anywhere
    drawn_small = sample_training_rows(targets, 0.01, seed=0)[0][:3]
    drawn_large = sample_training_rows(targets, 0.1, seed=0)[0][:30]
    assert set(drawn_small) <= set(drawn_large)  # 1% is part of 10%
    assert set(sample_training_rows(targets, 1.0, seed=0)[0]) == set(range(300))


def test_linear_probe_learns_a_separable_label_and_reports_untrainable_ones():
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        targets = np.column_stack([rng.integers(0, 2, n), np.zeros(n, dtype=int)])
        features = rng.normal(0, 1, (n, 4))
        features[:, 0] += 3 * targets[:, 0]  # label "easy" shifts the first feature
        return features, targets

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = split(200), split(40), split(60)
    test_y[:5, 1] = 1  # "never" has no positive training row, so no probe
    result = linear_probe(train_x, train_y, test_x, test_y, ["easy", "never"], val_x, val_y, n_bootstrap=50, seed=0)
    assert list(result["fractions"]) == ["0.01", "0.1", "1"]
    for key, entry in result["fractions"].items():
        assert entry["n_train_rows"] >= max(2, round(float(key) * 200))
        assert entry["not_trained"] == {"never": "only one class among the "
                                        f"{entry['train_counts']['never']['n']} rows with a known label "
                                        f"(0 positive, {entry['train_counts']['never']['n']} negative)"}
        metrics = entry["metrics"]
        assert list(metrics["labels"]) == ["easy"] and entry["test_scores"].shape == (60, 2)
        assert np.isnan(entry["test_scores"][:, 1]).all()
        assert entry["C"]["easy"]["source"] == "val AUROC"
    assert result["fractions"]["1"]["metrics"]["labels"]["easy"]["auroc"] > 0.95
    assert result["fractions"]["1"]["n_train_rows"] == 200


# ---------------------------------------------------------------------------------------------------------
# Report metrics (pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------

HYPOTHESES = ["the heart is enlarged", "no pleural effusion", "small left pleural effusion"]
REFERENCES = ["the heart is mildly enlarged", "no pleural effusion", "small left pleural effusion"]


def test_bleu_and_rouge_match_values_worked_by_hand():
    # Matched / total n-grams: n=1 11/11, n=2 7/8, n=3 4/5, n=4 1/2; candidate 11 words, reference 12.
    brevity = math.exp(1 - 12 / 11)
    scores = caption_metrics(HYPOTHESES, REFERENCES, tokenizer="simple", meteor=False)
    assert scores["bleu1"] == pytest.approx(brevity)
    assert scores["bleu2"] == pytest.approx(brevity * (7 / 8) ** (1 / 2))
    assert scores["bleu4"] == pytest.approx(brevity * (7 / 8 * 4 / 5 * 1 / 2) ** (1 / 4))
    # ROUGE-L of the first: LCS 4 of 4 and 5 words, beta 1.2; the others match exactly.
    first = (1 + 1.44) * 1.0 * 0.8 / (0.8 + 1.44 * 1.0)
    assert scores["rouge_l"] == pytest.approx((first + 2) / 3)
    assert {key: scores[key] for key in ("bleu1", "bleu2", "bleu3", "bleu4")} == pytest.approx(
        corpus_bleu(HYPOTHESES, REFERENCES))
    assert rouge_l(HYPOTHESES, REFERENCES) == pytest.approx(scores["rouge_l"])


def test_identical_reports_score_one():
    text = ["the heart is mildly enlarged with a small left pleural effusion"]
    scores = caption_metrics(text, text, tokenizer="simple", meteor=False)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6) and scores["rouge_l"] == pytest.approx(1.0)
    assert scores["unavailable"] == {"meteor": "not requested"} and scores["meteor"] is None


def test_cider_on_a_two_report_corpus():
    # Two references, each n-gram in one of them: idf = log(2) - log(1) for every n-gram (n-grams in no reference
    # count as in one). Report 1 equals its reference: cosine 1 for unigrams and bigrams, 0 for the 3- and 4-grams
    # a two-word text lacks, length penalty exp(0) = 1 -> 10 * mean(1, 1, 0, 0) = 5. Report 2 shares nothing: 0.
    scores = caption_metrics(["heart enlarged", "no effusion"], ["heart enlarged", "small nodule"],
                             tokenizer="simple", meteor=False)
    assert scores["cider"] == pytest.approx(2.5)


def test_without_java_meteor_is_unavailable_and_tokens_are_simple(monkeypatch):
    monkeypatch.setattr(report_metrics, "java_problem", lambda: "no 'java' on PATH")
    scores = caption_metrics(HYPOTHESES, REFERENCES, tokenizer="auto")
    assert scores["meteor"] is None and scores["unavailable"]["meteor"] == "no 'java' on PATH"
    assert scores["tokenizer"] == "simple" and scores["tokenizer_note"] == "simple tokenizer used: no 'java' on PATH"
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 12 / 11))


needs_java = pytest.mark.skipif(java_problem() is not None, reason=f"no Java: {java_problem()}")


@needs_java
def test_ptb_tokenizer_keeps_decimals_and_drops_punctuation():
    res, gts, used, note = tokenize_corpus(["Nodule, 2.5 cm; CT recommended."], [["The heart's size is normal."]],
                                           tokenizer="ptb")
    assert used == "ptb" and note is None
    assert res == {0: ["nodule 2.5 cm ct recommended"]} and gts == {0: ["the heart 's size is normal"]}


@needs_java
def test_meteor_with_java():
    same = caption_metrics(["small left pleural effusion"], ["small left pleural effusion"])  # starts a JVM
    assert same["tokenizer"] == "ptb" and same["meteor"] == pytest.approx(1.0) and "unavailable" not in same
