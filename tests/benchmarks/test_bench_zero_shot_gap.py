"""benchmarks/bench_zero_shot_gap.py on a stand-in model whose towers are known: the image tower sees one label,
misses one and sees one reversed, the text tower reads all three, so each column must say which tower failed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import load_bench

LABELS = ("alpha", "beta", "gamma")
PROMPTS = {label: {"positive": [f"{label.capitalize()}."], "negative": [f"No {label}."]} for label in LABELS}


class StandInModel:
    """Text: +1/-1 per label stated/negated (0 when not named). Images: alpha as it is, beta as noise, gamma
    reversed (the tower learnt the finding pointing the wrong way)."""

    config = {"data": {"report_sections": ["findings"]}}

    def __init__(self, labels_by_image: dict[str, dict[str, int]], seed: int = 0):
        self.labels_by_image, self.rng = labels_by_image, np.random.default_rng(seed)

    def preprocess(self, path: str) -> dict:
        labels = self.labels_by_image[path.rsplit("/", 1)[-1]]
        return {"image": np.array([2.0 * labels["alpha"] - 1.0, self.rng.standard_normal(),
                                   1.0 - 2.0 * labels["gamma"]], np.float32)}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.float() + 0.1, dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        def code(text: str, label: str) -> float:
            text = text.lower()
            return -1.0 if f"no {label}" in text else 1.0 if label in text else 0.0

        vectors = torch.tensor([[code(text, label) for label in LABELS] for text in texts])
        return torch.nn.functional.normalize(vectors + 0.1, dim=-1)


def test_each_column_names_the_tower_that_lost_the_label(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows, labels_by_image = [], {}
    for index in range(300):
        labels = {label: int(rng.random() < 0.4) for label in LABELS}
        sentences = " ".join(f"{label.capitalize()}." if value else f"No {label}." for label, value in labels.items())
        labels_by_image[f"s{index}.npy"] = labels
        rows.append({"image": f"s{index}.npy", "report": f"FINDINGS: {sentences}", "labels": labels,
                     "split": "train" if index < 200 else "val"})
    bench = load_bench("bench_zero_shot_gap")
    table = bench.zero_shot_gap(StandInModel(labels_by_image), rows, tmp_path, LABELS, PROMPTS)
    assert [table[label]["positives"] for label in LABELS] == [
        sum(row["labels"][label] for row in rows[200:]) for label in LABELS]
    for label in LABELS:  # the text tower reads every label, and the prompts point where the reports lie
        assert table[label]["text_zero_shot"] == 1.0 and table[label]["text_linear_probe"] == 1.0, table
    assert table["alpha"]["image_zero_shot"] == table["alpha"]["image_report_prototype"] == 1.0, table
    assert table["alpha"]["image_linear_probe"] == 1.0, table
    # beta: pure noise in the image tower; 100 rows put a chance AUROC within ~0.06 (one SD) of 0.5
    for column in ("image_zero_shot", "image_report_prototype", "image_linear_probe"):
        assert abs(table["beta"][column] - 0.5) < 0.2, table
    # gamma: learnt reversed, so image zero-shot and the report prototype are below chance; a probe fits the sign
    assert table["gamma"]["image_zero_shot"] == table["gamma"]["image_report_prototype"] == 0.0, table
    assert table["gamma"]["image_linear_probe"] == 1.0, table
    with pytest.raises(ValueError, match=r"'test' \(0\)"):
        bench.zero_shot_gap(StandInModel(labels_by_image), rows, tmp_path, LABELS, PROMPTS, split="test")
    capsys.readouterr()
    json.dumps(table)  # plain numbers, for the bench's JSON line
