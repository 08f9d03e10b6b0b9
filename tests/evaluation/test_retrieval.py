from __future__ import annotations

import pytest
import torch

from mmvl.evaluation.retrieval import retrieval_metrics, same_report_mask

BOILERPLATE = "No acute cardiopulmonary process."
TEXTS = [BOILERPLATE, "no  acute cardiopulmonary PROCESS.", "Small left effusion.", "Cardiomegaly."]


def _twin_first() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0 and 1 carry the same report; the model puts each one's twin first, the others in place."""
    text_emb = torch.eye(4)
    image_emb = torch.eye(4)[[1, 0, 2, 3]]  # image 0 is closest to text 1 and image 1 to text 0
    return image_emb, text_emb


def test_duplicate_report_ranked_first_is_a_hit():
    image_emb, text_emb = _twin_first()
    with_texts = retrieval_metrics(image_emb, text_emb, ks=(1,), texts=TEXTS)
    assert with_texts == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    without = retrieval_metrics(image_emb, text_emb, ks=(1,))  # the old signature: only the pair counts
    assert without == {"i2t_R@1": 0.5, "t2i_R@1": 0.5}


def test_distinct_reports_unchanged_by_texts():
    image_emb, text_emb = _twin_first()
    distinct = ["a", "b", "c", "d"]
    assert retrieval_metrics(image_emb, text_emb, ks=(1, 2), texts=distinct) == retrieval_metrics(
        image_emb, text_emb, ks=(1, 2))


def test_twin_does_not_rescue_a_wrong_ranking_and_ties_still_count_against():
    # image 0 ranks text 2 (a different report) first, then its twin text 1, then its own text 0
    image_emb = torch.tensor([[0.5, 0.8, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    metrics = retrieval_metrics(image_emb, torch.eye(4), ks=(1, 2), texts=TEXTS)
    assert metrics["i2t_R@1"] == 0.75 and metrics["i2t_R@2"] == 1.0
    collapsed = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), ks=(1, 2), texts=TEXTS)
    # rows 0 and 1 have two non-hit rivals tied with their twins; rows 2 and 3 three
    assert collapsed["i2t_R@1"] == 0.0 and collapsed["t2i_R@2"] == 0.0


def test_same_report_mask_and_length_check():
    mask = same_report_mask(TEXTS)
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False],
                             [False, False, True, False], [False, False, False, True]]
    with pytest.raises(ValueError, match="3 reports for 4 embedding rows"):
        retrieval_metrics(torch.eye(4), torch.eye(4), texts=TEXTS[:3])
