from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmvl.errors import ConfigError
from mmvl.evaluation.retrieval import retrieval_metrics
from mmvl.evaluation.zero_shot import (
    PRESETS,
    auroc,
    build_prompts,
    load_prompt_file,
    prompts_from,
    zero_shot_probabilities,
)


def test_presets_and_custom_prompts():
    assert build_prompts(["pneumothorax"], "chexzero") == {
        "pneumothorax": {"positive": ["pneumothorax"], "negative": ["no pneumothorax"]}}
    assert build_prompts(["edema"], "ctclip")["edema"] == {
        "positive": ["edema is present."], "negative": ["edema is not present."]}
    custom = {"edema": {"positive": ["pulmonary edema"], "negative": ["clear lungs"]}}
    assert build_prompts(["edema"], custom)["edema"]["negative"] == ["clear lungs"]
    with pytest.raises(ConfigError, match="unknown prompt preset 'chexpert'"):
        build_prompts(["edema"], "chexpert")


def test_pairwise_and_multiclass_probabilities():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negative = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    pairwise = zero_shot_probabilities(image, positive, negative, logit_scale=10.0)
    high, low = torch.sigmoid(torch.tensor([10.0, -10.0])).tolist()  # softmax over (10, 0) and (0, 10)
    assert torch.allclose(pairwise, torch.tensor([[high, low], [low, high]]))
    expected = high
    multiclass = zero_shot_probabilities(image, positive, negative, 10.0, mode="multiclass")
    assert torch.allclose(multiclass.sum(-1), torch.ones(2)) and multiclass[0, 0] == pytest.approx(expected)


def test_auroc_matches_hand_count():
    # positives 0.9, 0.4; negatives 0.5, 0.4, 0.1 -> pairs won: 3 + (1 + 0.5 tie) = 4.5 of 6
    assert auroc([0.9, 0.4, 0.5, 0.4, 0.1], [1, 1, 0, 0, 0]) == pytest.approx(4.5 / 6)
    assert auroc([0.1, 0.2], [1, 1]) != auroc([0.1, 0.2], [1, 1])  # NaN with one class


def test_retrieval_recall():
    emb = torch.eye(4)
    perfect = retrieval_metrics(emb, emb, ks=(1,))
    assert perfect == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    shuffled = retrieval_metrics(emb, emb[[1, 0, 2, 3]], ks=(1, 2))
    assert shuffled["i2t_R@1"] == 0.5 and shuffled["i2t_R@2"] == 0.5
    collapsed = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), ks=(1, 3))
    assert collapsed["i2t_R@1"] == 0.0 and collapsed["i2t_R@3"] == 0.0  # ties count against the model


def test_ctrate_prompts_cover_the_synthetic_ct_labels_and_read_as_they_should():
    # Issue 22: the CT prompts are worded as CT-RATE's (and the synthetic CT generator's) reports are, one set per
    # label the generator draws; the report labeller, which reads every synthetic CT report right, reads each
    # positive prompt as stating its finding and each negative one as negating it.
    from mmvl.evaluation.labeller import NEGATIVE, POSITIVE, label_observations
    from tests.conftest import load_script

    labels = list(load_script("synthetic_ct").FINDINGS)
    prompts = build_prompts(labels, "ctrate")
    for label in labels:
        assert prompts[label] == PRESETS["ctrate"][label], f"{label}: the generic templates, not its own prompts"
        for side, expected in (("positive", POSITIVE), ("negative", NEGATIVE)):
            assert len(prompts[label][side]) >= 2
            for prompt in prompts[label][side]:
                assert label_observations(prompt, [label])[label] == expected, (label, side, prompt)
    assert build_prompts(["atelectasis"], "ctrate")["atelectasis"]["negative"][1] == "No atelectasis was detected."


def test_the_ct_prompt_file_is_the_ctrate_preset():
    path = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "ct_rate.json"
    assert load_prompt_file(path) == PRESETS["ctrate"]
    assert prompts_from(["emphysema", "atelectasis"], path) == build_prompts(["emphysema", "atelectasis"], "ctrate")
