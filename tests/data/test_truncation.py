"""Reports longer than the model's max_length: the impression survives (Collate's ``keep_last``), the old cut at
the end (``tail``) on request, and reports that fit tokenize exactly as before."""

from __future__ import annotations

import pytest
import torch

from mmvl.data.loader import Collate
from mmvl.data.reports import report_parts, report_text
from mmvl.data.tokenizer import train_wordpiece_tokenizer

FINDINGS = " ".join(f"finding number {k} is stable." for k in range(12))
IMPRESSION = "new right pleural effusion."
REPORT = f"FINDINGS: {FINDINGS}\nIMPRESSION: {IMPRESSION}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_wordpiece_tokenizer([FINDINGS, IMPRESSION, "no acute disease.", "heart is normal."] * 3, out,
                                     vocab_size=120, min_frequency=1)


def sample(text: str) -> dict:
    parts = report_parts(text)
    return {"image": torch.zeros(1, 4, 4), "report": report_text(text), "report_parts": parts, "meta": {}}


def decoded(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_report_parts_are_what_report_text_joins():
    assert report_parts(REPORT) == [FINDINGS, IMPRESSION]
    assert report_text(REPORT) == f"{FINDINGS} {IMPRESSION}"
    assert report_parts("Heart is normal.") == ["Heart is normal."] and report_parts("   ") == []


def test_a_long_report_keeps_its_impression_whole(tokenizer):
    short = "FINDINGS: heart is normal.\nIMPRESSION: no acute disease."
    batch = Collate(tokenizer, max_length=24)([sample(REPORT), sample(short)])
    long_ids, short_ids = batch["input_ids"]
    assert batch["input_ids"].shape == (2, 24) and bool(batch["attention_mask"][0].all())
    text = decoded(tokenizer, long_ids)
    assert text.endswith("new right pleural effusion.") and text.startswith("finding number 0 is stable.")
    assert long_ids[0] == tokenizer.cls_token_id and long_ids[-1] == tokenizer.sep_token_id
    # the impression's tokens, independently tokenized, are the row's last content tokens
    impression = tokenizer(IMPRESSION, add_special_tokens=False)["input_ids"]
    assert long_ids[-1 - len(impression):-1].tolist() == impression
    # a report that fits is tokenized exactly as the tokenizer alone does it, padding included
    alone = tokenizer([report_text(short)], padding="max_length", max_length=24)["input_ids"][0]
    assert short_ids.tolist() == alone


def test_tail_truncation_and_reports_without_sections_cut_at_the_end(tokenizer):
    tail = Collate(tokenizer, max_length=24, truncation="tail")([sample(REPORT)])
    assert "effusion" not in decoded(tokenizer, tail["input_ids"][0])
    one_part = Collate(tokenizer, max_length=24)([sample(f"{FINDINGS} {IMPRESSION}")])  # no section headers
    torch.testing.assert_close(one_part["input_ids"], tail["input_ids"])


def test_an_impression_longer_than_the_budget_is_cut_at_its_end(tokenizer):
    text = f"FINDINGS: heart is normal.\nIMPRESSION: {FINDINGS}"
    ids = Collate(tokenizer, max_length=16)([sample(text)])["input_ids"][0]
    expected = tokenizer(FINDINGS, add_special_tokens=False)["input_ids"][:14]
    assert ids[1:-1].tolist() == expected


def test_an_unknown_truncation_is_refused(tokenizer):
    with pytest.raises(ValueError, match="truncation must be one of"):
        Collate(tokenizer, truncation="head")
